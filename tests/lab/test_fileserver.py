"""Issue 3: real NFS virtual fileservers in the lab: loop-device disks, one Ganesha per VFS,
NFS reads and writes through the VIP from the client namespace, across failures."""

from __future__ import annotations

import itertools
import signal
import time

from tests.lab.conftest import NODES, Cluster, wait_for

_disks = itertools.count(1)
GRACE = 5


def fileserver(cluster: Cluster, vfs: str, candidates: tuple[str, ...] = NODES, pseudo: str = "/home",
               disk: str | None = None) -> tuple[str, str]:
    """Create a disk and a VFS spec serving it; returns (vip, device)."""
    device = disk or cluster.lab.create_disk(f"t{next(_disks)}-{vfs}")
    cluster.disks.append(device)
    vip = cluster.new_vip()
    cluster.put_spec(vfs, vip, candidates,
                     storage={"device": device, "fstype": "xfs", "options": "noatime"},
                     exports=[{"path": "/", "pseudo": pseudo, "access": "rw", "clients": ["10.77.0.0/24"],
                               "squash": "none"}],
                     nfs={"backend": "ganesha", "grace_seconds": GRACE, "lease_seconds": GRACE})
    return vip, device


def mounted_on(cluster: Cluster, device: str) -> list[str]:
    return [n for n in NODES if any(dev == device for dev, _ in cluster.lab.mounts_of(n))]


def server_pid(cluster: Cluster, node: str, vfs: str) -> int | None:
    """The pid in the server's pid file; None while there is none (between a stop and a start)."""
    proc = cluster.lab.run(node, ["cat", f"/run/nfs-ha/{node}/nfs/{vfs}/server.pid"], check=False)
    return int(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def test_write_kill_owner_read_back(cluster: Cluster) -> None:
    cluster.start_agents()
    vip, device = fileserver(cluster, "home")
    cluster.wait_serving("home", "node-a", timeout=30)
    assert mounted_on(cluster, device) == ["node-a"]
    data = b"written through the VIP to node-a\n" * 100
    assert cluster.nfs_write(vip, "/home", "before-kill.txt", data).returncode == 0
    cluster.kill_node("node-a")
    row = cluster.wait_serving("home", "node-b", timeout=30)
    assert row["epoch"] > 0
    cluster.wait_nfs_read(vip, "/home", "before-kill.txt", data, timeout=GRACE * 4 + 20)
    assert mounted_on(cluster, device) == ["node-b"]
    assert set(row["steps"]) >= {"mount", "epoch_check", "nfs_server", "vip", "arp_probe"}


def test_acknowledged_writes_survive_move_kill_agent_kill_and_server_crash(cluster: Cluster) -> None:
    cluster.start_agents()
    vip, device = fileserver(cluster, "home")
    first = cluster.wait_serving("home", "node-a", timeout=30)
    writer = cluster.start_writer(vip, "/home")
    time.sleep(2)

    cluster.put_intent("home", "node-b")                                   # planned move
    moved = cluster.wait_serving("home", "node-b", timeout=30, not_epoch=first["epoch"])
    time.sleep(2)

    cluster.kill_node("node-b")                                            # node crash
    after_kill = cluster.wait_serving("home", timeout=30, not_epoch=moved["epoch"])
    owner = after_kill["owner"]
    assert owner != "node-b"
    time.sleep(GRACE + 2)

    cluster.stop_agent(owner, signal.SIGKILL)          # agent dies: its guard drops VIP, Ganesha, mount
    after_agent = cluster.wait_serving("home", timeout=40, not_epoch=after_kill["epoch"])
    assert after_agent["owner"] != owner
    assert mounted_on(cluster, device) == [after_agent["owner"]]
    cluster.start_agent(owner)                          # back as a standby
    owner = after_agent["owner"]
    time.sleep(GRACE + 2)

    old_pid = server_pid(cluster, owner, "home")                            # Ganesha crash
    assert old_pid is not None
    cluster.lab.run(owner, ["kill", "-KILL", str(old_pid)])
    wait_for(lambda: server_pid(cluster, owner, "home") not in (None, old_pid), 20,
             "Ganesha restarted by the agent")
    time.sleep(GRACE + 3)

    log = writer.stop()
    acked = [e for e in log if "name" in e]
    failed = [e for e in log if "failed" in e]
    assert len(acked) > 50, f"only {len(acked)} writes were acknowledged"
    assert failed, "the faults should have made some writes fail"
    assert cluster.verify_writes(vip, "/home", acked) == []
    assert cluster.holders(vip) == [owner] and mounted_on(cluster, device) == [owner]


def test_two_vfs_on_one_node_move_independently(cluster: Cluster) -> None:
    cluster.start_agents()
    vip1, _ = fileserver(cluster, "one", pseudo="/one")
    vip2, dev2 = fileserver(cluster, "two", pseudo="/two")
    cluster.wait_serving("one", "node-a", timeout=30)
    cluster.wait_serving("two", "node-a", timeout=30)
    assert cluster.nfs_write(vip2, "/two", "steady.txt", b"steady\n").returncode == 0
    assert cluster.nfs_write(vip1, "/one", "mover.txt", b"mover\n").returncode == 0
    pid_two = server_pid(cluster, "node-a", "two")
    assert pid_two is not None

    reads = []
    cluster.put_intent("one", "node-b")
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # read VFS two all through the move of VFS one
        reads.append(cluster.nfs_read(vip2, "/two", "steady.txt"))
    cluster.wait_serving("one", "node-b", timeout=30)
    cluster.wait_nfs_read(vip1, "/one", "mover.txt", b"mover\n", timeout=GRACE * 4 + 20)

    assert reads and all(r.ok and r.data == b"steady\n" for r in reads), [r.stderr for r in reads if not r.ok][:3]
    assert server_pid(cluster, "node-a", "two") == pid_two
    assert mounted_on(cluster, dev2) == ["node-a"]
    assert cluster.vfs_status("two")["owner"] == "node-a"


def test_recovery_records_travel_with_the_disk(cluster: Cluster) -> None:
    cluster.start_agents()
    vip, _ = fileserver(cluster, "home")
    cluster.wait_serving("home", "node-a", timeout=30)
    assert cluster.nfs_write(vip, "/home", "client-was-here", b"x").returncode == 0
    # Client records: nfs-recovery/v4recov/<ganesha node id>/<client> (depth 3).
    records_a = cluster.lab.run("node-a", ["find", "/run/nfs-ha/node-a/mnt/home/.nfs-ha/nfs-recovery",
                                           "-mindepth", "3"]).stdout.splitlines()
    assert records_a, "node-a's Ganesha wrote no client record on the disk"
    cluster.put_intent("home", "node-b")
    cluster.wait_serving("home", "node-b", timeout=30)
    records_b = cluster.lab.run("node-b", ["find", "/run/nfs-ha/node-b/mnt/home/.nfs-ha/nfs-recovery",
                                           "-mindepth", "3"]).stdout.splitlines()
    clients = {p.rsplit("/", 1)[-1] for p in records_a}
    assert any("10.77.0.50" in c for c in clients), records_a  # the client namespace's address
    assert clients & {p.rsplit("/", 1)[-1] for p in records_b}, (records_a, records_b)
    # The record puts node-b's server into grace: a new OPEN is refused until it ends.
    first = cluster.nfs_write(vip, "/home", "in-grace", b"y")
    assert first.returncode != 0 and "GRACE" in first.stderr.upper()
    cluster.wait_nfs_read(vip, "/home", "client-was-here", b"x", timeout=GRACE * 4 + 20)


def test_bad_fileserver_specs_mount_nothing(cluster: Cluster) -> None:
    cluster.start_agents()
    device = cluster.lab.create_disk(f"t{next(_disks)}-bad")
    cluster.disks.append(device)
    good_export = {"path": "/", "pseudo": "/x", "access": "rw", "clients": ["10.77.0.0/24"], "squash": "root"}
    bad = {
        "baddev": ({"device": "/etc/passwd", "fstype": "xfs"}, [good_export]),
        "badfs": ({"device": device, "fstype": "ntfs"}, [good_export]),
        "badpath": ({"device": device, "fstype": "xfs"}, [{**good_export, "path": "/../../etc"}]),
        "badclient": ({"device": device, "fstype": "xfs"}, [{**good_export, "clients": ["everyone"]}]),
        "badsquash": ({"device": device, "fstype": "xfs"}, [{**good_export, "squash": "maybe"}]),
    }
    for vfs, (storage, exports) in bad.items():
        cluster.put_spec(vfs, cluster.new_vip(), storage=storage, exports=exports)
    wait_for(lambda: all(cluster.vfs_status(v).get("phase") == "error" for v in bad), 20, "status errors")
    errors = {v: cluster.vfs_status(v)["error"] for v in bad}
    assert "device path under /dev/" in errors["baddev"]
    assert "storage.fstype" in errors["badfs"]
    assert "no '..'" in errors["badpath"]
    assert "not an IP network" in errors["badclient"]
    assert "squash" in errors["badsquash"]
    time.sleep(2)
    assert all(cluster.lab.mounts_of(n) == [] for n in NODES)
    assert all(cluster.vfs_status(v)["owner"] is None for v in bad)


def test_mount_failure_on_first_candidate_moves_on(cluster: Cluster) -> None:
    cluster.start_agents()
    device = cluster.lab.create_disk(f"t{next(_disks)}-blocked")
    cluster.lab.block_device_on("node-a", device)  # node-a cannot reach this disk
    vip, _ = fileserver(cluster, "home", disk=device)
    row = cluster.wait_serving("home", "node-b", timeout=40)
    assert mounted_on(cluster, device) == ["node-b"]
    nodes = {n["node"]: n for n in cluster.status()["nodes"]}
    assert "mount" in nodes["node-a"]["backoff"].get("home", "")
    assert cluster.nfs_write(vip, "/home", "ok.txt", b"ok").returncode == 0
    time.sleep(3)
    assert cluster.vfs_status("home")["epoch"] == row["epoch"]  # and it stays put


def test_disk_written_by_a_newer_owner_is_refused(cluster: Cluster) -> None:
    cluster.start_agents()
    device = cluster.lab.create_disk(f"t{next(_disks)}-stale")
    cluster.disks.append(device)
    # Pretend a newer owner has used this disk: a storage epoch far above any real one.
    scratch = "/run/nfs-ha/node-c-scratch"
    for argv in (["mkdir", "-p", scratch], ["mount", device, scratch], ["mkdir", "-p", f"{scratch}/.nfs-ha"],
                 ["python3", "-c", f"open('{scratch}/.nfs-ha/epoch', 'w').write('999999999\\n')"],
                 ["umount", scratch]):
        cluster.lab.run("node-c", argv)
    vip, _ = fileserver(cluster, "home", disk=device)
    wait_for(lambda: all("newer than ours" in n["backoff"].get("home", "")
                         for n in cluster.status()["nodes"]), 40, "every candidate refusing the disk")
    row = cluster.vfs_status("home")
    assert row["phase"] in ("error", "unplaced") and row["owner"] is None
    assert cluster.holders(vip) == []
    assert all(cluster.lab.mounts_of(n) == [] for n in NODES)
    # The documented recovery (after etcd was restored from a snapshot): the refusal names the
    # command and the number; raising the epoch base lets the next takeover accept the disk.
    assert any("nfs-ha raise-epoch 999999999" in n["backoff"].get("home", "") for n in cluster.status()["nodes"])
    assert cluster.cli("raise-epoch", "abc").returncode == 2
    proc = cluster.cli("raise-epoch", "999999999")
    assert proc.returncode == 0, proc.stderr
    assert "raised from 0 to 999999999" in proc.stdout
    assert "already" in cluster.cli("raise-epoch", "5").stdout  # never lowered
    owner = cluster.wait_serving("home", timeout=90)["owner"]
    epoch_on_disk = cluster.lab.run(owner, ["cat", f"/run/nfs-ha/{owner}/mnt/home/.nfs-ha/epoch"]).stdout
    assert int(epoch_on_disk) == 999999999 + cluster.vfs_status("home")["epoch"]


def test_server_is_never_restarted_on_an_empty_mount_point(cluster: Cluster) -> None:
    """The disk is lazily unmounted under a live agent (as a fence guard acting on a stale deadline
    once did), then its server dies: restarting it would export the empty mount point and
    acknowledge writes that never reach the disk. The owner refuses and hands the VFS on."""
    cluster.start_agents()
    vip, device = fileserver(cluster, "home")
    cluster.wait_serving("home", "node-a", timeout=30)
    data = b"on the shared disk\n"
    wait_for(lambda: cluster.nfs_write(vip, "/home", "before.txt", data).returncode == 0, GRACE * 4 + 20,
             "a write after the grace period")
    cluster.lab.run("node-a", ["umount", "-l", "/run/nfs-ha/node-a/mnt/home"])
    assert cluster.lab.ganesha_sigkill("node-a")
    cluster.wait_serving("home", "node-b", timeout=40)
    cluster.wait_nfs_read(vip, "/home", "before.txt", data, timeout=GRACE * 4 + 20)
    log = cluster.agent_log("node-a").read_text()
    assert "is not mounted: not exporting the empty mount point" in log
    assert mounted_on(cluster, device) == ["node-b"]
