"""`nfs-ha status` for monitoring: exit code 0 OK, 1 DEGRADED, 2 FAILING (controller/cli.py health()),
and --watch."""

from __future__ import annotations

import argparse
import json

import pytest

from controller import cli
from controller.cli import collect, health
from tests.unit.test_view_and_placement import KS, make, rec

SPEC = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]}
SERVING = {KS.status("home"): rec({"phase": "serving", "node": "node-a", "epoch": 50, "error": ""})}


def test_every_vfs_serving_is_ok() -> None:
    data = collect(make(SPEC, owner="node-a", nodes=("node-a", "node-b"), extra=SERVING))
    assert health(data) == (0, []) and data["health"]["state"] == "OK"
    assert cli.render(data).endswith("\n\nOK")


def test_a_vfs_nobody_serves_is_failing() -> None:
    data = collect(make(SPEC, nodes=("node-c",)))
    code, reasons = health(data)
    assert code == 2 and reasons[0].startswith("home is unplaced")


def test_served_but_with_something_to_look_at_is_degraded() -> None:
    data = collect(make(SPEC, owner="node-a", intent="node-b", nodes=("node-a",), extra=SERVING))
    code, reasons = health(data)
    assert code == 1
    assert "home is served by node-a, its intent asks for node-b" in reasons and "node node-b is down" in reasons
    backoff = {KS.node("node-b"): rec({"backoff": {"home": "probe: VIP answered by 02:00:00:00:00:09"}})}
    data = collect(make(SPEC, owner="node-a", nodes=("node-a",), extra={**SERVING, **backoff}))
    assert health(data) == (1, ["node node-b is backing off from home: probe: VIP answered by 02:00:00:00:00:09"])


def test_a_deleted_vfs_being_cleaned_up_does_not_count() -> None:
    leftover = {KS.status("gone"): rec({"phase": "unplaced", "node": None, "epoch": 0, "error": ""})}
    data = collect(make(SPEC, owner="node-a", nodes=("node-a", "node-b"), extra={**SERVING, **leftover}))
    assert health(data) == (0, [])


class Store:
    """What cmd_status reads, from a view; fails on the third call, then stops the watch."""

    def __init__(self) -> None:
        self.view = make(SPEC, nodes=("node-c",))
        self.keyspace = KS
        self.calls = 0

    def load(self) -> tuple[int, dict]:
        self.calls += 1
        if self.calls == 2:
            raise cli.StoreError("etcd range failed: UNAVAILABLE")
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.view.revision, dict(self.view.keys)


def test_watch_repeats_until_interrupted_and_returns_the_last_code(capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.time, "sleep", lambda _s: None)
    store = Store()
    code = cli.cmd_status(store, argparse.Namespace(json=True, watch=0.5))  # type: ignore[arg-type]
    out = capsys.readouterr()
    assert store.calls == 3 and code == 2
    assert json.loads(out.out.splitlines()[0])["health"]["state"] == "FAILING"  # one object per line
    assert "UNAVAILABLE" in out.err
