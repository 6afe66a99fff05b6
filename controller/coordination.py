"""The coordination boundary: everything nfs-ha asks of etcd, in two layers.

- `Coordination` (the class at the end) is what the rest of nfs-ha uses: VFS claims, epoch-guarded
  status writes, releases, node registrations, leases, load and watch of the whole keyspace. Its
  arguments and results are domain values (VFS and node names, epochs, lease ids, status
  documents); it is the only code that builds a key (with controller/keyspace.py's layout) or
  calls a store's writes. The reconcile loop (controller/reconcile.py, vfs_actions.py), the view keeper
  (controller/watcher.py), the agent (node/agent.py) and the CLI go through it; the lease keeper
  (controller/ownership.py) needs only its lease calls.
- `KeyStore` (the protocol below) is the etcd semantics it is built on: keys, revisions, leases,
  transactions with compares, watch with catch-up. Two implementations keep the same contract:

- controller.store.EtcdStore: the real thing, over gRPC (pyetcd);
- controller.memstore.MemStore: in memory, with leases that expire on an injectable clock, so the
  code above can be unit-tested without root, network or an etcd binary.

tests/unit/test_coordination_contract.py runs one set of tests against both (MemStore, and
EtcdStore against a real etcd on loopback): what a docstring below calls a guarantee is checked
there; a "non-guarantee" is what callers must not lean on, because the two differ or etcd does
not promise it.

Terms used below (etcd's MVCC model):
- revision: a counter of the whole store. Every write or transaction that changes something moves
  it by exactly one, and every key it changes gets that revision; a write that changes nothing
  (deleting an absent key, a transaction whose branch has no effect) does not move it.
- create_revision / mod_revision: the revision that created a key (reset when it is deleted and
  created again) / that last changed it. A compare on create_revision == 0 or mod_revision == 0
  means "the key does not exist".
- lease: a TTL in seconds; a key put with a lease is deleted (in one revision with every other key
  of that lease) when the lease is revoked or expires, i.e. when no keepalive arrived for a TTL.

lease_stream() is how the lease keeper renews leases: EtcdStore's is one LeaseKeepAlive stream
for all leases (controller/leasestream.py), MemStore's a keepalive() call per request
(store.CallingLeaseStream).

The domain types stay where they are: KeyRecord (controller.view), WatchBatch, OwnerCreated and
StoreError (controller.store).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from controller.keyspace import Keyspace
from controller.status import encode
from controller.store import OwnerCreated, StoreError, WatchBatch
from controller.view import KeyRecord, parse_epoch_base

__all__ = ["Claim", "Coordination", "KeyRecord", "KeyStore", "OwnerCreated", "StoreError", "WatchBatch"]


@runtime_checkable
class KeyStore(Protocol):
    """The etcd semantics Coordination is built on (see the module docstring for the terms).

    Every method may raise StoreError: the store could not be reached, timed out, or refused the
    request. After StoreError the effect of a write is unknown (it may have been applied), except
    for what etcd refuses before applying anything, which writes nothing: a lease that is gone,
    a key put twice (or put and deleted) in one transaction, more than 128 compares or more than
    128 operations (reads included) in a transaction, a request over 1.5 MiB (etcd's defaults).
    The limits and duplicate keys are checked whether or not a transaction's compares hold; the
    lease only when they hold (etcd checks the branch it takes).
    """

    timeout: float
    """Seconds a call may take before it fails with StoreError (EtcdStore's gRPC deadline; MemStore
    never waits)."""

    # --- reads -------------------------------------------------------------------------------

    def load(self, prefix: str) -> tuple[int, dict[str, KeyRecord]]:
        """Every key under `prefix`, and the store's revision they are consistent with.

        Guarantees: the revision is the store's current revision (also when no key matches), so a
        watch from revision + 1 misses nothing and repeats nothing; each record carries its value
        (bytes), create_revision, mod_revision and lease id (0: none).
        Non-guarantees: the dict's order.
        """
        ...

    def get(self, key: str) -> KeyRecord | None:
        """The key's record, or None if it does not exist."""
        ...

    # --- watch -------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int,
              on_batch: Callable[[WatchBatch | Exception], None]) -> int:
        """Watch the keys under `prefix` from `start_revision`; returns an id of the watch.

        Guarantees:
        - first the history from `start_revision` is replayed (a catch-up), then live changes
          follow; every change with revision >= start_revision is delivered once, in revision
          order, and nothing older. start_revision <= 0 means "from the next change on";
        - an event is (key, record, revision): record None is a delete, and the revision is that
          of the change itself (for a delete: the delete's revision, not the key's last put);
        - all events of one revision (a transaction) arrive in one batch, in the order of the
          transaction's operations (a revoked or expired lease's deletes: in any order);
        - the catch-up comes in batches of at most 1000 revisions; every batch carries the
          store's *current* revision as `revision`, ahead of its events: track the events'
          revisions (controller/view.py), never the batch's;
        - a store has one watch at a time: a new watch silently ends the previous one (it gets
          no further batch and no error), as does close();
        - a watch that ends for any other reason (lost stream, etcd restart) gets one Exception
          and nothing after it; the caller watches again from its last revision + 1, which
          replays what it missed. If that revision was compacted away, the Exception's type
          name contains "Compacted" and the caller must load() again instead.
        Non-guarantees: the thread on_batch runs on (EtcdStore: the client's watch thread,
        MemStore: the writer's, synchronously, under the store's lock: on_batch must not block);
        how many revisions a live batch holds (usually one, more if the watcher lagged); a batch
        may have no events (etcd progress notifications); a failure to start the watch may come
        as StoreError from this call or as an Exception through on_batch.
        """
        ...

    # --- leases ------------------------------------------------------------------------------

    def new_client(self, timeout: float) -> Any:
        """An opaque extra connection whose calls time out after `timeout`, for keepalive(), so a
        keepalive need not wait behind the store's other calls nor longer than `timeout`. Only
        keepalive() accepts it; the caller closes it, or lets it go with the process.
        """
        ...

    def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: (id, granted TTL in seconds). The lease's TTL starts now.

        Guarantees: id != 0; granted TTL >= 1.
        Non-guarantees: granted == ttl. etcd raises a TTL to its minimum (with default timings
        2 s, with a 500 ms election timeout 1 s; MemStore's `min_ttl`, default 1).
        """
        ...

    def lease_stream(self, on_answer: Callable[[int, int, int], None],
                     on_ended: Callable[[int], None]) -> Any:
        """Keepalives for many leases (see controller/leasestream.py): `send_many(lease_ids, sending)`
        sends one for each (`send(lease_id, sending)` for one) and tells `sending(generation)` first;
        `on_answer(lease_id, ttl, generation)` comes for each answer, in the order of the requests of
        that generation; `on_ended(generation)` when a generation ends (an error or `reset()`), after
        which none of its requests is answered; `close()`.

        Guarantees: answers of a generation come in request order, and none is begun after its on_ended
        (one being reported while the generation ends may still come just after: match generations).
        Non-guarantees: that a request is answered, or when; on which thread the callbacks run
        (MemStore's: the sender's, before send() returns).
        """
        ...

    def keepalive(self, lease_id: int, client: Any = None) -> int:
        """Renew a lease for its full TTL; returns that TTL, or <= 0 if the lease is gone
        (revoked, expired or never granted) - then its keys are gone too. `client`: from
        new_client(), None for the store's own connection.

        Guarantees: after a positive answer the lease cannot expire before TTL seconds after
        the call was made (the caller's self-fence deadline leans on this, controller/ownership.py;
        its keeper calls this for a store without EtcdStore's keepalive stream, e.g. MemStore).
        Non-guarantees: the expiry time itself. etcd deletes the keys some time after the TTL
        (measured: 0.1-0.5 s later, more during a leader election, and etcd extends every lease
        by its TTL when it gets a new leader); MemStore expires a lease as soon as its clock
        reaches the deadline, but only when it is called (or expire() is).
        """
        ...

    def revoke(self, lease_id: int) -> None:
        """End a lease now: its keys are deleted in one revision. A lease that is gone already
        is no error."""
        ...

    # --- writes ------------------------------------------------------------------------------

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> None:
        """Write a key (one revision), bound to `lease` (None or 0: to no lease, which also
        unbinds a key that had one). A lease that is gone: StoreError, nothing written."""
        ...

    def delete(self, key: str) -> None:
        """Delete a key (one revision); an absent key is no error and no revision."""
        ...

    def create_owner(self, owner_key: str, owner_value: str, lease_id: int,
                     also: dict[str, str], read: str | None = None,
                     unchanged: dict[str, int] | None = None) -> OwnerCreated | None:
        """One transaction: iff `owner_key` does not exist and every key in `unchanged` still has
        the given mod_revision (0: the key must be absent), put the owner key bound to
        `lease_id` and every key in `also` (without lease).

        Returns None if a condition failed (then nothing was written), else OwnerCreated with
        epoch = the owner key's create_revision (= the transaction's revision, and the mod_revision
        of every key in `also`) and `read` = the value of the key `read` as of that same revision
        (after `also` was applied; None if absent), consistent with the epoch.
        A lease that is gone, when the conditions hold: StoreError, nothing written. The owner key
        also in `also`: StoreError (etcd refuses a duplicate key in a transaction).
        """
        ...

    def put_if_epoch(self, owner_key: str, epoch: int, puts: dict[str, str],
                     delete_owner: bool = False) -> bool:
        """One transaction: iff the owner key's create_revision is `epoch` (0: there is no owner),
        put `puts` (without lease) and, with delete_owner, delete the owner key. Returns whether
        it was applied; False writes nothing. The owner key in `puts` together with
        delete_owner: StoreError (duplicate key)."""
        ...

    def delete_if_no_owner(self, owner_key: str, keys: Iterable[str], absent: Iterable[str] = ()) -> bool:
        """One transaction: iff neither the owner key nor any key in `absent` exists, delete
        `keys` (those that exist; one revision if any did). Returns whether it was applied."""
        ...

    def put_if_unchanged(self, key: str, value: str, seen: KeyRecord | None) -> bool:
        """Compare-and-set: put (without lease) iff the key's mod_revision is still
        seen.mod_revision, or, with seen None, iff the key does not exist. Returns whether it
        was applied."""
        ...

    def put_all_if_unchanged(self, items: Sequence[tuple[str, str, KeyRecord | None]]) -> bool:
        """put_if_unchanged for several keys in one transaction: all of them (one revision) or none.
        At most 128 keys (etcd's --max-txn-ops)."""
        ...

    def close(self) -> None:
        """Release the connections and end the watch (no further batch, no error). Idempotent.

        Every later call raises StoreError. (EtcdStore checks this itself: grpc segfaults the
        interpreter when pyetcd makes its first stub of a kind on a closed channel.) A client
        from new_client() is the caller's, and is not closed by this.
        """
        ...


@dataclass(frozen=True)
class Claim:
    """A won owner transaction: the VFS's epoch (the owner key's create_revision) and the operator's
    epoch base as read in that same transaction (storage epoch = base + epoch, docs/safety.md)."""

    epoch: int
    epoch_base: int


class Coordination:
    """nfs-ha's coordination in domain terms, over one KeyStore and one Keyspace (module docstring).

    Every write that concerns a VFS is one transaction guarded by the VFS's owner key:
    - claim: iff nobody owns the VFS and its status is still the one the caller decided on;
    - write_status / release: iff the owner's epoch is still the caller's (0: iff nobody owns it),
      so a node that lost a VFS can neither overwrite the new owner's status nor delete its key;
    - remove_status: iff nobody owns the VFS and no spec was written again.
    Raises StoreError as the KeyStore does (a write's effect is then unknown).
    """

    def __init__(self, store: KeyStore, keyspace: Keyspace) -> None:
        self.store = store
        self.keyspace = keyspace

    # --- reads and watch: the whole keyspace (controller/view.py parses it) --------------------

    def load(self) -> tuple[int, dict[str, KeyRecord]]:
        return self.store.load(self.keyspace.root)

    def watch(self, start_revision: int, on_batch: Callable[[WatchBatch | Exception], None]) -> int:
        return self.store.watch(self.keyspace.root, start_revision, on_batch)

    def spec_record(self, vfs: str) -> KeyRecord | None:
        return self.store.get(self.keyspace.spec(vfs))

    def node_record(self, node: str) -> KeyRecord | None:
        return self.store.get(self.keyspace.node(node))

    def epoch_base_record(self) -> KeyRecord | None:
        return self.store.get(self.keyspace.epoch_base)

    # --- leases ---------------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        return self.store.grant(ttl)

    def revoke(self, lease_id: int) -> None:
        self.store.revoke(lease_id)

    def lease_stream(self, on_answer: Callable[[int, int, int], None], on_ended: Callable[[int], None]) -> Any:
        return self.store.lease_stream(on_answer, on_ended)

    # --- a VFS's owner and status -----------------------------------------------------------------

    def claim(self, vfs: str, owner: dict[str, Any], lease_id: int, status: dict[str, Any],
              status_revision: int) -> Claim | None:
        """Become the VFS's owner (the owner key bound to `lease_id`) and write `status`, iff nobody
        owns it and its status key still has `status_revision` (0: absent), so a lost owner's risk
        written meanwhile is never overwritten unseen. None: a condition failed, nothing written."""
        ks = self.keyspace
        created = self.store.create_owner(ks.owner(vfs), json.dumps(owner), lease_id, {ks.status(vfs): encode(status)},
                                          read=ks.epoch_base, unchanged={ks.status(vfs): status_revision})
        return None if created is None else Claim(created.epoch, parse_epoch_base(created.read))

    def write_status(self, vfs: str, epoch: int, status: dict[str, Any]) -> bool:
        """Write the VFS's status iff its owner's epoch is `epoch` (0: iff it has no owner)."""
        ks = self.keyspace
        return self.store.put_if_epoch(ks.owner(vfs), epoch, {ks.status(vfs): encode(status)})

    def release(self, vfs: str, epoch: int, final_status: dict[str, Any]) -> bool:
        """Delete the owner key with a final status, iff the owner's epoch is still `epoch`."""
        ks = self.keyspace
        return self.store.put_if_epoch(ks.owner(vfs), epoch, {ks.status(vfs): encode(final_status)},
                                       delete_owner=True)

    def remove_status(self, vfs: str) -> bool:
        """Delete a deleted VFS's status, iff it has neither an owner nor a spec (written again)."""
        ks = self.keyspace
        return self.store.delete_if_no_owner(ks.owner(vfs), [ks.status(vfs)], absent=[ks.spec(vfs)])

    # --- operator and node records ------------------------------------------------------------

    def register(self, node: str, registration: str, lease_id: int) -> None:
        self.store.put(self.keyspace.node(node), registration, lease=lease_id)

    def put_intent(self, vfs: str, node: str) -> None:
        self.store.put(self.keyspace.intent(vfs), node)

    def clear_intent(self, vfs: str) -> None:
        self.store.delete(self.keyspace.intent(vfs))

    def put_specs(self, specs: Sequence[tuple[str, str, KeyRecord | None]]) -> bool:
        """Write VFS specs (name, spec, as seen) in one transaction, iff every one is still as seen
        (None: absent): all or none, and two operators' applies cannot silently overwrite each other."""
        return self.store.put_all_if_unchanged([(self.keyspace.spec(vfs), spec, seen) for vfs, spec, seen in specs])

    def delete_vfs(self, vfs: str) -> None:
        """Delete what operators wrote for a VFS (spec, intent, pause). Its holder then releases it
        (a planned release) and the status writer removes its status (controller/vfs_actions.py)."""
        for key in (self.keyspace.spec(vfs), self.keyspace.intent(vfs), self.keyspace.pause(vfs)):
            self.store.delete(key)

    def set_drain(self, node: str, note: str) -> None:
        self.store.put(self.keyspace.drain(node), note)

    def clear_drain(self, node: str) -> None:
        self.store.delete(self.keyspace.drain(node))

    def set_pause(self, vfs: str | None, note: str) -> None:
        """Pause one VFS, or (None) the whole cluster."""
        self.store.put(self.keyspace.pause(vfs) if vfs else self.keyspace.pause_all, note)

    def clear_pause(self, vfs: str | None) -> None:
        self.store.delete(self.keyspace.pause(vfs) if vfs else self.keyspace.pause_all)

    def set_epoch_base(self, value: int, seen: KeyRecord | None) -> bool:
        """Compare-and-set the epoch base (`nfs-ha raise-epoch`): iff it is still as `seen`."""
        return self.store.put_if_unchanged(self.keyspace.epoch_base, str(value), seen)

    def endpoint(self) -> str:
        """The etcd endpoint the store talks to now, for metrics ("" if it has no such notion)."""
        where = getattr(self.store, "endpoint_in_use", None)
        return str(where()) if callable(where) else ""

    def close(self) -> None:
        self.store.close()
