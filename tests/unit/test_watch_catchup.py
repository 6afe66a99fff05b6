"""The view follows the revisions of the events it applied, never a watch header's.

etcd replays what a re-created watch missed in batches of up to 1000 revisions, each carrying
the header revision of the current store; a view that took the header would skip every event
after the first batch (FACTS.md, measured against etcd 3.4; tests/unit/fake_etcd.py mimics it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from controller.coordination import Coordination
from controller.keyspace import Keyspace
from controller.view import ClusterView, KeyRecord
from controller.watcher import ViewKeeper
from tests.unit.fake_etcd import FakeEtcd

KS = Keyspace("/t")


def rec(value: str, rev: int) -> KeyRecord:
    return KeyRecord(value.encode(), rev, rev, 0)


class Views:
    """The views a ViewKeeper published, and a way to wait for one."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.last: ClusterView | None = None

    def __call__(self, view: ClusterView) -> None:
        with self.cond:
            self.last = view
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[ClusterView], bool], timeout: float = 3.0) -> ClusterView:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.last is None or not pred(self.last):
                left = deadline - time.monotonic()
                if left <= 0:
                    n = len(self.last.keys) if self.last else None
                    rev = self.last.revision if self.last else None
                    pytest.fail(f"no such view in {timeout}s; last has {n} keys at revision {rev}")
                self.cond.wait(left)
            return self.last


@pytest.fixture
def keeper() -> Iterator[tuple[FakeEtcd, ViewKeeper, Views]]:
    store = FakeEtcd()
    views = Views()
    vk = ViewKeeper(Coordination(store, KS), views, resync_seconds=3600)  # no full load may hide a skipped event
    yield store, vk, views
    vk.stop()


def test_catch_up_of_3000_events_in_3_batches_is_applied_in_full(keeper):
    store, vk, views = keeper
    store.put(KS.spec("first"), "{}")
    vk.load()
    vk.start()
    views.wait_for(lambda v: v.revision == store.revision)
    assert store.watch_starts == [store.revision + 1]
    start = store.revision
    names = [f"v{i}" for i in range(3000)]

    def write_while_disconnected() -> None:
        for name in names:
            store.put(KS.intent(name), "node-a")
        store.delete(KS.spec("first"))

    # The stream breaks; 3001 writes happen before the watch can be re-created, which then
    # gets them as catch-up: 3 batches of 1000 revisions and one of 1, each with header = final.
    batches = []
    real_watch = store.watch

    def recording_watch(prefix, start_revision, on_batch):
        return real_watch(prefix, start_revision, lambda b: (batches.append(b), on_batch(b)))

    store.watch = recording_watch
    store.break_watches(then=write_while_disconnected)
    final = store.revision
    view = views.wait_for(lambda v: v.revision == final)
    assert [len(b.events) for b in batches] == [1000, 1000, 1000, 1]
    assert {b.revision for b in batches} == {final}
    assert all(view.raw_intent(n) == "node-a" for n in names)
    assert KS.spec("first") not in view.keys  # the delete in the last batch, at its own revision
    assert store.watch_starts[-1] == start + 1

    # The next reconnect resumes after the last event applied, not before or past it.
    store.break_watches(then=lambda: store.put(KS.intent("late"), "node-b"))
    view = views.wait_for(lambda v: v.raw_intent("late") == "node-b")
    assert store.watch_starts[-1] == final + 1
    assert len(view.keys) == 3001


def test_view_revision_is_that_of_the_last_event_not_the_header():
    v = ClusterView(KS, 10, {})
    batch1 = [(KS.intent(f"a{i}"), rec("node-a", i), i) for i in range(11, 14)]
    v1 = v.applied(1000, batch1)
    assert v1.revision == 13
    batch2 = [(KS.intent(f"b{i}"), rec("node-a", i), i) for i in range(14, 16)] + [(KS.intent("a11"), None, 16)]
    v2 = v1.applied(1000, batch2)
    assert v2.revision == 16
    assert v2.raw_intent("b14") == "node-a" and v2.raw_intent("a11") is None


def test_progress_notification_does_not_advance_the_view():
    v = ClusterView(KS, 10, {KS.intent("home"): rec("node-a", 9)})
    assert v.applied(500, []).revision == 10
    # ... so an event below that header, delivered later, is still applied.
    assert v.applied(500, []).applied(500, [(KS.intent("home"), None, 11)]).raw_intent("home") is None


def test_events_of_one_transaction_share_a_revision_and_all_apply():
    v = ClusterView(KS, 10, {})
    txn = [(KS.owner("home"), rec('{"node": "node-a"}', 11), 11), (KS.status("home"), rec("{}", 11), 11)]
    v1 = v.applied(11, txn)
    assert set(v1.keys) == {KS.owner("home"), KS.status("home")} and v1.revision == 11


def test_events_the_view_already_has_are_skipped():
    v = ClusterView(KS, 20, {KS.intent("home"): rec("node-b", 20)})
    v1 = v.applied(30, [(KS.intent("home"), rec("node-a", 15), 15)])
    assert v1.raw_intent("home") == "node-b" and v1.revision == 20


def test_etcd_restored_from_a_snapshot_is_followed_after_the_next_resync():
    """etcd restored from a snapshot: revisions go back. A watch from the old revision + 1 would wait
    for numbers the store reaches only much later; the next resync sees the lower revision, reloads
    and watches again from there, so new writes reach the view."""
    store = FakeEtcd()
    views = Views()
    went_back: list[tuple[int, int | None]] = []  # (revision told, revision published before it)
    vk = ViewKeeper(Coordination(store, KS), views, resync_seconds=0.2,
                    on_went_back=lambda v: went_back.append((v.revision, views.last.revision if views.last else None)))
    try:
        store.put(KS.spec("home"), "{}")
        snapshot_rev, snapshot_keys = store.revision, dict(store.keys)
        for i in range(40):
            store.put(KS.intent(f"v{i}"), "node-a")
        vk.load()
        vk.start()
        views.wait_for(lambda v: v.revision == store.revision)

        def restore() -> None:
            store.revision, store.keys = snapshot_rev, dict(snapshot_keys)
            store.history = [e for e in store.history if e[2] <= snapshot_rev]

        store.break_watches(then=restore)
        views.wait_for(lambda v: v.revision == snapshot_rev and KS.intent("v0") not in v.keys)
        store.put(KS.intent("home"), "node-b")  # numbered anew: snapshot_rev + 1
        view = views.wait_for(lambda v: KS.intent("home") in v.keys)
        assert view.raw_intent("home") == "node-b" and store.watch_starts[-1] == snapshot_rev + 1
        # told once, before the restored view was published (the agent holds takeovers off first)
        assert went_back == [(snapshot_rev, snapshot_rev + 40)]
    finally:
        vk.stop()


def test_a_resync_wakes_only_the_vfs_whose_keys_it_finds_changed() -> None:
    """The periodic full load is a safety net for a watch that hangs silently; when it finds what the
    view already has (the usual case) it must not wake every reconciler (O(VFS) every 10 s)."""
    store = FakeEtcd()
    vk = ViewKeeper(Coordination(store, KS), lambda _view: None, resync_seconds=3600)
    for i, name in enumerate(("a", "b", "c")):  # VIPs of their own: no clash check ties them together
        store.put(KS.spec(name), f'{{"vip": "10.77.0.{10 + i}/24", "candidates": ["n1"]}}')
    vk.load()
    assert vk.affected is None  # the first load: anything may have changed
    assert vk._reload_quietly() and vk.affected == set()  # nothing new
    store.put(KS.status("b"), '{"phase": "serving"}')  # a change the (unstarted) watch missed
    store.delete(KS.spec("c"))
    assert vk._reload_quietly() and vk.affected == {"b", "c"}
    assert vk.view.status("b") == {"phase": "serving"}
