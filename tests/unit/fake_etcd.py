"""The in-memory etcd of the older unit tests (watch path, agent lifecycle): controller.memstore.MemStore
under its old name.

Everything they lean on lives in MemStore now, with the same semantics (one revision per write or
transaction; delete events at the delete's revision; catch-up in batches of `batch_revs` revisions,
each with the current revision as header; `history`, `watch_starts`, `break_watches`), checked against
a real etcd by tests/unit/test_coordination_contract.py.
"""

from __future__ import annotations

from controller.memstore import DEFAULT_BATCH_REVS, Change, Event, MemStore

__all__ = ["Change", "Event", "FakeEtcd"]


class FakeEtcd(MemStore):
    """MemStore on the real monotonic clock (its leases expire in real time, like etcd's)."""

    def __init__(self, batch_revs: int = DEFAULT_BATCH_REVS) -> None:
        super().__init__(batch_revs=batch_revs)
