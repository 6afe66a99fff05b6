"""Issue 8, the disk bound, the guard's part (node/guard.py rules 3 and 4), in the namespace lab:
the fence guard SIGKILLs whatever holds a fenced VFS's filesystem and unmounts it for real (never
lazily); a disk it cannot release (a writer stuck on a frozen filesystem) gets the reset command
within T_release/2, both with a reset script of the test's own and with the lab's `compose/lab reset`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from node import guard as guard_mod
from tests.lab.conftest import Cluster, final_guard_record, wait_for
from tests.lab.test_fileserver import fileserver, mounted_on

ROOT = Path(__file__).resolve().parents[2]


def proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def node_holders(cluster: Cluster, node: str, device: str) -> list[int]:
    """Processes of `node` that use the filesystem of `device` (cwd, root, fd, mapping), seen from
    outside through /proc (the guard's own check, run by the test on the node's pids)."""
    devs = frozenset({os.stat(device).st_rdev})
    return [pid for pid in cluster.lab.pids(node) if proc_state(pid) not in (None, "Z")
            and guard_mod.holds(pid, devs, other_ns=False)]


def test_frozen_agent_guard_kills_a_holder_and_unmounts(cluster: Cluster) -> None:
    """(a) A process sits in the VFS mount (cwd) and the agent is frozen: the guard, on its deadline,
    removes the VIP, kills Ganesha, finds the mount busy, SIGKILLs the holder and unmounts, without
    `umount -l`; then the next owner serves."""
    cluster.start_agents(nodes=("node-a", "node-b"), extra=("--release-bound", "4"))
    vip, device = fileserver(cluster, "home", candidates=("node-a", "node-b"))
    first = cluster.wait_serving("home", "node-a", timeout=30)
    mountpoint = "/run/nfs-ha/node-a/mnt/home"
    holder = cluster.lab.spawn("node-a", ["sh", "-c", f"cd {mountpoint} && exec sleep 600"],
                               cluster.logdir / "holder.log")
    wait_for(lambda: os.readlink(f"/proc/{holder}/cwd") == mountpoint, 5, "the holder inside the mount")
    assert holder in node_holders(cluster, "node-a", device)
    ganesha = cluster.lab.ganesha_pids("node-a")
    assert ganesha
    agent = cluster.agents["node-a"]
    cluster.lab.agent_sigstop(agent)
    try:
        wait_for(lambda: proc_state(holder) in (None, "Z"), 15, "the guard killing the holder")
        wait_for(lambda: not any(dev == device for dev, _ in cluster.lab.mounts_of("node-a")), 10,
                 "the disk unmounted on node-a")
        assert node_holders(cluster, "node-a", device) == []  # not detached-but-alive: released
        assert not cluster.vip_on("node-a", vip)
        assert not any(proc_state(p) not in (None, "Z") for p in ganesha)
        rec = final_guard_record(cluster, "node-a", "home")
        assert rec["final"] is True and "deadline passed" in rec["reason"], rec
        assert {"pid": holder, "comm": "sleep"} in rec["killed"], rec
        assert any(a.startswith(f"unmounted {mountpoint} (after: ") for a in rec["actions"]), rec  # it was busy
        assert all("lazily" not in a and "-l" not in a for a in rec["actions"]), rec
        assert rec["released_after"] is not None and rec["released_after"] < 2.0, rec  # within T_release/2
        assert rec["reset"] is None, rec
        row = cluster.wait_serving("home", "node-b", timeout=40, not_epoch=first["epoch"])
        assert row["owner"] == "node-b" and mounted_on(cluster, device) == ["node-b"]
        assert cluster.nfs_write(vip, "/home", "after-fence.txt", b"served by node-b\n").returncode == 0
    finally:
        cluster.lab.agent_sigcont(agent)


@contextmanager
def guard_in_node(cluster: Cluster, node: str, state_dir: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """The guard process itself, in the node's namespaces, fed through its stdin by the test."""
    argv = [sys.executable, "-m", "node.guard", "--state-dir", str(state_dir), "--interface", "eth0", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(state_dir.parent / f"guard-{node}.log", "ab") as log:
        proc = subprocess.Popen(cluster.lab.node_cmd(node, argv), stdin=subprocess.PIPE, stdout=log, stderr=log,
                                env=env, start_new_session=True)
    try:
        wait_for(lambda: "guarding" in (state_dir.parent / f"guard-{node}.log").read_text(), 10, "guard started")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def send(proc: subprocess.Popen[bytes], msg: dict[str, Any]) -> None:
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(msg) + "\n").encode())
    proc.stdin.flush()


@contextmanager
def stuck_disk(cluster: Cluster, node: str, name: str) -> Iterator[tuple[str, str, int]]:
    """A lab disk mounted on `node`, frozen, with a writer blocked on it in D state (its cwd inside):
    `umount` fails busy and SIGKILL cannot end the writer until the filesystem is thawed.
    Yields (device, mount point, writer pid); everything is undone afterwards."""
    device = cluster.lab.create_disk(name)
    cluster.disks.append(device)
    mountpoint = f"/run/nfs-ha/{node}/gx/{name}"
    cluster.lab.run(node, ["mkdir", "-p", mountpoint])
    cluster.lab.run(node, ["mount", device, mountpoint])
    writer = None
    try:
        cluster.lab.run(node, ["fsfreeze", "-f", mountpoint])
        writer = cluster.lab.spawn(node, ["sh", "-c", f"cd {mountpoint} && echo x > blocked"],
                                   cluster.logdir / f"writer-{name}.log")
        wait_for(lambda: proc_state(writer) == "D", 5, "the writer blocked on the frozen filesystem")
        yield device, mountpoint, writer
    finally:
        cluster.lab.thaw_disk(device)
        if writer is not None and proc_state(writer) not in (None, "Z"):
            os.kill(writer, signal.SIGKILL)
        cluster.lab.run(node, ["umount", "--", mountpoint], check=False)


def test_guard_runs_the_reset_command_when_the_disk_cannot_be_released(cluster: Cluster, tmp_path: Path) -> None:
    """(b) The writer survives SIGKILL (D state on a frozen filesystem), so the unmount stays busy:
    at T_release/2 after the fence started, the guard runs the reset command (here a script that
    records the call and thaws), then releases the disk and records it all."""
    release_bound = 2.0
    calls = tmp_path / "reset-calls"
    script = tmp_path / "reset-node"
    with stuck_disk(cluster, "node-a", "gx-reset") as (device, mountpoint, writer):
        script.write_text(f"#!/bin/sh\necho \"$(cut -d' ' -f1 /proc/uptime) $*\" >> {calls}\n"
                          f"fsfreeze -u {mountpoint}\necho thawed {mountpoint}\n")
        script.chmod(0o755)
        vip = cluster.new_vip()
        cluster.lab.run("node-a", ["ip", "addr", "add", f"{vip}/24", "dev", "eth0"])
        state = tmp_path / "guard-state"
        with guard_in_node(cluster, "node-a", state, "--release-bound", str(release_bound),
                           "--reset-command", json.dumps([str(script), "node-a"])) as proc:
            send(proc, {"op": "hold", "vfs": "home", "vip": f"{vip}/24", "deadline": time.monotonic() + 0.3,
                        "mountpoint": mountpoint, "nfs_pid": None, "epoch": 5, "device": device})
            records = wait_for(lambda: [r for r in guard_mod.read_actions(state) if r["final"]], 10,
                               "the guard's final record")
            interim = [r for r in guard_mod.read_actions(state) if not r["final"]]
            send(proc, {"op": "exit"})
            assert proc.wait(timeout=10) == 0
        (rec,) = records
        (before,) = interim
        assert calls.read_text().count("node-a") == 1
        assert before["reset"]["command"] == [str(script), "node-a"] and before["released_after"] is None
        assert rec["reset"]["exit"] == 0 and f"thawed {mountpoint}" in rec["reset"]["output"], rec
        assert release_bound / 2 <= rec["reset"]["after"] < release_bound / 2 + 0.5, rec
        assert {"pid": writer, "comm": "sh"} in rec["killed"], rec
        assert rec["released_after"] is not None and rec["released_after"] < release_bound, rec
        assert rec["errors"][0].startswith(f"umount {mountpoint}: ") and "busy" in rec["errors"][0], rec
        assert not any(dev == device for dev, _ in cluster.lab.mounts_of("node-a"))
        assert node_holders(cluster, "node-a", device) == [] and proc_state(writer) in (None, "Z")
        assert not cluster.vip_on("node-a", vip)


def test_guard_uses_the_labs_reset_command(cluster: Cluster, tmp_path: Path) -> None:
    """(b') The same with the lab's power cycle as the reset command, run from inside the node as
    the agent configures it: the node is reset (every process killed, the guard too, mounts gone)
    within T_release/2 + its run time, and the guard's record written before it says so."""
    release_bound = 2.0
    # Back to the root namespaces through this test process (`nsenter -t 1` is refused on this
    # machine: /proc/1/ns/* is not readable here).
    lab_cmd = ["/usr/bin/nsenter", "-t", str(os.getpid()), "-n", "-m", "--", sys.executable,
               str(ROOT / "compose" / "lab"), "--state-dir", str(cluster.lab.state_dir), "reset", "node-a"]
    resets_before = len(cluster.lab.resets())
    with stuck_disk(cluster, "node-a", "gx-labreset") as (device, mountpoint, writer):
        state = tmp_path / "guard-state"
        vip = cluster.new_vip()
        with guard_in_node(cluster, "node-a", state, "--release-bound", str(release_bound),
                           "--reset-command", json.dumps(lab_cmd)) as proc:
            start = time.monotonic()
            send(proc, {"op": "hold", "vfs": "home", "vip": f"{vip}/24", "deadline": start + 0.3,
                        "mountpoint": mountpoint, "nfs_pid": None, "epoch": 5, "device": device})
            wait_for(lambda: len(cluster.lab.resets()) > resets_before, 10, "the lab reset of node-a")
            assert proc.wait(timeout=10) == -signal.SIGKILL  # reset with the rest of the node
        reset = cluster.lab.resets()[-1]
        assert reset["node"] == "node-a" and writer in reset["killed"] and proc.pid in reset["killed"]
        assert start + 0.3 + release_bound / 2 <= reset["t"] < start + 0.3 + release_bound / 2 + 1.5, reset
        (rec,) = guard_mod.read_actions(state)  # the guard died in the reset: only the record before it
        assert rec["final"] is False and rec["reset"]["command"] == lab_cmd
        assert {"pid": writer, "comm": "sh"} in rec["killed"]
        assert not any(dev == device for dev, _ in cluster.lab.mounts_of("node-a"))
        wait_for(lambda: proc_state(writer) in (None, "Z"), 5, "the writer gone after the thaw")
        assert node_holders(cluster, "node-a", device) == []
