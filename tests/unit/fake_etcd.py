"""An in-memory etcd with the EtcdStore methods nfs-ha uses, for unit tests of the watch path
and of the agent's reconciler lifecycle.

It keeps what those tests lean on, as measured against etcd 3.4 (docs in /work/shared/FACTS.md):
- one revision per write or transaction, shared by all of its events;
- a delete event carries the revision of the delete;
- a watch from an old revision first replays history in batches of up to `batch_revs` distinct
  revisions, each batch with the header revision of the *current* store, then streams live events;
- create_revision 0 compares mean "the key does not exist"; revoking a lease deletes its keys.
Live events are delivered synchronously, in revision order, from the writer's thread.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable

from controller.store import OwnerCreated, StoreError, WatchBatch
from controller.view import KeyRecord

Event = tuple[str, KeyRecord | None, int]
Change = tuple[str, bytes | None, int]  # key, value (None: delete), lease


class FakeEtcd:
    timeout = 2.0

    def __init__(self, batch_revs: int = 1000) -> None:
        self.batch_revs = batch_revs
        self.revision = 1
        self.keys: dict[str, KeyRecord] = {}
        self.history: list[Event] = []
        self.watch_starts: list[int] = []  # start revision of every watch created
        self._watches: list[tuple[str, Callable[[WatchBatch | Exception], None]]] = []
        self._leases: dict[int, int] = {}
        self._lease_ids = itertools.count(0x1000)
        self._lock = threading.RLock()

    # --- writes ----------------------------------------------------------------------------

    def _commit(self, changes: Iterable[Change]) -> int:
        """Apply changes as one revision (a transaction); deliver them to live watches."""
        with self._lock:
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
            for prefix, callback in list(self._watches):
                mine = [e for e in events if e[0].startswith(prefix)]
                if mine:
                    callback(WatchBatch(self.revision, mine))
            return rev

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> None:
        self._commit([(key, value.encode() if isinstance(value, str) else value, lease or 0)])

    def delete(self, key: str) -> None:
        self._commit([(key, None, 0)])

    def _absent(self, key: str) -> bool:
        return key not in self.keys

    def create_owner(self, owner_key: str, owner_value: str, lease_id: int, also: dict[str, str],
                     read: str | None = None, unchanged: dict[str, int] | None = None) -> OwnerCreated | None:
        with self._lock:
            if not self._absent(owner_key):
                return None
            if any((self.keys[k].mod_revision if k in self.keys else 0) != rev for k, rev in (unchanged or {}).items()):
                return None
            epoch = self._commit([(owner_key, owner_value.encode(), lease_id),
                                  *((k, v.encode(), 0) for k, v in also.items())])
            rec = self.keys.get(read) if read is not None else None
            return OwnerCreated(epoch, rec.value if rec else None)

    def put_if_epoch(self, owner_key: str, epoch: int, puts: dict[str, str], delete_owner: bool = False) -> bool:
        with self._lock:
            owner = self.keys.get(owner_key)
            if (owner.create_revision if owner else 0) != epoch:
                return False
            changes: list[Change] = [(k, v.encode(), 0) for k, v in puts.items()]
            if delete_owner:
                changes.append((owner_key, None, 0))
            self._commit(changes)
            return True

    def delete_if_no_owner(self, owner_key: str, keys: Iterable[str], absent: Iterable[str] = ()) -> bool:
        with self._lock:
            if not all(self._absent(k) for k in (owner_key, *absent)):
                return False
            self._commit([(k, None, 0) for k in keys])
            return True

    # --- leases ----------------------------------------------------------------------------

    def grant(self, ttl: int) -> tuple[int, int]:
        with self._lock:
            lease = next(self._lease_ids)
            self._leases[lease] = ttl
            return lease, ttl

    def keepalive(self, lease_id: int, client: object = None) -> int:
        with self._lock:
            return self._leases.get(lease_id, 0)

    def revoke(self, lease_id: int) -> None:
        with self._lock:
            self._leases.pop(lease_id, None)
            self._commit([(k, None, 0) for k, r in self.keys.items() if r.lease == lease_id])

    # --- reads and watches -------------------------------------------------------------------

    def load(self, prefix: str) -> tuple[int, dict[str, KeyRecord]]:
        with self._lock:
            return self.revision, {k: r for k, r in self.keys.items() if k.startswith(prefix)}

    def get(self, key: str) -> KeyRecord | None:
        with self._lock:
            return self.keys.get(key)

    def watch(self, prefix: str, start_revision: int, on_batch: Callable[[WatchBatch | Exception], None]) -> int:
        with self._lock:
            self.watch_starts.append(start_revision)
            batch: list[Event] = []
            revs: set[int] = set()
            for event in self.history:
                if event[2] < start_revision or not event[0].startswith(prefix):
                    continue
                if len(revs) == self.batch_revs and event[2] not in revs:
                    on_batch(WatchBatch(self.revision, batch))  # header: the current revision
                    batch, revs = [], set()
                batch.append(event)
                revs.add(event[2])
            if batch:
                on_batch(WatchBatch(self.revision, batch))
            self._watches.append((prefix, on_batch))
            return len(self.watch_starts)

    def break_watches(self, then: Callable[[], None] = lambda: None) -> None:
        """End every watch with an error (a lost stream); `then` runs before anyone can re-watch."""
        with self._lock:
            watches, self._watches = self._watches, []
            for _prefix, callback in watches:
                callback(StoreError("watch stream lost (fake)"))
            then()

    def close(self) -> None:
        pass
