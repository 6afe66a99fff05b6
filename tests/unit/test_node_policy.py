"""Node policy (controller/policy.py): what a node serves whatever a spec asks, and how a refusal shows.

A refusal is the refusing node's alone: it takes nothing it refuses and releases what it holds, the
other candidates go on without it, and `nfs-ha status` says which node refuses and why.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.cli import collect
from controller.placement import Action, decide, preference
from controller.policy import NodePolicy
from controller.spec import parse_spec
from node import config as agent_config
from tests.unit.test_disk_bound import KS, setup
from tests.unit.test_view_and_placement import make, rec

NFS = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"],
       "storage": {"device": "/dev/disk/by-id/wwn-0x5000c500a1", "fstype": "xfs"},
       "exports": [{"pseudo": "/home", "clients": ["10.77.0.0/24"]}]}


def spec(**changes: object) -> object:
    doc = json.loads(json.dumps(NFS))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc.setdefault(section, {})[field] = value
        else:
            doc[section] = value
    return parse_spec("home", json.dumps(doc))


def test_the_default_policy_allows_any_device_and_network_but_only_ganesha() -> None:
    policy = NodePolicy()
    assert policy.refuses(spec()) is None
    assert policy.refuses(spec(nfs__backend="kernel")) == \
        "nfs.backend kernel is not in this node's nfs_backends ['ganesha']"
    assert NodePolicy(backends=("ganesha", "kernel")).refuses(spec(nfs__backend="kernel")) is None


def test_devices_must_match_a_pattern() -> None:
    policy = NodePolicy.from_settings(devices=["/dev/disk/by-id/wwn-*", "/dev/mapper/nfs-*"])
    assert policy.refuses(spec()) is None
    assert policy.refuses(spec(storage__device="/dev/mapper/nfs-home")) is None
    assert policy.refuses(spec(storage__device="/dev/sda")) == \
        "storage.device /dev/sda is not in this node's allowed_devices"
    assert policy.refuses(spec(storage__device="/dev/mapper/root")) is not None


def test_export_clients_must_lie_inside_an_allowed_network() -> None:
    policy = NodePolicy.from_settings(client_networks=["10.77.0.0/16", "fd00::/48"])
    assert policy.refuses(spec()) is None
    wide = spec(exports=[{"pseudo": "/home", "clients": ["10.0.0.0/8"]}])
    assert policy.refuses(wide) == "export /home: clients 10.0.0.0/8 are not inside this node's allowed_client_networks"
    assert policy.refuses(spec(exports=[{"pseudo": "/home", "clients": ["fd00:0:0:1::/64"]}])) is None


def test_a_vip_only_spec_is_never_refused() -> None:
    policy = NodePolicy.from_settings(devices=["/dev/disk/by-id/*"], client_networks=["10.0.0.0/8"])
    assert policy.refuses(parse_spec("v", json.dumps({"vip": "10.77.0.9/24", "candidates": ["node-a"]}))) is None


@pytest.mark.parametrize(("settings", "message"), [
    ({"devices": ["sda"]}, "allowed_devices: 'sda' must start with /dev/"),
    ({"client_networks": ["10.77.0.1/24"]}, "allowed_client_networks: '10.77.0.1/24' is not a network"),
    ({"backends": ["nfsd"]}, "nfs_backends must be a non-empty list"),
    ({"backends": []}, "nfs_backends must be a non-empty list"),
])
def test_bad_policy_settings_name_the_setting(settings: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NodePolicy.from_settings(**settings)


@given(st.integers(8, 30), st.integers(0, 2**32 - 1), st.integers(0, 8))
def test_a_client_network_is_allowed_exactly_when_it_lies_inside(prefix: int, address: int, extra: int) -> None:
    allowed = ipaddress.ip_network((address, prefix), strict=False)
    client = ipaddress.ip_network((address, min(32, prefix + extra)), strict=False)
    outside = ipaddress.ip_network((address ^ (1 << (32 - prefix)), prefix), strict=False)  # its neighbour
    policy = NodePolicy.from_settings(client_networks=[str(allowed)])
    assert policy.refuses(spec(exports=[{"pseudo": "/h", "clients": [str(client)]}])) is None
    assert policy.refuses(spec(exports=[{"pseudo": "/h", "clients": [str(outside)]}])) is not None


# --- placement and status ------------------------------------------------------------------------

REFUSING_A = {KS.node("node-a"): rec({"backoff": {}, "refused": {"home": "storage.device /dev/sdz is not in "
                                                                          "this node's allowed_devices"}})}
PLACED = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b", "node-c"]}


def test_other_candidates_skip_a_node_that_refuses() -> None:
    v = make(PLACED, extra=REFUSING_A)
    cfg = v.config("home")
    assert preference(cfg, v.live_nodes()) == ["node-b", "node-c"]
    assert decide("node-b", cfg, None, v.live_nodes(), None).rank == 0  # no wait for node-a
    refused = "storage.device /dev/sdz is not in this node's allowed_devices"
    assert decide("node-a", cfg, None, v.live_nodes(), None, refused).action is Action.NOTHING


def test_a_holder_that_refuses_releases_and_nobody_releases_to_a_refusing_node() -> None:
    v = make(PLACED, owner="node-a", extra=REFUSING_A)
    d = decide("node-a", v.config("home"), v.owner("home"), v.live_nodes(), "10.77.0.100/24", "no")
    assert d.action is Action.RELEASE and d.reason.startswith("spec_changed: refused by this node's policy")
    v = make(PLACED, owner="node-b", intent="node-a", extra=REFUSING_A)
    assert decide("node-b", v.config("home"), v.owner("home"), v.live_nodes(), "10.77.0.100/24").action \
        is Action.NOTHING


def test_status_names_the_refusing_node_and_why() -> None:
    v = make(PLACED, owner="node-b", extra=REFUSING_A)
    row = collect(v)["vfs"][0]
    assert row["error"] == "node-a refuses: storage.device /dev/sdz is not in this node's allowed_devices"


def test_the_reconciler_takes_nothing_its_policy_refuses_and_publishes_why() -> None:
    store, rec_, mount = setup(None)
    noted: list[tuple[str, str | None]] = []
    rec_.ctx.refuses = lambda _spec: "storage.device /dev/loop3 is not in this node's allowed_devices"
    rec_.ctx.note_refusal = lambda vfs, why: noted.append((vfs, why))
    rec_.reconcile()
    assert rec_.holding is None and mount.up_at == [] and KS.owner("home") not in store.keys
    assert noted == [("home", "storage.device /dev/loop3 is not in this node's allowed_devices")]


def test_a_held_vfs_the_policy_now_refuses_is_released() -> None:
    store, rec_, mount = setup(None)
    rec_.reconcile()
    assert rec_.holding is not None
    rec_.ctx.refuses = lambda _spec: "nfs.backend kernel is not in this node's nfs_backends"
    rec_.reconcile()
    assert rec_.holding is None and KS.owner("home") not in store.keys and mount.downs == 1
    assert json.loads(store.keys[KS.status("home")].value)["cause"].startswith("spec_changed: refused")


# --- the agent's config ---------------------------------------------------------------------------

BASE = 'name = "node-a"\netcd = "http://127.0.0.1:2379"\ninterface = "eth0"\n'


def write_config(tmp_path: Path, text: str, mode: int) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


@pytest.mark.parametrize("mode", [0o644, 0o620, 0o602])
def test_a_config_file_others_may_read_or_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = write_config(tmp_path, BASE, mode)
    with pytest.raises(ValueError, match=f"config file {path} has mode 0{mode:o} and it may hold a password"):
        agent_config.load(["--config", path])


def test_policy_and_password_come_from_the_config_file(tmp_path: Path) -> None:
    text = BASE.replace("http://", "https://") + 'allowed_devices = ["/dev/disk/by-id/*"]\n' \
        'allowed_client_networks = ["10.77.0.0/24"]\nnfs_backends = ["ganesha", "kernel"]\n' \
        'etcd_user = "node-a"\netcd_password = "pw"\n'
    with pytest.raises(ValueError, match="has mode 0640 and it holds etcd_password"):
        agent_config.load(["--config", write_config(tmp_path, text, 0o640)])  # group-readable: no password
    cfg = agent_config.load(["--config", write_config(tmp_path, text, 0o600)])
    assert cfg.node_policy() == NodePolicy.from_settings(["/dev/disk/by-id/*"], ["10.77.0.0/24"],
                                                         ["ganesha", "kernel"])
    assert cfg.etcd_access().user == "node-a" and "pw" not in repr(cfg)
    bad = write_config(tmp_path, BASE + 'nfs_backends = ["nfsd"]\n', 0o600)
    with pytest.raises(ValueError, match="nfs_backends must be"):
        agent_config.load(["--config", bad])
    with pytest.raises(ValueError, match="not valid TOML"):
        agent_config.load(["--config", write_config(tmp_path, BASE + "name = \n", 0o600)])

