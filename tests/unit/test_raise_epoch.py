"""`nfs-ha raise-epoch N`: the recovery after etcd was restored from a snapshot."""

import argparse

from controller.cli import cmd_raise_epoch
from controller.coordination import Coordination
from controller.keyspace import Keyspace
from controller.view import KeyRecord

KS = Keyspace("/t")


class Store:
    def __init__(self, value: bytes | None = None, races: int = 0) -> None:
        self.rec = KeyRecord(value, 5, 5, 0) if value is not None else None
        self.races = races  # how many compare-and-sets lose to a concurrent writer first

    def get(self, key: str) -> KeyRecord | None:
        assert key == KS.epoch_base
        return self.rec

    def put_if_unchanged(self, key: str, value: str, seen: KeyRecord | None) -> bool:
        if self.races:
            self.races -= 1
            self.rec = KeyRecord(b"10", 6, 6 + self.races, 0)
            return False
        assert seen == self.rec
        self.rec = KeyRecord(value.encode(), 5, 7, 0)
        return True


def run(store: Store, epoch: str) -> int:
    return cmd_raise_epoch(Coordination(store, KS), argparse.Namespace(epoch=epoch))  # type: ignore[arg-type]


def test_raises_and_never_lowers(capsys) -> None:
    store = Store()
    assert run(store, "1834") == 0 and store.rec is not None and store.rec.value == b"1834"
    assert run(store, "100") == 0 and store.rec.value == b"1834"
    assert "already 1834" in capsys.readouterr().out


def test_retries_when_another_writer_races() -> None:
    store = Store(races=2)
    assert run(store, "500") == 0 and store.rec is not None and store.rec.value == b"500"


def test_bad_numbers_are_refused_and_change_nothing(capsys) -> None:
    store = Store(b"7")
    for bad in ("-1", "0", "abc", "1e9", "²", "9" * 19, ""):
        assert run(store, bad) == 2
    assert store.rec is not None and store.rec.value == b"7"
    assert "whole number" in capsys.readouterr().err


def test_status_shows_loop_errors_and_drops_junk() -> None:
    from controller.cli import collect, render
    from controller.view import ClusterView

    reg = KeyRecord(b'{"loop_errors": {"keepalive": {"count": 3, "last": "x"}, "junk": {"count": "many"}, '
                    b'"bad": 5}, "reset": "none"}', 1, 1, 0)
    data = collect(ClusterView(KS, 1, {KS.node("node-a"): reg}))
    assert data["nodes"][0]["loop_errors"] == {"keepalive": 3} and data["nodes"][0]["reset"] == "none"
    assert "keepalive:3" in render(data)
