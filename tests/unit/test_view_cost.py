"""The view's cost grows with what changed (issue 9): a simulation with 1000 VFS that counts the work
of one watch event (specs parsed, VFS whose reconcilers it wakes) instead of timing it."""

from __future__ import annotations

import json

import pytest

import controller.view as view_mod
from controller.keyspace import Keyspace
from controller.placement import decide
from controller.view import ClusterView, KeyRecord

KS = Keyspace("/t")
N = 1000
NODES = ("node-a", "node-b", "node-c")


def spec(i: int) -> bytes:
    first = NODES[i % 3]
    return json.dumps({"vip": f"10.{i // 250}.{i % 250}.1/24",
                       "candidates": [first, *(n for n in NODES if n != first)]}).encode()


def big_view() -> ClusterView:
    keys: dict[str, KeyRecord] = {}
    rev = 1
    for i in range(N):
        name = f"v{i}"
        keys[KS.spec(name)] = KeyRecord(spec(i), rev, rev, 0)
        owner = json.dumps({"node": NODES[i % 3], "vip": json.loads(spec(i))["vip"]}).encode()
        keys[KS.owner(name)] = KeyRecord(owner, rev + 1, rev + 1, 7)
        keys[KS.status(name)] = KeyRecord(b'{"phase": "serving"}', rev + 1, rev + 1, 0)
        rev += 2
    for node in NODES:
        keys[KS.node(node)] = KeyRecord(b"{}", rev, rev, 9)
    return ClusterView(KS, rev, keys)


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every spec parse from here on (the memo is cleared so none hides in it)."""
    seen: list[str] = []
    real = view_mod.parse_spec
    view_mod._parse_memo.cache_clear()
    monkeypatch.setattr(view_mod, "parse_spec", lambda name, raw: (seen.append(name), real(name, raw))[1])
    return seen


def test_a_status_event_parses_nothing_and_wakes_its_vfs_only(parses: list[str]) -> None:
    view = big_view()
    parses.clear()
    event = (KS.status("v17"), KeyRecord(b'{"phase": "releasing"}', 3, view.revision + 1, 0), view.revision + 1)
    after = view.applied(0, [event])
    assert parses == []
    assert after.affected(view, [event[0]]) == {"v17"}


def test_a_spec_event_parses_that_spec_once_and_wakes_its_vip_rivals(parses: list[str]) -> None:
    view = big_view()
    parses.clear()
    rev = view.revision + 1
    # v5 takes v6's VIP: v5's spec is parsed (once), and v5 and v6 are woken, nobody else
    event = (KS.spec("v5"), KeyRecord(spec(6), 9, rev, 0), rev)
    after = view.applied(0, [event])
    assert parses == ["v5"]
    assert after.affected(view, [event[0]]) == {"v5", "v6"}
    assert "already used by VFS 'v6'" in after.config("v5").error or "in use by VFS 'v6'" in after.config("v5").error


def test_config_and_decide_of_one_vfs_do_not_scan_the_others(parses: list[str], monkeypatch) -> None:
    view = big_view()
    parses.clear()

    def scan(*_args: object) -> None:
        raise AssertionError("a per-VFS decision scanned every VFS")

    monkeypatch.setattr(ClusterView, "vfs_names", scan)
    monkeypatch.setattr(Keyspace, "parse", scan)  # the index answers; no key is looked at again
    config = view.config("v42")
    assert config.spec is not None and config.error == ""
    held = config.spec.vip_cidr  # v42 is node-a's, held by this agent
    assert decide("node-a", config, view.owner("v42"), view.live_nodes(), held).action.value == "nothing"
    assert parses == []


def test_a_resync_reuses_every_unchanged_parse(parses: list[str]) -> None:
    view = big_view()
    parses.clear()
    keys = dict(view.keys)
    rev = view.revision + 1
    keys[KS.spec("v3")] = KeyRecord(spec(3) + b" ", 5, rev, 0)  # changed since (same VIP)
    reloaded = ClusterView.loaded(KS, rev, keys, previous=view)
    assert parses == ["v3"]
    assert reloaded.config("v999").spec == view.config("v999").spec


def test_the_index_matches_a_full_rebuild_after_events() -> None:
    """Incremental and from-scratch indexes agree (deletes, VIP moves, owners coming and going)."""
    view = big_view()
    rev = view.revision
    events = []
    for i in range(0, 60, 3):
        rev += 1
        events.append((KS.spec(f"v{i}"), KeyRecord(spec(i + 1), 1, rev, 0), rev))
        rev += 1
        events.append((KS.owner(f"v{i + 1}"), None, rev))
        rev += 1
        events.append((KS.spec(f"v{i + 2}"), None, rev))
        rev += 1
        events.append((KS.intent(f"v{i + 4}"), KeyRecord(b"node-c", rev, rev, 0), rev))
    rev += 1
    events.append((KS.node("node-b"), None, rev))  # a node leaves: who VFS wait for changes
    after = view.applied(0, events)
    rebuilt = ClusterView(KS, after.revision, dict(after.keys))
    for attr in ("fields", "nodes", "by_vip", "by_device", "owner_vip", "owners_by_vip", "junk", "intents",
                 "waiting_on", "backlog"):
        assert getattr(after.index, attr) == getattr(rebuilt.index, attr), attr
    assert {n: after.config(n) for n in after.vfs_names()} == {n: rebuilt.config(n) for n in rebuilt.vfs_names()}
