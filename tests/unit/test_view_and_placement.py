import json

from controller.keyspace import Keyspace
from controller.placement import Action, decide, preference
from controller.view import ClusterView, KeyRecord

KS = Keyspace("/t")


def rec(value, create=1, lease=0):
    if not isinstance(value, (str, bytes)):
        value = json.dumps(value)
    return KeyRecord(value.encode() if isinstance(value, str) else value, create, create, lease)


def view(**keys):
    return ClusterView(KS, 100, {k: v for k, v in keys.items()})


def make(spec=None, intent=None, owner=None, nodes=("node-a", "node-b", "node-c"), extra=None):
    keys = {}
    if spec is not None:
        keys[KS.spec("home")] = rec(spec, create=5)
    if intent is not None:
        keys[KS.intent("home")] = rec(intent)
    if owner is not None:
        keys[KS.owner("home")] = rec({"node": owner}, create=50, lease=7)
    for n in nodes:
        keys[KS.node(n)] = rec({"backoff": {}})
    keys.update(extra or {})
    return ClusterView(KS, 100, keys)


SPEC = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b", "node-c"]}


def test_keyspace_parse():
    assert KS.parse("/t/vfs/home/spec") == ("vfs", "home", "spec")
    assert KS.parse("/t/nodes/node-a") == ("node", "node-a", "")
    assert KS.parse("/t/vfs/home/other") is None
    assert KS.parse("/other/vfs/home/spec") is None


def test_first_live_candidate_acquires_first():
    v = make(SPEC)
    cfg = v.config("home")
    assert decide("node-a", cfg, None, v.live_nodes(), None).action is Action.ACQUIRE
    assert decide("node-a", cfg, None, v.live_nodes(), None).rank == 0
    assert decide("node-b", cfg, None, v.live_nodes(), None).rank == 1
    assert decide("node-c", cfg, None, v.live_nodes(), None).rank == 2


def test_dead_candidates_are_skipped():
    v = make(SPEC, nodes=("node-b", "node-c"))
    assert preference(v.config("home"), v.live_nodes()) == ["node-b", "node-c"]
    assert decide("node-b", v.config("home"), None, v.live_nodes(), None).rank == 0


def test_intent_node_goes_first_and_holder_releases_to_it():
    v = make(SPEC, intent="node-c", owner="node-a")
    cfg = v.config("home")
    assert preference(cfg, v.live_nodes()) == ["node-c", "node-a", "node-b"]
    d = decide("node-a", cfg, v.owner("home"), v.live_nodes(), "10.77.0.100/24")
    assert d.action is Action.RELEASE and "node-c" in d.reason
    assert decide("node-c", cfg, v.owner("home"), v.live_nodes(), None).action is Action.NOTHING


def test_intent_to_dead_node_keeps_owner():
    v = make(SPEC, intent="node-c", owner="node-a", nodes=("node-a", "node-b"))
    d = decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), "10.77.0.100/24")
    assert d.action is Action.NOTHING


def test_intent_to_node_backing_off_keeps_owner():
    v = make(SPEC, intent="node-c", owner="node-a", nodes=("node-a", "node-b"),
             extra={KS.node("node-c"): rec({"backoff": {"home": "probe failed"}})})
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), "10.77.0.100/24").action \
        is Action.NOTHING
    assert preference(v.config("home"), v.live_nodes())[-1] == "node-c"


def test_invalid_intent_is_ignored_with_error():
    v = make(SPEC, intent="node-z", owner="node-a")
    cfg = v.config("home")
    assert cfg.intent is None and "not a candidate" in cfg.error
    assert decide("node-a", cfg, v.owner("home"), v.live_nodes(), "10.77.0.100/24").action is Action.NOTHING


def test_invalid_spec_moves_nothing():
    v = make("{bad json", owner="node-a")
    cfg = v.config("home")
    assert cfg.spec is None and "invalid spec" in cfg.error
    assert decide("node-a", cfg, v.owner("home"), v.live_nodes(), "10.77.0.100/24").action is Action.NOTHING
    v2 = make("{bad json")
    assert decide("node-a", v2.config("home"), None, v2.live_nodes(), None).action is Action.NOTHING


def test_spec_change_releases():
    dropped = dict(SPEC, candidates=["node-b"])
    v = make(dropped, owner="node-a")
    d = decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), "10.77.0.100/24")
    assert d.action is Action.RELEASE and "no longer a candidate" in d.reason
    moved = dict(SPEC, vip="10.77.0.101/24")
    v = make(moved, owner="node-a")
    d = decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), "10.77.0.100/24")
    assert d.action is Action.RELEASE and "VIP" in d.reason


def test_stale_owner_key_of_this_node_is_cleared():
    v = make(SPEC, owner="node-a")
    assert decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), None).action is Action.CLEAR_STALE


def test_duplicate_vip_later_spec_is_in_error():
    keys = {KS.spec("home"): rec(SPEC, create=5), KS.spec("work"): rec(SPEC, create=9)}
    v = ClusterView(KS, 10, keys)
    assert v.config("home").spec is not None
    assert "already used by VFS 'home'" in v.config("work").error


def test_watch_events_older_than_view_are_ignored():
    v = ClusterView(KS, 10, {KS.intent("home"): rec("node-b", create=10)})
    stale = v.applied(12, [(KS.intent("home"), rec("node-a", create=3), 3)])
    assert stale.raw_intent("home") == "node-b"
    deleted = v.applied(12, [(KS.intent("home"), None, 11)])
    assert deleted.raw_intent("home") is None and deleted.revision == 11  # the event applied, not the header


def test_junk_agent_written_keys_do_not_break_the_view():
    deep = b"[" * 5000
    v = ClusterView(KS, 10, {KS.owner("home"): rec(deep.decode(), create=5), KS.node("node-a"): rec(deep.decode()),
                             KS.status("home"): rec("x" * 70000)})
    assert v.owner("home") is not None and v.owner("home").node == ""
    assert v.live_nodes() == {"node-a": {}} and v.status("home") is None


def test_each_distinct_spec_is_parsed_once_however_many_reconcilers_ask(monkeypatch):
    import controller.view as view_module

    calls = []
    real = view_module.parse_spec
    monkeypatch.setattr(view_module, "parse_spec", lambda name, raw: calls.append(name) or real(name, raw))
    view_module._parse_memo.cache_clear()
    keys = {KS.spec(f"v{i}"): rec({"vip": f"10.77.0.{100 + i}/24", "candidates": ["node-a"]}, create=i + 1)
            for i in range(20)}
    v = ClusterView(KS, 30, keys)
    for _ in range(3):
        for name in v.vfs_names():
            assert v.config(name).spec is not None
    assert sorted(calls) == sorted(f"v{i}" for i in range(20))  # 20 parses, not 3 x 20 x 20


def test_a_device_being_served_stays_with_its_vfs_whatever_an_older_spec_says():
    """An older spec changed to the device another VFS is mounted from must not win it by creation order:
    a takeover of it elsewhere would mount the disk a second time (the owner key records the device)."""
    disk = {"storage": {"device": "/dev/loop7", "fstype": "xfs"},
            "exports": [{"pseudo": "/x", "clients": ["10.77.0.0/24"]}]}
    keys = {
        KS.spec("old"): rec({"vip": "10.77.0.100/24", "candidates": ["node-a"], **disk}, create=5),
        KS.spec("new"): rec({"vip": "10.77.0.101/24", "candidates": ["node-b"], **disk}, create=9),
        KS.owner("new"): rec({"node": "node-b", "vip": "10.77.0.101/24", "device": "/dev/loop7"}, create=20, lease=3),
        KS.node("node-a"): rec({}), KS.node("node-b"): rec({}),
    }
    v = ClusterView(KS, 100, keys)
    assert v.config("old").errors == ("invalid spec: device /dev/loop7 is in use by VFS 'new' on node-b",)
    assert decide("node-a", v.config("old"), None, v.live_nodes(), None).action is Action.NOTHING
    before = ClusterView(KS, 99, {k: r for k, r in keys.items() if k != KS.owner("new")})
    assert "old" in v.affected(before, [KS.owner("new")])  # its release wakes the other claimant
