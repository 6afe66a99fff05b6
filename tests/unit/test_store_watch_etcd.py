"""controller/store.py's watch against a real etcd on loopback: re-creating the watch (as the
watcher does after an error) must not feed the old stream's end back as an error of the new one."""

from __future__ import annotations

import threading
import time

from controller.store import EtcdStore, WatchBatch
from tests.unit.conftest import needs_etcd

pytestmark = needs_etcd  # the `etcd` fixture (a fresh etcd on loopback) is in conftest.py


def test_a_recreated_watch_gets_no_error_from_the_one_it_replaced(etcd: str) -> None:
    store = EtcdStore(etcd)
    got: list[WatchBatch | Exception] = []
    lock = threading.Lock()

    def on_batch(item: WatchBatch | Exception) -> None:
        with lock:
            got.append(item)

    try:
        revision, _ = store.load("/t/")
        for _ in range(5):  # as the watcher does on every reconnect
            store.watch("/t/", revision + 1, on_batch)
        store.put("/t/a", "1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with lock:
                if any(isinstance(i, WatchBatch) and i.events for i in got):
                    break
            time.sleep(0.05)
        time.sleep(0.5)  # anything a closed stream still delivers
        with lock:
            errors = [i for i in got if isinstance(i, Exception)]
            events = [e for i in got if isinstance(i, WatchBatch) for e in i.events]
        assert errors == []
        assert [(key, rec.value) for key, rec, _rev in events] == [("/t/a", b"1")]  # once: from the live watch
    finally:
        store.close()


def test_owner_creation_fails_when_the_status_it_was_decided_on_changed(etcd: str) -> None:
    store = EtcdStore(etcd)
    try:
        store.put("/t/vfs/home/status", '{"state": "error", "disk_at_risk": true}')
        seen = store.get("/t/vfs/home/status")
        assert seen is not None
        store.put("/t/vfs/home/status", '{"state": "error", "disk_at_risk": true, "lost_release_bound": 60}')
        lease, _ttl = store.grant(5)
        stale = store.create_owner("/t/vfs/home/owner", "{}", lease, {"/t/vfs/home/status": "{}"},
                                   unchanged={"/t/vfs/home/status": seen.mod_revision})
        assert stale is None and store.get("/t/vfs/home/owner") is None
        now = store.get("/t/vfs/home/status")
        assert now is not None and b"lost_release_bound" in now.value  # not overwritten unseen
        created = store.create_owner("/t/vfs/home/owner", "{}", lease, {"/t/vfs/home/status": "{}"},
                                     unchanged={"/t/vfs/home/status": now.mod_revision})
        assert created is not None and store.get("/t/vfs/home/owner") is not None
        absent = store.create_owner("/t/vfs/other/owner", "{}", lease, {},
                                    unchanged={"/t/vfs/other/status": 0})  # 0: the status must be absent
        assert absent is not None
    finally:
        store.close()
