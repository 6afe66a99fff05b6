import pytest

from controller.spec import SpecError, parse_intent, parse_spec

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
