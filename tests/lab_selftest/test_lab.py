"""Self-test of the namespace lab (compose/labkit): needs root, runs in its own state dir."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
sys.path.insert(0, str(COMPOSE))

from labkit import Lab  # noqa: E402
from labkit.mntns import mounts  # noqa: E402

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, mounts)"),
]

STATE_DIR = "/run/nfsha-lab-selftest"
NODE_A_IP = "10.77.0.21"
ETCD1 = ("10.77.0.11", 2379)
CLOSED_PORT = 9  # nothing listens: a RST ("refused") proves the host is reachable
REACHABLE = ("open", "refused")


def _lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("nfsha-")]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(state_dir=STATE_DIR)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture
def healed(lab: Lab) -> Iterator[Lab]:
    """Every test that breaks something leaves a whole lab behind."""
    yield lab
    lab.heal()


def test_endpoints(lab: Lab) -> None:
    assert lab.etcd_endpoints == [f"http://10.77.0.1{i}:2379" for i in (1, 2, 3)]
    assert lab.etcd_endpoints_arg == ",".join(lab.etcd_endpoints)


def test_client_reaches_node(lab: Lab) -> None:
    assert lab.probe("client", NODE_A_IP, CLOSED_PORT) in REACHABLE


def test_etcdctl_put_get(lab: Lab) -> None:
    lab.etcdctl("put", "/selftest/k", "v1")
    out = lab.etcdctl("get", "/selftest/k", "--print-value-only").stdout
    assert out.strip() == "v1"


def test_status_and_leader(lab: Lab) -> None:
    status = lab.status()
    assert status["up"] is True
    assert all(status["namespaces"].values())
    assert lab.etcd_leader() in (1, 2, 3)


def test_node_sees_only_own_links(lab: Lab) -> None:
    links = lab.run("node-a", ["ls", "/sys/class/net"]).stdout.split()
    assert sorted(links) == ["eth0", "lo"]
    mac = lab.run("node-a", ["cat", "/sys/class/net/eth0/address"]).stdout.strip()
    assert mac == lab.mac_of("node-a")


def test_mount_persists_in_node_only(lab: Lab) -> None:
    target = str(lab.state_dir / "mnt-x")
    os.makedirs(target, exist_ok=True)
    lab.run("node-a", ["mount", "-t", "tmpfs", "selftest-x", target])
    assert target in lab.run("node-a", ["cat", "/proc/self/mounts"]).stdout
    assert target not in lab.run("node-b", ["cat", "/proc/self/mounts"]).stdout
    assert all(m.point != target for m in mounts())  # not leaked into the root namespace
    # Agent state dir is a private tmpfs per node.
    lab.run("node-a", ["touch", "/run/nfs-ha/marker"])
    assert lab.run("node-b", ["test", "-e", "/run/nfs-ha/marker"], check=False).returncode != 0


def test_spawn_and_stop(lab: Lab, tmp_path: Path) -> None:
    pid = lab.spawn("node-b", ["sleep", "1000"], tmp_path / "sleep.log")
    assert pid in lab.pids("node-b")
    assert lab.stop(pid) == -signal.SIGTERM
    assert pid not in lab.pids("node-b")


def test_partition_and_heal(healed: Lab) -> None:
    lab = healed
    assert lab.probe("node-a", *ETCD1) == "open"
    lab.partition_node("node-a")
    assert lab.probe("node-a", *ETCD1) not in REACHABLE
    assert lab.probe("client", NODE_A_IP, CLOSED_PORT) in REACHABLE
    assert lab.probe("node-b", *ETCD1) == "open"
    lab.heal("node-a")
    assert lab.probe("node-a", *ETCD1) == "open"


def test_kill_and_revive_node(healed: Lab, tmp_path: Path) -> None:
    lab = healed
    pid = lab.spawn("node-a", ["sleep", "1000"], tmp_path / "sleep.log")
    lab.run("node-a", ["touch", "/run/nfs-ha/before-crash"])
    killed = lab.kill_node("node-a")
    assert pid in killed
    assert not Path(f"/proc/{pid}").exists()
    assert lab.probe("client", NODE_A_IP, CLOSED_PORT) not in REACHABLE
    # A crash loses the node's mounts: the fresh mount namespace has an empty /run/nfs-ha.
    assert lab.run("node-a", ["test", "-e", "/run/nfs-ha/before-crash"], check=False).returncode != 0
    lab.revive_node("node-a")
    deadline = time.monotonic() + 5
    while lab.probe("client", NODE_A_IP, CLOSED_PORT) not in REACHABLE:
        assert time.monotonic() < deadline, "node-a unreachable after revive"
    assert lab.probe("node-a", *ETCD1) == "open"


def test_etcd_member_restart(lab: Lab) -> None:
    victim = lab.etcd_leader()
    assert lab.kill_etcd_member(victim) == -signal.SIGKILL
    assert lab.wait_etcd_leader() != victim
    lab.etcdctl("put", "/selftest/after-kill", "yes")  # two members keep a quorum
    lab.start_etcd_member(victim)
    url = lab.etcd_endpoints[victim - 1]
    out = lab.etcdctl("get", "/selftest/after-kill", "--print-value-only", "--consistency=s", endpoints=[url])
    assert out.stdout.strip() == "yes"


def test_down_leaves_nothing(lab: Lab) -> None:
    # Must stay the last test of the module: it tears the shared lab down.
    pid = lab.spawn("client", ["sleep", "1000"], lab.state_dir / "client-sleep.log")
    # A fresh object knows no children, like a later CLI call or a killed run's leftovers.
    Lab(state_dir=STATE_DIR).down()
    assert _lab_namespaces() == []
    assert not Path(f"/proc/{pid}").exists()  # killed by namespace scan, reaped (our child)
    assert [m.point for m in mounts() if m.point.startswith(STATE_DIR)] == []
    assert not Path(STATE_DIR).exists()
    lab.down()  # idempotent
