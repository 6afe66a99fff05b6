"""The operator's commands (controller/operate.py) against the in-memory store, and the placement rules
behind drain and pause (controller/placement.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller import cli, operate
from controller.coordination import Coordination
from controller.keyspace import Keyspace
from controller.memstore import MemStore
from controller.placement import Action, decide, preference
from tests.unit.test_view_and_placement import KS, make, rec

PLACED = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b", "node-c"]}
HELD = "10.77.0.100/24"


# --- placement: drain and pause -------------------------------------------------------------------

def test_a_drained_node_comes_last_and_its_vfs_moves_to_the_next_one() -> None:
    v = make(PLACED, owner="node-a", extra={KS.drain("node-a"): rec("{}")})
    assert preference(v.config("home"), v.live_nodes()) == ["node-b", "node-c", "node-a"]
    d = decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), HELD)
    assert d.action is Action.RELEASE and d.reason == "drain: move to node-b"


def test_a_drained_node_is_the_last_resort_when_the_others_back_off() -> None:
    """A drained node gave its VFS to node-b, whose takeover failed: the VFS must not stay down."""
    backoff = {KS.node("node-b"): rec({"backoff": {"home": "mount failed"}})}
    v = make({**PLACED, "candidates": ["node-a", "node-b"]}, nodes=("node-a",),
             extra={**backoff, KS.drain("node-a"): rec("{}")})
    assert preference(v.config("home"), v.live_nodes()) == ["node-b", "node-a"]
    assert decide("node-a", v.config("home"), None, v.live_nodes(), None).action is Action.ACQUIRE
    v = make({**PLACED, "candidates": ["node-a", "node-b"]}, owner="node-a", nodes=("node-a",),
             extra={**backoff, KS.drain("node-a"): rec("{}")})
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), HELD).action is Action.NOTHING


def test_a_drain_never_stops_a_vfs_that_has_nowhere_to_go() -> None:
    v = make(PLACED, owner="node-a", nodes=("node-a",), extra={KS.drain("node-a"): rec("{}")})
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), HELD).action is Action.NOTHING


def test_nobody_releases_to_a_drained_intent_node() -> None:
    v = make(PLACED, owner="node-a", intent="node-b", extra={KS.drain("node-b"): rec("{}")})
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), HELD).action is Action.NOTHING


def test_a_node_cannot_undrain_itself_by_what_it_publishes() -> None:
    v = make(PLACED, extra={KS.node("node-a"): rec({"drained": False}), KS.drain("node-a"): rec("{}")})
    assert v.live_nodes()["node-a"]["drained"] is True
    v = make(PLACED, extra={KS.node("node-a"): rec({"drained": True})})
    assert not v.live_nodes()["node-a"]["drained"]


@pytest.mark.parametrize("pause_key", [KS.pause("home"), KS.pause_all])
def test_a_paused_vfs_does_not_move(pause_key: str) -> None:
    pause = {pause_key: rec("{}")}
    v = make(PLACED, extra=pause)  # unowned: nobody takes it
    assert v.config("home").paused
    assert decide("node-a", v.config("home"), None, v.live_nodes(), None).action is Action.NOTHING
    v = make(PLACED, owner="node-a", intent="node-b", extra={**pause, KS.drain("node-a"): rec("{}")})
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), HELD).action is Action.NOTHING
    v = make(PLACED, owner="node-a", extra=pause)  # a stale key of this node's earlier run is still cleared
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), None).action is Action.CLEAR_STALE


def test_status_shows_pause_and_drain_as_degraded() -> None:
    serving = {KS.status("home"): rec({"phase": "serving", "node": "node-b", "epoch": 50, "error": ""})}
    v = make(PLACED, owner="node-b", extra={**serving, KS.pause("home"): rec("{}"), KS.drain("node-a"): rec("{}")})
    data = cli.collect(v)
    assert data["health"]["code"] == 1
    assert data["health"]["reasons"] == ["home is paused", "node node-a is drained"]
    assert "serving (paused)" in cli.render(data) and "yes (drained)" in cli.render(data)


# --- the commands ---------------------------------------------------------------------------------

def store() -> Coordination:
    return Coordination(MemStore(), Keyspace("/t"))


def ns(**kw: object) -> object:
    import argparse

    return argparse.Namespace(**kw)


def write(tmp_path: Path, text: str, name: str = "specs.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


YAML = """
home:
  vip: 10.77.0.100/24
  candidates: [node-a, node-b]
work:
  vip: 10.77.0.101/24
  candidates: [node-b, node-a]
"""


def test_apply_shows_the_diff_writes_what_changed_and_a_dry_run_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = store()
    path = write(tmp_path, YAML)
    assert operate.cmd_apply(s, ns(file=path, dry_run=True)) == 0
    assert s.spec_record("home") is None and "+  \"vip\": \"10.77.0.100/24\"" in capsys.readouterr().out
    assert operate.cmd_apply(s, ns(file=path, dry_run=False)) == 0
    assert json.loads(s.spec_record("home").value)["candidates"] == ["node-a", "node-b"]
    assert "home: created" in capsys.readouterr().out
    changed = write(tmp_path, json.dumps({"home": {"vip": "10.77.0.100/24", "candidates": ["node-b"]}}), "c.json")
    assert operate.cmd_apply(s, ns(file=changed, dry_run=False)) == 0
    out = capsys.readouterr().out
    assert '-    "node-a",' in out and "home: changed" in out
    assert operate.cmd_apply(s, ns(file=changed, dry_run=False)) == 0
    assert "home: unchanged" in capsys.readouterr().out


def test_apply_writes_nothing_when_any_spec_is_bad_or_clashes(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    s = store()
    bad = write(tmp_path, YAML + "broken:\n  vip: 300.1.1.1/24\n  candidates: [node-a]\n")
    assert operate.cmd_apply(s, ns(file=bad, dry_run=False)) == 2
    assert "broken:" in capsys.readouterr().err and s.spec_record("home") is None
    clash = write(tmp_path, YAML.replace("10.77.0.101", "10.77.0.100"), "clash.yaml")
    assert operate.cmd_apply(s, ns(file=clash, dry_run=False)) == 2
    assert "VIP 10.77.0.100 is already used by VFS 'home'" in capsys.readouterr().err
    assert s.spec_record("home") is None and s.spec_record("work") is None
    assert operate.cmd_validate(None, ns(file=write(tmp_path, "[1, 2]", "list.yaml"))) == 2
    assert "expected a mapping of VFS names to specs" in capsys.readouterr().err


def test_apply_refuses_to_overwrite_a_spec_changed_since_it_was_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    s = store()
    assert operate.cmd_apply(s, ns(file=write(tmp_path, YAML), dry_run=False)) == 0
    real_view = operate._view

    def racing(st: Coordination) -> object:  # another operator writes between our read and our write
        view = real_view(st)
        st.store.put(st.keyspace.spec("home"), '{"vip": "10.77.0.100/24", "candidates": ["node-c"]}')
        return view

    monkeypatch.setattr(operate, "_view", racing)
    changed = write(tmp_path, YAML.replace("[node-a, node-b]", "[node-b]"), "changed.yaml")
    assert operate.cmd_apply(s, ns(file=changed, dry_run=False)) == 2
    assert "a spec of home changed in etcd since it was read; nothing written" in capsys.readouterr().err
    assert json.loads(s.spec_record("home").value)["candidates"] == ["node-c"]


def test_apply_writes_every_changed_spec_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Two specs change; another operator changes one of them meanwhile: neither is written."""
    s = store()
    assert operate.cmd_apply(s, ns(file=write(tmp_path, YAML), dry_run=False)) == 0
    before = {n: s.spec_record(n) for n in ("home", "work")}
    real_view = operate._view

    def racing(st: Coordination) -> object:
        view = real_view(st)
        st.store.put(st.keyspace.spec("work"), '{"vip": "10.77.0.101/24", "candidates": ["node-c"]}')
        return view

    monkeypatch.setattr(operate, "_view", racing)
    both = write(tmp_path, YAML.replace("candidates: [node-a, node-b]", "candidates: [node-a]")
                 .replace("candidates: [node-b, node-a]", "candidates: [node-b]"), "both.yaml")
    assert operate.cmd_apply(s, ns(file=both, dry_run=False)) == 2
    assert "nothing written" in capsys.readouterr().err
    assert s.spec_record("home") == before["home"]  # not written although its own compare held


def test_move_wait_says_why_the_vfs_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    s = store()
    s.store.put(KS_T.spec("home"), json.dumps({"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]}))
    s.store.put(KS_T.node("node-b"), json.dumps({"refused": {"home": "storage.device /dev/sdz is not allowed"}}))
    code = operate.cmd_move(s, ns(vfs="home", node="node-b", clear=False, wait=True, timeout=0.3))
    assert code == 1
    assert "node-b refuses it: storage.device /dev/sdz is not allowed" in capsys.readouterr().err
    assert s.store.get(KS_T.intent("home")).value == b"node-b"
    assert operate.cmd_move(s, ns(vfs="home", node=None, clear=True, wait=False, timeout=1)) == 0
    assert s.store.get(KS_T.intent("home")) is None
    assert operate.cmd_move(s, ns(vfs="home", node="node-z", clear=False, wait=False, timeout=1)) == 2


def test_drain_pause_and_delete_write_their_keys(capsys: pytest.CaptureFixture[str]) -> None:
    s = store()
    s.store.put(KS_T.spec("home"), json.dumps({"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]}))
    assert operate.cmd_drain(s, ns(node="node-a", wait=True, timeout=1)) == 0  # holds nothing already
    assert s.store.get(KS_T.drain("node-a")) is not None
    assert operate.cmd_undrain(s, ns(node="node-a")) == 0 and s.store.get(KS_T.drain("node-a")) is None
    assert operate.cmd_pause(s, ns(vfs="home", all=False)) == 0 and s.store.get(KS_T.pause("home")) is not None
    assert operate.cmd_pause(s, ns(vfs=None, all=True)) == 0 and s.store.get(KS_T.pause_all) is not None
    assert operate.cmd_resume(s, ns(vfs=None, all=True)) == 0 and s.store.get(KS_T.pause_all) is None
    assert operate.cmd_delete(s, ns(vfs="home", wait=True, timeout=1)) == 0
    assert s.store.get(KS_T.spec("home")) is None and s.store.get(KS_T.pause("home")) is None
    assert operate.cmd_delete(s, ns(vfs="home", wait=True, timeout=1)) == 2


def test_the_cli_prints_a_completion_script(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--print-completion", "bash"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "drain" in out and "raise-epoch" in out and "complete" in out


KS_T = Keyspace("/t")


@pytest.mark.parametrize(("text", "message"), [
    ("home: {vip: 10.77.0.100/24, candidates: [node-a], note: 2024-01-01}", "not a JSON-compatible spec"),
    ("home: {vip: 10.77.0.100/24, candidates: [node-a], 1: x}", "not a JSON-compatible spec"),
    ("a: &x [1, 1]\nb: &y [*x, *x]\nc: [*y, *y]\n", "YAML aliases (*name) are not accepted"),
    ("home: " + "[" * 5000 + "]" * 5000, "nested too deeply"),
    ("home: {vip: [unclosed", "neither JSON nor YAML"),
    ("{1: {vip: 10.77.0.100/24}}", "invalid VFS name"),
])
def test_bad_spec_files_are_refused_with_a_reason_not_a_traceback(tmp_path: Path, text: str, message: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert operate.cmd_validate(None, ns(file=write(tmp_path, text))) == 2
    assert message in capsys.readouterr().err


def test_a_huge_file_is_refused_without_reading_it_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert operate.cmd_validate(None, ns(file="/dev/zero")) == 2
    assert "larger than" in capsys.readouterr().err


def test_an_apply_that_would_make_another_vfs_invalid_writes_nothing(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Changing an older spec to the device of a newer VFS that is not in the file: the agents would
    give the device to the older spec (or refuse both): checked on every VFS, not only the file's."""
    s = store()
    disk = {"storage": {"device": "/dev/loop7", "fstype": "xfs"},
            "exports": [{"pseudo": "/x", "clients": ["10.77.0.0/24"]}]}
    s.store.put(KS_T.spec("old"), json.dumps({"vip": "10.77.0.100/24", "candidates": ["node-a"]}))
    s.store.put(KS_T.spec("new"), json.dumps({"vip": "10.77.0.101/24", "candidates": ["node-a"], **disk}))
    path = write(tmp_path, json.dumps({"old": {"vip": "10.77.0.100/24", "candidates": ["node-a"], **disk}}))
    assert operate.cmd_apply(s, ns(file=path, dry_run=False)) == 2
    assert "new: invalid spec: device /dev/loop7 is already used by VFS 'old'" in capsys.readouterr().err
    assert "storage" not in json.loads(s.spec_record("old").value)
