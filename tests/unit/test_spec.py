import ipaddress
import json

import pytest

from controller.cli import collect
from controller.keyspace import Keyspace
from controller.spec import MAX_INTENT_BYTES, MAX_SPEC_BYTES, SpecError, parse_intent, parse_spec, vip_fits
from controller.view import ClusterView, KeyRecord

GOOD = '{"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]}'


def test_good_spec():
    spec = parse_spec("home", GOOD)
    assert spec.vip_address == "10.77.0.100"
    assert spec.vip_cidr == "10.77.0.100/24"
    assert spec.candidates == ("node-a", "node-b")
    assert spec.lease_ttl is None


@pytest.mark.parametrize("raw, fragment", [
    ("not json", "not valid JSON"),
    ("[1]", "JSON object"),
    ('{"vip": "10.77.0.100/24"}', "needs 'vip' and 'candidates'"),
    ('{"vip": "10.77.0.300/24", "candidates": ["a"]}', "not an IP address"),
    ('{"vip": "10.77.0.100", "candidates": ["a"]}', "A.B.C.D/LEN"),
    ('{"vip": "fd00::1/64", "candidates": ["a"]}', "only IPv4"),
    ('{"vip": "127.0.0.5/8", "candidates": ["a"]}', "not a usable unicast"),
    ('{"vip": "10.77.0.0/24", "candidates": ["a"]}', "network or broadcast"),
    ('{"vip": "10.77.0.255/24", "candidates": ["a"]}', "network or broadcast"),
    ('{"vip": "10.77.0.100/24", "candidates": []}', "non-empty list"),
    ('{"vip": "10.77.0.100/24", "candidates": ["Node_A"]}', "invalid candidate node name"),
    ('{"vip": "10.77.0.100/24", "candidates": ["a", "a"]}', "twice"),
    ('{"vip": "10.77.0.100/24", "candidates": ["a"], "colour": "red"}', "unknown fields"),
    ('{"vip": "10.77.0.100/24", "candidates": ["a"], "lease_ttl": 0}', "lease_ttl"),
    ('{"vip": "10.77.0.100/24", "candidates": ["a"], "lease_ttl": true}', "lease_ttl"),
])
def test_bad_specs_are_rejected_with_a_reason(raw, fragment):
    with pytest.raises(SpecError, match=fragment):
        parse_spec("home", raw)


def test_bad_vfs_name():
    with pytest.raises(SpecError, match="invalid VFS name"):
        parse_spec("Home!", GOOD)


def test_intent_must_be_a_candidate():
    spec = parse_spec("home", GOOD)
    assert parse_intent(b"node-b\n", spec) == "node-b"
    with pytest.raises(SpecError, match="not a candidate"):
        parse_intent(b"node-c", spec)
    with pytest.raises(SpecError, match="invalid intent node name"):
        parse_intent(b"../etc", spec)


# --- issue 8 §3: bad input is that VFS's error, nothing else changes --------------------------

@pytest.mark.parametrize("raw, fragment", [
    ("[" * 5000, "nested too deeply"),
    ('{"vip": ' * 3000, "nested too deeply"),
    ("x" * (MAX_SPEC_BYTES + 1), "at most 65536"),
    ("é" * (MAX_SPEC_BYTES // 2 + 1), "at most 65536"),  # counted in bytes, not characters
    (b"\xff\xfe\x00", "not valid JSON"),
    ('{"vip": "10.77.0.100/24", "vip": "10.77.0.101/24", "candidates": ["a"]}', "more than once"),
    ('{"vip": "10.77.0.100/24", "candidates": ["a"], "lease_ttl": NaN}', "lease_ttl must be an integer"),
    ('{"vip": "10.77.0.100/24", "candidates": ["a"], "lease_ttl": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"vip": "10.77.0.100/0", "candidates": ["a"]}', "prefix /0 is too short"),
    ('{"vip": "10.77.0.100/1", "candidates": ["a"]}', "prefix /1 is too short"),
    ('{"vip": "10.77.0.100/7", "candidates": ["a"]}', "prefix /7 is too short"),
    ('{"vip": "0.0.0.7/8", "candidates": ["a"]}', "not a usable unicast"),
    ('{"vip": "10.77.0.100/24", "candidates": ["' + "a" * 5000 + '"]}', "invalid candidate node name"),
])
def test_hostile_specs_are_a_spec_error(raw, fragment):
    with pytest.raises(SpecError, match=fragment) as info:
        parse_spec("home", raw)
    assert len(str(info.value)) < 400  # a status line, not the input echoed back


def test_a_spec_that_is_not_text_is_a_spec_error():
    for raw in (None, 5, ["x"], {"vip": "10.77.0.100/24"}):
        with pytest.raises(SpecError, match="must be JSON text"):
            parse_spec("home", raw)


def test_smallest_accepted_vip_prefix_is_8():
    assert parse_spec("home", '{"vip": "10.77.0.100/8", "candidates": ["a"]}').vip_cidr == "10.77.0.100/8"


def test_hostile_intents_are_a_spec_error():
    spec = parse_spec("home", GOOD)
    for raw, fragment in ((b"node-a" + b" " * MAX_INTENT_BYTES, f"longer than {MAX_INTENT_BYTES}"),
                          (b"\xff\xfe", "not UTF-8"), (None, "must be text"), ("node-a\nnode-b", "invalid intent"),
                          ("[" * 5000, "longer than")):
        with pytest.raises(SpecError, match=fragment):
            parse_intent(raw, spec)
    assert parse_intent(b"  node-a \n", spec) == "node-a"


def test_a_broken_validator_is_still_only_a_spec_error(monkeypatch):
    import controller.spec as spec_module

    def boom(value):
        raise KeyError("a bug in a validator")

    monkeypatch.setattr(spec_module, "parse_candidates", boom)
    with pytest.raises(SpecError, match=r"could not be validated.*KeyError"):
        parse_spec("home", GOOD)


KS = Keyspace("/t")


def _rec(value: bytes, create: int) -> KeyRecord:
    return KeyRecord(value, create, create, 0)


def test_one_hostile_spec_and_intent_change_nothing_for_the_other_vfs():
    good = {KS.spec("home"): _rec(GOOD.encode(), 5), KS.intent("home"): _rec(b"node-b", 6)}
    before = ClusterView(KS, 100, dict(good))
    hostile = {**good,
               KS.spec("evil"): _rec(b"[" * 5000, 7),
               KS.intent("evil"): _rec(b"\xff" * 10_000, 8),
               KS.spec("worse"): _rec(b'{"vip": "10.77.0.101/24", "exports": ' + b"[" * 3000, 9),
               KS.spec("odd"): _rec(b'{"vip": "10.77.0.102/1", "candidates": ["node-a"]}', 10)}
    after = ClusterView(KS, 100, hostile)
    assert after.config("home") == before.config("home")
    assert after.config("home").intent == "node-b" and after.config("home").errors == ()
    for name, fragment in (("evil", "nested too deeply"), ("worse", "nested too deeply"), ("odd", "too short")):
        config = after.config(name)
        assert config.spec is None and fragment in config.error, config.error
    rows = {row["vfs"]: row for row in collect(after)["vfs"]}  # `nfs-ha status` still works
    assert set(rows) == {"home", "evil", "worse", "odd"}
    assert rows["home"]["vip"] == "10.77.0.100/24"


def test_view_config_contains_any_exception(monkeypatch):
    import controller.view as view_module

    def boom(name, raw):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(view_module, "parse_spec", boom)
    view_module._parse_memo.cache_clear()  # an earlier test's parse of the same spec must not answer
    config = ClusterView(KS, 100, {KS.spec("home"): _rec(GOOD.encode(), 5)}).config("home")
    assert config.spec is None and "recursion" in config.error


@pytest.mark.parametrize("vip, networks, fits", [
    ("10.77.0.100/32", [], True),
    ("10.77.0.100/24", [ipaddress.IPv4Interface("10.77.0.5/24")], True),
    ("10.77.0.100/24", ["10.9.0.5/16", "10.77.0.5/24"], True),
    ("10.77.0.100/24", [ipaddress.IPv4Network("10.77.0.0/24")], True),
    (ipaddress.IPv4Interface("10.77.0.100/24"), ["10.77.0.5/24"], True),
    ("10.77.0.100/16", ["10.77.0.5/24"], False),  # wider: a route over other hosts
    ("10.77.0.100/25", ["10.77.0.5/24"], False),  # not the interface's subnet either
    ("10.77.0.100/24", [], False),
    ("10.77.0.100/24", ["fd00::1/64", "junk", None, 42], False),  # ignored entries only make it not fit
    ("10.77.0.100/1", ["10.77.0.5/24"], False),
    ("not a vip", ["10.77.0.5/24"], False),
])
def test_vip_fits(vip, networks, fits):
    problem = vip_fits(vip, networks)
    assert (problem is None) is fits, problem
    if not fits:
        assert "VIP" in problem


def test_vip_fits_names_what_the_interface_has():
    assert "10.77.0.0/24" in vip_fits("10.77.0.100/16", ["10.77.0.5/24"])


def test_a_candidate_list_longer_than_64_is_refused():
    def spec(count: int) -> str:
        return json.dumps({"vip": "10.77.0.100/24", "candidates": [f"node-{i}" for i in range(count)]})

    with pytest.raises(SpecError, match="candidates lists 65 nodes; at most 64"):
        parse_spec("home", spec(65))
    assert len(parse_spec("home", spec(64)).candidates) == 64
