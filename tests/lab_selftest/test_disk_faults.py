"""Self-test of the lab's disk-side pieces used by the chaos run: the dual-mount sampler (a real
double mount, a lazily unmounted filesystem still in use), the node reset run from inside a node
(as a fence guard runs it), fsfreeze kept local to its node, and etcd snapshot/restore."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
sys.path.insert(0, str(COMPOSE))

from labkit import Lab  # noqa: E402
from labkit.cluster import LabCluster, MountSampler  # noqa: E402
from labkit.disks import is_busy  # noqa: E402
from labkit.procs import is_alive  # noqa: E402

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, mounts)"),
]

STATE_DIR = "/run/nfsha-lab-selftest-disk"
NODE_A_IP = "10.77.0.21"
VIP = "10.77.0.241"
REACHABLE = ("open", "refused")


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


MAPPER = """
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
os.write(fd, b"x" * 4096)
assert libc.mmap(None, 4096, 1, 1, fd, 0) not in (None, ctypes.c_void_p(-1).value)  # PROT_READ, MAP_SHARED
os.close(fd)  # (Python's mmap module would keep a dup of the fd)
os.chdir("/")
time.sleep(120)
"""


def _mount(lab: Lab, node: str, device: str, point: str) -> None:
    lab.run(node, ["mkdir", "-p", point])
    lab.run(node, ["mount", device, point])


def _runs_after(sampler: MountSampler, t: float) -> list[dict[str, Any]]:
    return [r for r in sampler.records() if "n" in r and r["t0"] >= t]


def _holders(run: dict[str, Any], disk: str) -> dict[str, list[str]]:
    return dict(run["disks"].get(disk, {}))


@pytest.fixture
def cluster(lab: Lab, tmp_path: Path) -> Iterator[LabCluster]:
    c = LabCluster(lab, tmp_path)
    try:
        yield c
    finally:
        lab.thaw_disk()  # a failed test must not leave a frozen superblock behind
        c.cleanup()  # samplers, spawned processes of the nodes, disks in c.disks
        lab.heal()


def test_sampler_sees_a_double_mount(cluster: LabCluster) -> None:
    lab = cluster.lab
    device = lab.create_disk("ms-dual")
    cluster.disks.append(device)
    point = str(lab.state_dir / "mnt-dual")
    sampler = cluster.mount_sampler(duration=120)
    _mount(lab, "node-a", device, point)
    t_one = time.monotonic()
    one = _wait(lambda: [r for r in _runs_after(sampler, t_one) if _holders(r, "ms-dual")], 10, "node-a's mount")
    assert _holders(one[0], "ms-dual") == {"node-a": [point]} and "dual" not in one[0]

    _mount(lab, "node-b", device, point)  # nothing in the kernel stops this (shared/FACTS.md)
    t_two = time.monotonic()
    dual = _wait(lambda: [r for r in _runs_after(sampler, t_two) if r.get("dual")], 10, "a dual-mount sample")
    assert dual[0]["dual"] == ["ms-dual"]
    assert _holders(dual[0], "ms-dual") == {"node-a": [point], "node-b": [point]}

    lab.run("node-b", ["umount", point])
    t_back = time.monotonic()
    _wait(lambda: [r for r in _runs_after(sampler, t_back) if _holders(r, "ms-dual") == {"node-a": [point]}],
          10, "node-b's mount gone from the samples")
    time.sleep(0.5)
    lab.run("node-a", ["umount", point])
    started = sampler.records()[0]["t"]
    summary = sampler.stop()
    took = time.monotonic() - started
    print(f"mount sampler: {summary['samples']} samples in {took:.1f}s, max gap {summary['max_gap_s']}s, "
          f"{summary['dual_mount_samples']} dual")
    assert summary["stopped_cleanly"] and summary["errors"] == 0
    assert summary["dual_mount_samples"] >= 1
    assert summary["first_dual"][0]["dual"] == ["ms-dual"]
    assert summary["samples"] >= 20 * took  # about every 20 ms (50/s), never much slower
    assert summary["blind_samples"] == 0


def test_sampler_sees_a_lazily_unmounted_filesystem_still_open(cluster: LabCluster) -> None:
    lab = cluster.lab
    device = lab.create_disk("ms-lazy")
    cluster.disks.append(device)
    point = str(lab.state_dir / "mnt-lazy")
    _mount(lab, "node-a", device, point)
    holder = lab.spawn("node-a", ["sh", "-c", 'cd "$1" && exec sleep 120 3<.', "holder", point],
                       lab.state_dir / "holder.log")
    _wait(lambda: os.stat(f"/proc/{holder}/cwd").st_dev == os.stat(device).st_rdev, 5, "holder inside the mount")
    # A file mapping alone (fd closed, cwd elsewhere) keeps the superblock too.
    mapper = lab.spawn("node-a", ["python3", "-c", MAPPER, f"{point}/mapped"], lab.state_dir / "mapper.log")
    _wait(lambda: f"{point}/mapped" in Path(f"/proc/{mapper}/maps").read_text(), 10, "the mapping")
    lab.run("node-a", ["umount", "-l", point])
    assert lab.mounts_of("node-a") == []  # gone from the mount table, not from the kernel
    assert is_busy(device)
    sampler = cluster.mount_sampler(duration=120)
    t0 = time.monotonic()
    lazy = _wait(lambda: [r for r in _runs_after(sampler, t0) if _holders(r, "ms-lazy")], 10, "the open superblock")
    how = _holders(lazy[0], "ms-lazy")
    assert list(how) == ["node-a"] and f"pid {holder} (sleep) cwd+fd, not mounted in its namespace" in how["node-a"]
    _wait(lambda: [r for r in _runs_after(sampler, t0) if f"pid {mapper} (python3) mmap, not mounted in its namespace"
                   in _holders(r, "ms-lazy").get("node-a", [])], 10, "the mapping seen")
    lab.stop(mapper)

    _mount(lab, "node-b", device, point)
    t1 = time.monotonic()
    dual = _wait(lambda: [r for r in _runs_after(sampler, t1) if r.get("dual")], 10, "a dual-mount sample")
    assert sorted(_holders(dual[0], "ms-lazy")) == ["node-a", "node-b"]

    lab.stop(holder)
    t2 = time.monotonic()
    _wait(lambda: [r for r in _runs_after(sampler, t2) if list(_holders(r, "ms-lazy")) == ["node-b"]],
          10, "node-a letting go")
    lab.run("node-b", ["umount", point])
    assert sampler.stop()["dual_mount_samples"] >= 1


def test_reset_from_inside_a_node(cluster: LabCluster) -> None:
    """What a fence guard does: run the reset argv inside the node. Everything of the node dies
    (also what hangs on a frozen filesystem), its mounts and VIPs go, its links stay up."""
    lab = cluster.lab
    device = lab.create_disk("ms-reset")
    cluster.disks.append(device)
    point = str(lab.state_dir / "mnt-reset")
    _mount(lab, "node-a", device, point)
    lab.run("node-a", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])
    sleeper = lab.spawn("node-a", ["sleep", "300"], lab.state_dir / "sleep.log")
    other = lab.spawn("node-b", ["sleep", "300"], lab.state_dir / "sleep-b.log")
    lab.freeze("node-a", point, watch=False)
    stuck = lab.spawn("node-a", ["sh", "-c", 'echo x > "$1/blocked"', "writer", point], lab.state_dir / "w.log")
    _wait(lambda: Path(f"/proc/{stuck}/stat").read_text().rsplit(")", 1)[1].split()[0] == "D", 5,
          "the writer blocked on the frozen filesystem")

    argv = cluster.reset_argv("node-a")
    assert argv[0].startswith("/") and "reset" in argv
    started = time.monotonic()
    proc = lab.run("node-a", argv, timeout=60)
    print(f"reset from inside node-a took {time.monotonic() - started:.2f}s: {proc.stdout.strip()}")
    record = json.loads(proc.stdout)
    assert record["node"] == "node-a" and sleeper in record["killed"] and stuck in record["killed"]
    assert record["thawed"], record
    assert not is_alive(sleeper) and not is_alive(stuck)  # (our children: zombies until reaped)
    assert other in lab.pids("node-b")  # another node is not touched
    assert lab.mounts_of("node-a") == []
    addrs = lab.run("node-a", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert VIP not in addrs and NODE_A_IP in addrs
    assert lab.probe("client", NODE_A_IP, 9) in REACHABLE  # links up: no revive needed
    assert lab.resets()[-1]["killed"] == record["killed"]
    _wait(lambda: not is_busy(device), 10, "the disk released")
    # Thawed: the next owner's writes do not hang.
    _mount(lab, "node-b", device, point)
    assert lab.run("node-b", ["timeout", "10", "touch", f"{point}/after-reset"], check=False).returncode == 0
    lab.run("node-b", ["umount", point])
    lab.stop(other)
    # Never against another lab's nodes: a state dir without this node's namespace is refused.
    bad = subprocess.run([sys.executable, str(COMPOSE / "lab"), "--state-dir", "/run/nfsha-lab-no-such",
                          "reset", "node-a"], capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 1 and "has no mount namespace" in bad.stderr


def test_a_freeze_stays_on_its_node(cluster: LabCluster) -> None:
    """Unmounting a frozen, idle xfs succeeds and leaves its superblock frozen; the next mount
    anywhere would get it back frozen. The FreezeWatch thaws it once node-a let go."""
    lab = cluster.lab
    device = lab.create_disk("ms-freeze")
    cluster.disks.append(device)
    point = str(lab.state_dir / "mnt-freeze")
    _mount(lab, "node-a", device, point)
    watch = lab.freeze("node-a", point)
    assert watch is not None
    try:
        time.sleep(0.3)
        assert not watch.thawed  # node-a still mounts it: frozen there
        again = lab.run("node-a", ["fsfreeze", "-f", point], check=False)  # (a write would hang, unkillable)
        assert again.returncode != 0 and "busy" in again.stderr, again
        lab.run("node-a", ["umount", point])
        _wait(lambda: watch.thawed, 10, "the watch to thaw the superblock")
        print(f"freeze watch: {watch.thawed}")
        assert not watch.error
        _mount(lab, "node-b", device, point)
        assert lab.run("node-b", ["timeout", "10", "touch", f"{point}/y"], check=False).returncode == 0
        lab.run("node-b", ["umount", point])
    finally:
        watch.stop()
        lab.thaw_disk(device)


def test_etcd_snapshot_restore_goes_back(lab: Lab, tmp_path: Path) -> None:
    def revision() -> int:
        return int(json.loads(lab.etcdctl("get", "/selftest/snap", "-w", "json").stdout)["header"]["revision"])

    lab.etcdctl("put", "/selftest/snap", "before")
    snapshot_rev = lab.etcd_snapshot_save(tmp_path / "snap.db")
    assert snapshot_rev == revision()
    for i in range(5):
        lab.etcdctl("put", "/selftest/snap", f"after-{i}")
    lab.etcdctl("put", "/selftest/later", "x")
    later_rev = revision()
    assert later_rev == snapshot_rev + 6
    leader = lab.etcd_snapshot_restore(tmp_path / "snap.db")
    assert leader in (1, 2, 3) and all(lab.etcd_pid(i) for i in (1, 2, 3))
    assert lab.etcdctl("get", "/selftest/snap", "--print-value-only").stdout.strip() == "before"
    assert lab.etcdctl("get", "/selftest/later", "--print-value-only").stdout.strip() == ""
    assert revision() == snapshot_rev < later_rev  # revisions went back
    lab.etcdctl("put", "/selftest/snap", "writable")
    assert revision() == snapshot_rev + 1
    assert lab.status()["up"]
