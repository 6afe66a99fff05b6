"""MemStore: an in-memory etcd implementing controller.coordination.Coordination.

It keeps the contract the rest of nfs-ha leans on (checked against a real etcd 3.4 by
tests/unit/test_coordination_contract.py), so the reconcile loop, the lease keeper and the agent
can be unit-tested without root, network or an etcd binary:
- one revision per write or transaction that changes something, shared by all of its events;
- a delete event carries the revision of the delete;
- a watch from an old revision first replays history in batches of up to `batch_revs` distinct
  revisions, each with the header revision of the *current* store, then streams live events;
  one watch per client: a new one silently ends the previous one, as in EtcdStore;
- create_revision / mod_revision 0 in a compare means "the key does not exist";
- leases expire on an injectable clock: a lease is gone once `clock()` reaches the time of its
  grant or last keepalive + TTL, and then its keys are deleted in one revision (as etcd revokes
  it). There is no background thread: expiry is checked at the start of every call, and by
  expire(), so a test with a fake clock advances it and calls expire() (or any method);
- what etcd refuses fails with StoreError and writes nothing: a put or transaction with a lease
  that is gone, a transaction that puts a key twice or puts and deletes it, one with more than
  128 compares or operations in a branch, a request over 1.5 MiB (counted here on keys and values,
  so a few bytes of etcd's framing are not).

What it does not model: etcd's lateness in expiring leases (it expires exactly at the deadline),
the extension of every lease when etcd gets a new leader, progress notifications, timeouts and
connection failures (break_watches() simulates a lost stream), and authentication. Its smallest
TTL is `min_ttl` (default 1 s; etcd's is 2 s with default timings). A test that reads `keys`
directly sees an expired lease's keys until the next call (or expire()).

Watch batches are delivered synchronously, in revision order, on the thread of the call that made
the change (or that noticed an expiry), while the store's lock is held: on_batch must not block.

One MemStore is one client of one in-memory etcd; connect() gives another client of the same
etcd (its own watch, its own close), like a second EtcdStore on the same cluster, so several
agents can share one store in a test.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from controller.store import CallingLeaseStream, OwnerCreated, StoreError, WatchBatch
from controller.view import KeyRecord

Event = tuple[str, KeyRecord | None, int]
Change = tuple[str, bytes | None, int]  # key, value (None: delete), lease
Clock = Callable[[], float]

DEFAULT_BATCH_REVS = 1000  # etcd's catch-up batch (watchBatchMaxRevs), see FACTS.md
MAX_TXN_OPS = 128  # etcd's --max-txn-ops default: compares, and the operations of a branch, each at most
MAX_REQUEST_BYTES = 1536 * 1024  # etcd's --max-request-bytes default (counted here on keys and values only)


class RevisionCompactedError(StoreError):
    """A watch started below the compacted revision (named like pyetcd's, which controller/watcher.py
    recognises by "Compacted" in the type name)."""

    def __init__(self, compacted_revision: int) -> None:
        super().__init__(f"required revision {compacted_revision} has been compacted")
        self.compacted_revision = compacted_revision


@dataclass
class _Lease:
    ttl: int
    deadline: float  # clock() value at which the lease is gone


@dataclass
class _Watch:
    prefix: str
    start: int  # no event below this revision, replayed or live
    on_batch: Callable[[WatchBatch | Exception], None]


class _Etcd:
    """The state of one in-memory etcd, shared by all its clients (MemStore instances)."""

    def __init__(self, clock: Clock, batch_revs: int, min_ttl: int) -> None:
        self.lock = threading.RLock()  # reentrant: on_batch runs under it and may call the store
        self.clock = clock
        self.batch_revs = batch_revs
        self.min_ttl = min_ttl
        self.revision = 1  # as a fresh etcd
        self.compacted = 0
        self.keys: dict[str, KeyRecord] = {}
        self.history: list[Event] = []
        self.leases: dict[int, _Lease] = {}
        self.lease_ids = itertools.count(0x1000)
        self.watches: dict[int, _Watch] = {}  # client number -> its one watch
        self.clients = itertools.count(1)

    def commit(self, changes: Iterable[Change]) -> int:
        """Apply changes as one revision (a transaction); deliver them to live watches.

        A change that changes nothing (deleting an absent key) makes no event; no event at all,
        no revision (as etcd). Returns the revision of the changes, or the current one if none.
        """
        rev = self.revision + 1
        events: list[Event] = []
        for key, value, lease in changes:
            old = self.keys.get(key)
            if value is None:
                if old is None:
                    continue
                del self.keys[key]
                events.append((key, None, rev))
            else:
                rec = KeyRecord(value, old.create_revision if old else rev, rev, lease)
                self.keys[key] = rec
                events.append((key, rec, rev))
        if not events:
            return self.revision
        self.revision = rev
        self.history.extend(events)
        for watch in list(self.watches.values()):  # a callback may re-watch: iterate over a copy
            mine = [e for e in events if e[0].startswith(watch.prefix) and e[2] >= watch.start]
            if mine:
                watch.on_batch(WatchBatch(self.revision, mine))
        return rev

    def expire_due(self) -> list[int]:
        """Revoke every lease whose deadline has passed, oldest deadline first, each in its own
        revision (etcd revokes each expired lease by its own request)."""
        now = self.clock()
        due = sorted((lease.deadline, lid) for lid, lease in self.leases.items() if lease.deadline <= now)
        for _deadline, lid in due:
            self.revoke(lid)
        return [lid for _deadline, lid in due]

    def revoke(self, lease_id: int) -> None:
        if self.leases.pop(lease_id, None) is not None:
            self.commit([(k, None, 0) for k, r in self.keys.items() if r.lease == lease_id])

    def check_lease(self, lease_id: int) -> None:
        if lease_id and lease_id not in self.leases:
            raise StoreError(f"memstore: requested lease not found ({lease_id:x})")


def _check_request(puts: Sequence[tuple[str, bytes]], deletes: Sequence[str] = (),
                   compares: int = 0, reads: int = 0) -> None:
    """What etcd refuses before looking at the data: a request too large, a transaction with too many
    compares or operations, or one that puts a key twice or puts and deletes the same key."""
    if sum(len(k) + len(v) for k, v in puts) + sum(map(len, deletes)) > MAX_REQUEST_BYTES:
        raise StoreError("memstore: request is too large")
    if compares > MAX_TXN_OPS or len(puts) + len(deletes) + reads > MAX_TXN_OPS:
        raise StoreError("memstore: too many operations in txn request")
    seen: set[str] = set()
    for key, _value in puts:
        if key in seen:
            raise StoreError(f"memstore: duplicate key given in txn request ({key})")
        seen.add(key)
    clash = seen.intersection(deletes)
    if clash:
        raise StoreError(f"memstore: duplicate key given in txn request ({min(clash)})")


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class _Client:
    """What new_client() hands out: only keepalive() takes it."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout


class MemStore:
    """An in-memory etcd client (see the module docstring); implements Coordination."""

    def __init__(self, clock: Clock = time.monotonic, *, batch_revs: int = DEFAULT_BATCH_REVS,
                 min_ttl: int = 1, timeout: float = 2.0) -> None:
        # min_ttl: the smallest TTL granted; etcd's is 2 s with default timings, 1 s with a
        # 500 ms election timeout (FACTS.md).
        self._init(_Etcd(clock, batch_revs, min_ttl), timeout)

    def _init(self, etcd: _Etcd, timeout: float) -> None:
        self._etcd = etcd
        self._number = next(etcd.clients)
        self.timeout = timeout
        self.watch_starts: list[int] = []  # start revision of every watch this client created
        self._closed = False

    def connect(self) -> MemStore:
        """Another client of the same in-memory etcd, with its own watch (like a second EtcdStore)."""
        other = object.__new__(type(self))
        MemStore._init(other, self._etcd, self.timeout)
        return other

    # --- state, for tests to inspect (and, with care, to rewrite: an etcd restored from a snapshot)

    @property
    def revision(self) -> int:
        return self._etcd.revision

    @revision.setter
    def revision(self, value: int) -> None:
        self._etcd.revision = value

    @property
    def keys(self) -> dict[str, KeyRecord]:
        return self._etcd.keys

    @keys.setter
    def keys(self, value: dict[str, KeyRecord]) -> None:
        self._etcd.keys = value

    @property
    def history(self) -> list[Event]:
        return self._etcd.history

    @history.setter
    def history(self, value: list[Event]) -> None:
        self._etcd.history = value

    @property
    def batch_revs(self) -> int:
        return self._etcd.batch_revs

    @batch_revs.setter
    def batch_revs(self, value: int) -> None:
        self._etcd.batch_revs = value

    @property
    def clock(self) -> Clock:
        return self._etcd.clock

    @contextlib.contextmanager
    def _op(self) -> Iterator[_Etcd]:
        """Every call: under the lock, refused once closed, and after expiring what is due."""
        with self._etcd.lock:
            if self._closed:
                raise StoreError("memstore: the store is closed")
            self._etcd.expire_due()
            yield self._etcd

    # --- time and faults -------------------------------------------------------------------------

    def expire(self) -> list[int]:
        """Expire the leases whose deadline the clock has reached (every call does it too);
        returns their ids. For tests with a fake clock: advance it, then call this."""
        with self._etcd.lock:
            if self._closed:
                raise StoreError("memstore: the store is closed")
            return self._etcd.expire_due()

    def lease_ids(self) -> list[int]:
        """The leases that exist (as of the last expiry check)."""
        with self._etcd.lock:
            return list(self._etcd.leases)

    def compact(self, revision: int) -> None:
        """Drop the history below `revision`: a later watch from below it gets RevisionCompactedError."""
        with self._op() as etcd:
            if revision <= etcd.compacted:
                raise StoreError(f"memstore: required revision {revision} has been compacted")
            if revision > etcd.revision:
                raise StoreError(f"memstore: required revision {revision} is a future revision")
            etcd.compacted = revision
            etcd.history = [e for e in etcd.history if e[2] >= revision]

    def break_watches(self, then: Callable[[], None] = lambda: None) -> None:
        """End every watch of every client with an error (a lost stream, an etcd restart); `then`
        runs before anyone can watch again (the lock is held)."""
        with self._etcd.lock:
            watches = list(self._etcd.watches.values())
            self._etcd.watches.clear()
            for watch in watches:
                watch.on_batch(StoreError("watch stream lost (memstore)"))
            then()

    # --- reads -----------------------------------------------------------------------------------

    def load(self, prefix: str) -> tuple[int, dict[str, KeyRecord]]:
        with self._op() as etcd:
            return etcd.revision, {k: r for k, r in etcd.keys.items() if k.startswith(prefix)}

    def get(self, key: str) -> KeyRecord | None:
        with self._op() as etcd:
            return etcd.keys.get(key)

    # --- watch -----------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int,
              on_batch: Callable[[WatchBatch | Exception], None]) -> int:
        with self._op() as etcd:
            self.watch_starts.append(start_revision)
            etcd.watches.pop(self._number, None)  # one watch per client: the old one ends silently
            start = start_revision if start_revision > 0 else etcd.revision + 1  # 0: from now on
            if start < etcd.compacted:
                on_batch(RevisionCompactedError(etcd.compacted))  # etcd cancels it: never registered
                return len(self.watch_starts)
            batch: list[Event] = []
            revs: set[int] = set()
            for event in etcd.history:
                if event[2] < start or not event[0].startswith(prefix):
                    continue
                if len(revs) == etcd.batch_revs and event[2] not in revs:
                    on_batch(WatchBatch(etcd.revision, batch))  # header: the current revision
                    batch, revs = [], set()
                batch.append(event)
                revs.add(event[2])
            if batch:
                on_batch(WatchBatch(etcd.revision, batch))
            # Registered under the same lock hold as the replay: no live event can fall in between.
            etcd.watches[self._number] = _Watch(prefix, start, on_batch)
            return len(self.watch_starts)

    def close(self) -> None:
        with self._etcd.lock:
            self._etcd.watches.pop(self._number, None)
            self._closed = True

    # --- leases ----------------------------------------------------------------------------------

    def new_client(self, timeout: float) -> _Client:
        with self._op():
            return _Client(timeout)

    def grant(self, ttl: int) -> tuple[int, int]:
        with self._op() as etcd:
            ttl = max(ttl, etcd.min_ttl)
            lease = next(etcd.lease_ids)
            etcd.leases[lease] = _Lease(ttl, etcd.clock() + ttl)
            return lease, ttl

    def lease_stream(self, on_answer: Callable[[int, int, int], None],
                     on_ended: Callable[[int], None]) -> CallingLeaseStream:
        return CallingLeaseStream(self.keepalive, on_answer, on_ended)

    def keepalive(self, lease_id: int, client: object = None) -> int:
        with self._op() as etcd:
            lease = etcd.leases.get(lease_id)  # an expired one is gone already (_op)
            if lease is None:
                return 0  # what etcd answers for a lease it does not know (measured: TTL 0)
            lease.deadline = etcd.clock() + lease.ttl
            return lease.ttl

    def revoke(self, lease_id: int) -> None:
        with self._op() as etcd:
            etcd.revoke(lease_id)

    # --- writes ----------------------------------------------------------------------------------

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> None:
        data = _bytes(value)
        with self._op() as etcd:
            _check_request([(key, data)])
            etcd.check_lease(lease or 0)
            etcd.commit([(key, data, lease or 0)])

    def delete(self, key: str) -> None:
        with self._op() as etcd:
            etcd.commit([(key, None, 0)])

    def create_owner(self, owner_key: str, owner_value: str, lease_id: int, also: dict[str, str],
                     read: str | None = None, unchanged: dict[str, int] | None = None) -> OwnerCreated | None:
        puts = [(owner_key, _bytes(owner_value)), *((k, _bytes(v)) for k, v in also.items())]
        with self._op() as etcd:
            # The success branch also reads the owner key back, and `read` if given.
            _check_request(puts, compares=1 + len(unchanged or {}), reads=1 + (read is not None))
            if owner_key in etcd.keys:
                return None
            for key, rev in (unchanged or {}).items():
                rec = etcd.keys.get(key)
                if (rec.mod_revision if rec else 0) != rev:
                    return None
            etcd.check_lease(lease_id)  # etcd checks the lease of the branch taken only
            epoch = etcd.commit([(k, v, lease_id if k == owner_key else 0) for k, v in puts])
            rec = etcd.keys.get(read) if read is not None else None
            return OwnerCreated(epoch, rec.value if rec else None)

    def put_if_epoch(self, owner_key: str, epoch: int, puts: dict[str, str], delete_owner: bool = False) -> bool:
        data = [(k, _bytes(v)) for k, v in puts.items()]
        with self._op() as etcd:
            _check_request(data, [owner_key] if delete_owner else [], compares=1)
            owner = etcd.keys.get(owner_key)
            if (owner.create_revision if owner else 0) != epoch:
                return False
            changes: list[Change] = [(k, v, 0) for k, v in data]
            if delete_owner:
                changes.append((owner_key, None, 0))
            etcd.commit(changes)
            return True

    def delete_if_no_owner(self, owner_key: str, keys: Iterable[str], absent: Iterable[str] = ()) -> bool:
        keys, absent = list(keys), list(absent)
        with self._op() as etcd:
            _check_request([], keys, compares=1 + len(absent))
            if any(k in etcd.keys for k in (owner_key, *absent)):
                return False
            etcd.commit([(k, None, 0) for k in keys])
            return True

    def put_if_unchanged(self, key: str, value: str, seen: KeyRecord | None) -> bool:
        return self.put_all_if_unchanged([(key, value, seen)])

    def put_all_if_unchanged(self, items: Sequence[tuple[str, str, KeyRecord | None]]) -> bool:
        puts = [(key, _bytes(value)) for key, value, _seen in items]
        with self._op() as etcd:
            _check_request(puts, compares=len(items))
            for key, _value, seen in items:
                rec = etcd.keys.get(key)
                if (rec.mod_revision if rec else None) != (seen.mod_revision if seen else None):
                    return False
            etcd.commit([(key, data, 0) for key, data in puts])
            return True
