"""Self-test of the namespace lab (compose/labkit): needs root, runs in its own state dir."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
sys.path.insert(0, str(COMPOSE))

from labkit import Lab, LabError, diskcheck  # noqa: E402
from labkit.cluster import LabCluster, Writer  # noqa: E402
from labkit.disks import lab_loops, loops, release_all  # noqa: E402
from labkit.mntns import mounts  # noqa: E402
from labkit.state import StateDir  # noqa: E402

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, mounts)"),
]

STATE_DIR = "/run/nfsha-lab-selftest"
NODE_A_IP = "10.77.0.21"
ETCD1 = ("10.77.0.11", 2379)
CLOSED_PORT = 9  # nothing listens: a RST ("refused") proves the host is reachable
REACHABLE = ("open", "refused")
VIP = "10.77.0.240"  # outside LabCluster's range (100-250 is allocated upwards from 100)
PSEUDO = "/st"
GANESHA_CONF = """
NFS_CORE_PARAM {{ Protocols = 4; Enable_NLM = false; Enable_RQUOTA = false; Enable_UDP = false;
  Bind_addr = {vip}; Dbus_Name_Prefix = "nfsha_selftest"; }}
NFSV4 {{ RecoveryBackend = fs; RecoveryRoot = "{mnt}/.nfs-ha/nfs-recovery"; Grace_Period = 5; Lease_Lifetime = 5; }}
EXPORT {{ Export_Id = 1; Path = "{mnt}"; Pseudo = "{pseudo}"; Access_Type = None; Squash = No_Root_Squash;
  Protocols = 4; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }}
  CLIENT {{ Clients = 10.77.0.0/24; Access_Type = RW; }} }}
"""


def _attached(device: str) -> bool:
    return any(lp.device == device for lp in loops())


def _mount(lab: Lab, node: str, device: str, point: str) -> subprocess.CompletedProcess[str]:
    lab.run(node, ["mkdir", "-p", point])
    return lab.run(node, ["mount", device, point], check=False)


def _lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith("nfsha-")]


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


# ----- shared disks --------------------------------------------------------------------------


def test_disk_create_and_destroy(lab: Lab) -> None:
    device = lab.create_disk("sd-life")
    image = lab.state_dir / "disks" / "sd-life.img"
    assert device.startswith("/dev/loop") and image.is_file()
    assert lab.disks()["sd-life"] == device
    assert image.stat().st_blocks * 512 < 128 * 1024 * 1024  # sparse
    assert lab.status()["disks"]["sd-life"] == device
    with pytest.raises(LabError, match="already exists"):
        lab.create_disk("sd-life")
    lab.block_device_on("node-c", device)
    assert f" {device} " in lab.run("node-c", ["cat", "/proc/self/mountinfo"]).stdout
    lab.destroy_disk("sd-life")
    assert not _attached(device) and not image.exists()
    # The next disk may reuse this /dev/loopN: the block went with the disk.
    assert f" {device} " not in lab.run("node-c", ["cat", "/proc/self/mountinfo"]).stdout
    assert "sd-life" not in lab.disks()
    with pytest.raises(LabError, match="no disk named"):
        lab.destroy_disk("sd-life")


def test_ext4_and_blank_disks(lab: Lab) -> None:
    ext4 = lab.create_disk("sd-ext4", size_mb=64, fstype="ext4")
    blank = lab.create_disk("sd-blank", size_mb=64, fstype=None)
    point = str(lab.state_dir / "mnt-ext4")
    try:
        assert _mount(lab, "node-b", ext4, point).returncode == 0
        assert lab.mounts_of("node-b") == [(ext4, point)]
        lab.run("node-b", ["umount", point])
        assert _mount(lab, "node-b", blank, point).returncode != 0  # no filesystem on it
        assert lab.mounts_of("node-b") == []
    finally:
        lab.destroy_disk("sd-ext4")
        lab.destroy_disk("sd-blank")
    assert not _attached(ext4) and not _attached(blank)


def test_disk_mounted_in_one_node_only(lab: Lab) -> None:
    device = lab.create_disk("sd-mnt")
    point = str(lab.state_dir / "mnt-sd")
    assert _mount(lab, "node-a", device, point).returncode == 0
    assert lab.mounts_of("node-a") == [(device, point)]
    assert lab.mounts_of("node-b") == [] and lab.mounts_of("node-c") == []
    assert all(m.point != point for m in mounts())  # not in the root namespace either
    with pytest.raises(LabError, match=r"still in use: node-a .* at " + re.escape(point)):
        lab.destroy_disk("sd-mnt")
    assert _attached(device)  # refused, not half-destroyed
    lab.run("node-a", ["umount", point])
    lab.destroy_disk("sd-mnt")
    assert not _attached(device)


def test_diskcheck_reads_only_an_unmounted_disk(lab: Lab, tmp_path: Path) -> None:
    device = lab.create_disk("sd-check")
    point = str(lab.state_dir / "mnt-check")
    good, other = b"acknowledged\n", b"written, then changed\n"
    try:
        assert _mount(lab, "node-a", device, point).returncode == 0
        try:
            for name, data in (("good", good), ("changed", other)):
                (tmp_path / name).write_bytes(data)  # node namespaces see the root's /tmp
                lab.run("node-a", ["cp", str(tmp_path / name), f"{point}/{name}"])
            with pytest.raises(LabError, match="still mounted"):  # never a second mount of a live disk
                diskcheck.check(device, "xfs", {"good": hashlib.sha256(good).hexdigest()})
        finally:
            lab.run("node-a", ["umount", point], check=False)
        expected = {"good": hashlib.sha256(good).hexdigest(), "changed": hashlib.sha256(good).hexdigest(),
                    "never-written": hashlib.sha256(good).hexdigest()}
        assert diskcheck.check(device, "xfs", expected) == {"checked": 3, "missing": ["never-written"],
                                                            "wrong": ["changed"]}
        assert all("nfsha-diskcheck" not in m.point for m in mounts())
        assert diskcheck.wait_unmounted([device], 1) == []  # the check's own mount went with its process
    finally:
        lab.destroy_disk("sd-check")


def test_block_device_on_one_node(healed: Lab) -> None:
    lab = healed
    device = lab.create_disk("sd-block")
    point = str(lab.state_dir / "mnt-block")
    try:
        lab.block_device_on("node-a", device)
        failed = _mount(lab, "node-a", device, point)
        assert failed.returncode != 0 and "not a block device" in failed.stderr
        assert _mount(lab, "node-b", device, point).returncode == 0
        assert lab.mounts_of("node-b") == [(device, point)] and lab.mounts_of("node-a") == []
        lab.run("node-b", ["umount", point])
        lab.unblock_device_on("node-a", device)
        assert _mount(lab, "node-a", device, point).returncode == 0
        lab.run("node-a", ["umount", point])
        # A block survives a crash (the rebooted node still has no path to the disk) until heal.
        lab.block_device_on("node-a", device)
        lab.kill_node("node-a")
        lab.revive_node("node-a")
        assert _mount(lab, "node-a", device, point).returncode != 0
        lab.heal("node-a")
        assert _mount(lab, "node-a", device, point).returncode == 0
        lab.run("node-a", ["umount", point])
    finally:
        lab.heal("node-a")
        lab.destroy_disk("sd-block", force=True)


def test_leftover_loops_of_a_killed_run_are_found(lab: Lab) -> None:
    # A killed run's state dir is gone, but its loop device still points at "(deleted)" files.
    other = StateDir(Path("/run/nfsha-lab-selftest-killed"))
    image = other.root / "disks" / "old.img"
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(image, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                                check=True).stdout.strip()
        image.unlink()
        found = [lp for lp in lab_loops(lab.state, leftovers=True) if lp.device == device]
        assert found and found[0].deleted and found[0].backing == str(image)
        assert device not in [lp.device for lp in lab_loops(lab.state)]  # not this lab's own
        assert release_all(other, leftovers=False) == []
        assert not _attached(device)
    finally:
        release_all(other, leftovers=False)
        subprocess.run(["rm", "-rf", str(other.root)], check=False)


# ----- NFS client helpers against a hand-started Ganesha ---------------------------------------


@pytest.fixture
def ganesha(lab: Lab, tmp_path: Path) -> Iterator[LabCluster]:
    """Ganesha on node-a serving a fresh disk as VIP:/st; everything undone afterwards."""
    device = lab.create_disk("sd-nfs")
    point = str(lab.state_dir / "mnt-nfs")
    conf = tmp_path / "ganesha.conf"
    conf.write_text(GANESHA_CONF.format(vip=VIP, mnt=point, pseudo=PSEUDO))
    pid = 0
    try:
        lab.run("node-a", ["ip", "addr", "add", f"{VIP}/24", "dev", "eth0"])  # Bind_addr needs it up first
        assert _mount(lab, "node-a", device, point).returncode == 0
        lab.run("node-a", ["mkdir", "-p", f"{point}/.nfs-ha/nfs-recovery"])
        pid = lab.spawn("node-a", ["ganesha.nfsd", "-F", "-L", str(tmp_path / "ganesha.log"), "-f", str(conf),
                                   "-p", str(lab.state_dir / "ganesha-selftest.pid")], tmp_path / "ganesha.out")
        deadline = time.monotonic() + 10
        while lab.probe("client", VIP, 2049) != "open":
            assert time.monotonic() < deadline, (tmp_path / "ganesha.log").read_text()[-2000:]
            time.sleep(0.05)
        yield LabCluster(lab, tmp_path)
    finally:
        if pid:
            lab.stop(pid)
        lab.run("node-a", ["umount", point], check=False)
        lab.run("node-a", ["ip", "addr", "del", f"{VIP}/24", "dev", "eth0"], check=False)
        lab.destroy_disk("sd-nfs")


def _write_through_grace(cluster: LabCluster, name: str, data: bytes) -> None:
    deadline = time.monotonic() + 20
    while (proc := cluster.nfs_write(VIP, PSEUDO, name, data)).returncode != 0:
        assert "NFS4ERR_GRACE" in proc.stderr and time.monotonic() < deadline, proc.stderr
        time.sleep(0.2)


def test_nfs_write_read_ls(ganesha: LabCluster) -> None:
    cluster = ganesha
    data = b"hello through the VIP\n" * 100
    _write_through_grace(cluster, "hello.txt", data)
    assert cluster.nfs_read(VIP, PSEUDO, "hello.txt").data == data
    assert cluster.wait_nfs_read(VIP, PSEUDO, "hello.txt", data, timeout=5) <= time.monotonic()
    assert "hello.txt" in cluster.nfs_ls(VIP, PSEUDO)
    again = cluster.nfs_write(VIP, PSEUDO, "hello.txt", b"other")  # nfs-cp never overwrites
    assert again.returncode != 0 and "NFS4ERR_EXIST" in again.stderr
    missing = cluster.nfs_read(VIP, PSEUDO, "no-such-file")
    assert not missing.ok and missing.data is None and "NFS4ERR_NOENT" in missing.stderr
    with pytest.raises(AssertionError, match="NFS4ERR_NOENT"):
        cluster.wait_nfs_read(VIP, PSEUDO, "no-such-file", b"", timeout=0.3)
    with pytest.raises(ValueError, match="3932"):
        cluster.nfs_write(VIP, PSEUDO, "too-big", b"x" * 4000)


def test_writer_runs_and_verifies(ganesha: LabCluster) -> None:
    cluster = ganesha
    _write_through_grace(cluster, "warm-up", b"grace is over\n")
    started = time.monotonic()
    writer = cluster.start_writer(VIP, PSEUDO, duration=3)
    try:
        _wait_exit(cluster.lab, writer, 15)  # stops by itself after --duration
        ran = time.monotonic() - started
        log = writer.stop()
    finally:
        writer.kill()
    acked = [r for r in log if "name" in r]
    latency = sorted(r["t"] - r["t0"] for r in acked)
    print(f"writer: {len(acked)} acked in {ran:.2f}s, nfs-cp median {latency[len(latency) // 2] * 1000:.1f} ms")
    assert 3 <= ran < 8, ran
    assert len(acked) >= 20, log[-3:]
    assert [r.get("event") for r in (log[0], log[-1])] == ["start", "stop"]
    assert all(started <= r["t0"] <= r["t"] for r in acked)
    assert cluster.verify_writes(VIP, PSEUDO, log) == []
    assert {r["name"] for r in acked} <= set(cluster.nfs_ls(VIP, PSEUDO))
    forged = [{**acked[0], "sha256": "0" * 64}, {"name": "w-never", "sha256": "0" * 64}]
    assert cluster.verify_writes(VIP, PSEUDO, forged) == [acked[0]["name"], "w-never"]


def test_writer_stops_on_sigterm(ganesha: LabCluster) -> None:
    cluster = ganesha
    writer = cluster.start_writer(VIP, PSEUDO, duration=60)
    try:
        time.sleep(1)
        asked = time.monotonic()
        log = writer.stop()
        assert time.monotonic() - asked < 2
    finally:
        writer.kill()
    assert log[-1]["event"] == "stop"
    assert log[-1]["n_acked"] + log[-1]["n_failed"] == sum(1 for r in log if "name" in r or "failed" in r)


def test_writer_logs_failed_attempts(lab: Lab, tmp_path: Path) -> None:
    # Nothing listens on 2049 at node-a's own address: every attempt is refused at once.
    cluster = LabCluster(lab, tmp_path)
    writer = cluster.start_writer("10.77.0.21", PSEUDO, duration=1, interval=0.1)
    try:
        _wait_exit(lab, writer, 15)
        log = writer.stop()
    finally:
        writer.kill()
    failed = [r for r in log if "failed" in r]
    assert not [r for r in log if "name" in r] and len(failed) >= 3
    assert [r["failed"] for r in failed[:3]] == ["w-0-0", "w-0-1", "w-0-2"]  # same seq, next attempt
    assert all(r["rc"] != 0 and r["error"] for r in failed)
    print(f"refused attempt: {failed[0]['error']!r}")


def _wait_exit(lab: Lab, writer: Writer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while writer.pid in lab.pids("client"):
        assert time.monotonic() < deadline, "writer did not stop by itself"
        time.sleep(0.1)


def test_down_leaves_nothing(lab: Lab) -> None:
    # Must stay the last test of the module: it tears the shared lab down.
    pid = lab.spawn("client", ["sleep", "1000"], lab.state_dir / "client-sleep.log")
    # A disk still mounted inside a node's mount namespace (and a process using it, and a
    # blocked disk) must not keep its loop device: down() detaches after the namespaces died.
    busy = lab.create_disk("sd-down-busy")
    blocked = lab.create_disk("sd-down-blocked")
    point = str(lab.state_dir / "mnt-down")
    assert _mount(lab, "node-b", busy, point).returncode == 0
    lab.run("node-b", ["touch", f"{point}/held"])
    user = lab.spawn("node-b", ["tail", "-f", f"{point}/held"], lab.state_dir / "node-b-tail.log")
    lab.block_device_on("node-c", blocked)
    started = time.monotonic()
    # A fresh object knows no children, like a later CLI call or a killed run's leftovers.
    Lab(state_dir=STATE_DIR).down()
    print(f"down with a mounted disk took {time.monotonic() - started:.2f}s")
    assert not _attached(busy) and not _attached(blocked)
    assert [lp for lp in loops() if lp.backing.startswith(STATE_DIR + "/")] == []
    assert not Path(f"/proc/{user}").exists()
    assert _lab_namespaces() == []
    assert not Path(f"/proc/{pid}").exists()  # killed by namespace scan, reaped (our child)
    assert [m.point for m in mounts() if m.point.startswith(STATE_DIR)] == []
    assert not Path(STATE_DIR).exists()
    lab.down()  # idempotent
