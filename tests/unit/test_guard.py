"""node/guard.py: the fence guard's core with fake host actions and an injected clock, its real host
actions that need no mount (a fake /proc tree, real child processes), and the real process in --dry-run."""

from __future__ import annotations

import inspect
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from node import guard
from node.guard import Actions, BadMessage, Fencer, Guard, GuardClient, GuardState, Held, read_actions

VIP = "10.77.0.100/24"
DEV = 0x0712  # the fake filesystem's st_dev


def hold(vfs: str, deadline: float, vip: str = VIP, mountpoint: str | None = "/mnt/x", nfs_pid: int | None = 4242,
         epoch: int | None = None, device: str | None = None) -> dict[str, Any]:
    msg = {"op": "hold", "vfs": vfs, "vip": vip, "deadline": deadline, "mountpoint": mountpoint, "nfs_pid": nfs_pid}
    if device is not None:
        msg["device"] = device
    return msg if epoch is None else {**msg, "epoch": epoch}


def held(vfs: str = "home", epoch: int = 7, mountpoint: str | None = "/mnt/x", nfs_pid: int | None = 4242,
         device: str | None = "/dev/loop7", deadline: float = 1.0) -> Held:
    return Held(vfs, ipaddress.IPv4Interface(VIP), deadline, mountpoint, nfs_pid, epoch, device)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now
        self.on_sleep: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.001)
        for hook in self.on_sleep:
            hook()


class FakeHost:
    """Fake host actions: mounts, holders (some stuck in the kernel, some that die at a given time),
    servers found by config path; every call is remembered in order, with the clock's time."""

    def __init__(self, clock: FakeClock | None = None, mounts: Sequence[str] = ("/mnt/x",),
                 holders: dict[int, str] | None = None, unkillable: Sequence[int] = (),
                 servers: dict[str, list[int]] | None = None, reset_frees: bool = True) -> None:
        self.clock = clock or FakeClock()
        self.mounts = set(mounts)
        self.holders = dict(holders or {})
        self.unkillable = set(unkillable)
        self.servers = servers or {}
        self.reset_frees = reset_frees
        self.die_at: dict[int, float] = {}  # holder pid -> time it goes by itself
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[str] = set()

    def _call(self, *what: Any) -> None:
        self.calls.append(what)
        if what[0] in self.fail:
            raise RuntimeError(f"{what[0]} broke")

    def _expire(self) -> None:
        for pid, at in list(self.die_at.items()):
            if self.clock() >= at:
                self.holders.pop(pid, None)

    def remove_vip(self, vip: ipaddress.IPv4Interface) -> str:
        self._call("vip", str(vip.ip))
        return f"vip {vip.ip}"

    def kill_server(self, pid: int) -> str:
        self._call("kill", pid)
        return f"kill {pid}"

    def find_servers(self, conf: str) -> list[int]:
        self._call("find-servers", conf)
        return self.servers.get(conf, [])

    def fs_devices(self, mountpoint: str | None, device: str | None) -> frozenset[int]:
        return frozenset({DEV})

    def mounted(self, mountpoint: str | None, devs: frozenset[int]) -> list[str]:
        return [mountpoint] if mountpoint in self.mounts else []

    def umount(self, path: str, timeout: float) -> str | None:
        self._call("umount", path)
        self._expire()
        if self.holders:
            return "target is busy"
        self.mounts.discard(path)
        return None

    def find_holders(self, devs: frozenset[int]) -> list[tuple[int, str]]:
        self._expire()
        return sorted(self.holders.items())

    def kill_holder(self, pid: int, devs: frozenset[int]) -> bool:
        self._call("kill-holder", pid)
        if pid not in self.unkillable:
            self.holders.pop(pid, None)
        return True

    def reset(self, argv: Sequence[str], timeout: float) -> dict[str, Any]:
        self._call("reset", tuple(argv), timeout, self.clock())
        if self.reset_frees:
            self.holders.clear()
        return {"exit": 0, "output": "node reset\n", "error": None}

    def actions(self) -> Actions:
        return Actions(remove_vip=self.remove_vip, kill_server=self.kill_server, find_servers=self.find_servers,
                       fs_devices=self.fs_devices, mounted=self.mounted, umount=self.umount,
                       find_holders=self.find_holders, kill_holder=self.kill_holder, reset=self.reset)

    def kinds(self) -> list[str]:
        return [c[0] for c in self.calls]


def fencer(host: FakeHost, tmp_path: Path, **kw: Any) -> Fencer:
    return Fencer(host.actions(), tmp_path, clock=host.clock, sleep=host.clock.sleep, **kw)


# --- the core -----------------------------------------------------------------------------------


def test_deadline_fires_only_that_vfs() -> None:
    st = GuardState()
    st.apply(hold("home", 10.0), now=0.0)
    st.apply(hold("data", 20.0, vip="10.77.0.101/24"), now=0.0)
    assert st.due(9.99) == []
    assert [h.vfs for h in st.due(10.0)] == ["home"]
    assert [h.vfs for h in st.take_due(15.0)] == ["home"]
    assert [h.vfs for h in st.all_held()] == ["data"]  # a fenced VFS is forgotten
    assert st.next_deadline() == 20.0


def test_newer_hold_postpones_and_rearms() -> None:
    st = GuardState()
    st.apply(hold("home", 10.0), now=0.0)
    st.apply(hold("home", 12.0), now=5.0)
    assert st.due(11.0) == []
    assert [h.deadline for h in st.take_due(12.5)] == [12.0]
    st.apply(hold("home", 30.0), now=13.0)  # the agent came back: armed again
    assert [h.vfs for h in st.all_held()] == ["home"]


def test_release_forgets_and_ping_changes_nothing() -> None:
    st = GuardState()
    st.apply(hold("home", 10.0, device="/dev/loop3"), now=0.0)
    st.apply({"op": "ping"}, now=1.0)
    (h,) = st.all_held()
    assert h.device == "/dev/loop3" and st.last_heard == 1.0
    st.apply({"op": "release", "vfs": "home"}, now=2.0)
    assert st.all_held() == [] and st.due(100.0) == []


def test_messages_about_an_older_holding_change_nothing() -> None:
    """Rule 7: the hold of a holding that just ended can arrive after its release, or after the
    next holding's hold (they are sent from different agent threads)."""
    st = GuardState()
    assert st.apply(hold("home", 10.0, nfs_pid=100, epoch=132), now=0.0)
    assert st.apply({"op": "release", "vfs": "home", "epoch": 132}, now=1.0)
    assert st.apply(hold("home", 11.0, nfs_pid=200, epoch=142), now=1.1)
    # Late: the old holding's last hold, then a repeated release of it.
    assert not st.apply(hold("home", 10.5, nfs_pid=100, epoch=132), now=1.2)
    assert not st.apply({"op": "release", "vfs": "home", "epoch": 132}, now=1.3)
    (h,) = st.all_held()
    assert (h.epoch, h.deadline, h.nfs_pid) == (142, 11.0, 200)
    assert st.due(10.6) == []  # the stale deadline does not fire
    assert st.apply({"op": "release", "vfs": "home", "epoch": 142}, now=2.0)
    assert not st.apply(hold("home", 12.0, epoch=142), now=2.1)  # a released holding stays released
    assert st.all_held() == []
    assert st.apply(hold("home", 20.0, epoch=150), now=3.0)
    assert st.apply(hold("home", 21.0), now=3.1)  # no epoch: always applied
    assert [h.deadline for h in st.all_held()] == [21.0]
    with pytest.raises(BadMessage, match="epoch"):
        st.apply(hold("home", 22.0, epoch=-1), now=3.2)


def test_exit_forgets_everything() -> None:
    st = GuardState()
    st.apply(hold("home", 10.0), now=0.0)
    st.apply({"op": "exit"}, now=1.0)
    assert st.exit_requested and st.all_held() == []


@pytest.mark.parametrize("msg", [
    [],
    {"op": "dance"},
    {"op": "release"},
    {"op": "release", "vfs": "Home"},
    {"op": "fence"},
    {"op": "fence", "vfs": "home", "epoch": "7"},
    {"op": "fence", "vfs": "home", "epoch": 7, "reason": 12},
    hold("-home", 1.0),
    hold("x" * 64, 1.0),
    hold("home", 1.0, vip="10.77.0.300/24"),
    hold("home", 1.0, vip="fd00::1/64"),
    {**hold("home", 1.0), "vip": 17},
    {**hold("home", 1.0), "deadline": "soon"},
    {**hold("home", 1.0), "deadline": True},
    {**hold("home", 1.0), "deadline": float("nan")},
    hold("home", 1.0, mountpoint="relative/mnt"),
    hold("home", 1.0, device="loop3"),
    {**hold("home", 1.0), "device": 3},
    {**hold("home", 1.0), "device": "/dev/loop3\n"},
    hold("home", 1.0, nfs_pid=-3),
    hold("home", 1.0, nfs_pid=True),
    {**hold("home", 1.0), "nfs_pid": "1234"},
])
def test_bad_messages_are_refused(msg: object) -> None:
    st = GuardState()
    st.apply(hold("data", 5.0), now=0.0)
    with pytest.raises(BadMessage):
        st.apply(msg, now=1.0)  # type: ignore[arg-type]
    assert [h.vfs for h in st.all_held()] == ["data"] and st.last_heard == 0.0


def test_bad_lines_are_ignored_by_the_loop(tmp_path: Path) -> None:
    host = FakeHost()
    g = Guard(GuardState(), fencer(host, tmp_path), stdin_fd=-1, clock=lambda: 0.0)
    good = json.dumps(hold("home", 10.0)).encode()
    g.feed(b"not json\n" + json.dumps(hold("bad_name", 1.0)).encode() + b"\n" + good[:20])
    assert g.state.all_held() == []
    g.feed(good[20:] + b"\n")
    assert [h.vfs for h in g.state.all_held()] == ["home"]
    assert host.calls == []


def holds(*items: dict[str, Any]) -> dict[str, Any]:
    return {"op": "holds", "holds": [{k: v for k, v in item.items() if k != "op"} for item in items]}


def test_a_batch_of_holds_is_the_same_as_each_hold_and_a_bad_one_spoils_only_itself(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The agent's renewals come in batches ("holds"); one bad entry must not leave the others'
    deadlines unrenewed (the guard would fence VFS the agent still serves)."""
    g = Guard(GuardState(), fencer(FakeHost(), tmp_path), stdin_fd=-1, clock=lambda: 0.0)
    g.feed(json.dumps(hold("home", 10.0, epoch=3)).encode() + b"\n")
    batch = holds(hold("home", 12.0, epoch=3), hold("bad_name", 1.0), {"vfs": "data"},
                  hold("data", 11.0, vip="10.77.0.101/24", epoch=4))
    with caplog.at_level(logging.ERROR, logger="node.guard"):
        g.feed(json.dumps(batch).encode() + b"\n")
    assert sorted((h.vfs, h.deadline, h.epoch) for h in g.state.all_held()) == [("data", 11.0, 4), ("home", 12.0, 3)]
    assert sum("ignoring a bad hold" in r.message for r in caplog.records) == 2
    st = GuardState()
    assert st.apply(holds(), now=0.0) and st.all_held() == []  # an empty batch changes nothing
    for bad in ({"op": "holds"}, {"op": "holds", "holds": {"vfs": "home"}},
                {"op": "holds", "holds": [hold("home", 1.0)] * (guard.MAX_HOLDS + 1)}):
        with pytest.raises(BadMessage):
            st.apply(bad, now=0.0)


def test_the_client_sends_a_batch_in_lines_each_below_pipe_buf(tmp_path: Path) -> None:
    client = GuardClient(tmp_path, "eth-test", dry_run=True)
    lines: list[bytes] = []
    client._write = lambda data, wait=0.0: lines.append(data) or True  # type: ignore[method-assign]
    try:
        items = [{k: v for k, v in hold(f"vfs-{i:03d}", 100.0 + i, vip=f"10.77.{i // 250}.{i % 250 + 1}/32",
                                        mountpoint=f"/run/nfs-ha/node-a/mnt/vfs-{i:03d}", epoch=1000 + i,
                                        device=f"/dev/disk/by-id/wwn-0x{i:016x}").items() if k != "op"}
                 for i in range(300)]
        assert client.hold_many(items)
        assert len(lines) > 1 and all(len(line) < 4096 and line.endswith(b"\n") for line in lines)
        sent = [guard.parse_line(line) for line in lines]  # what the guard reads, as it reads it
        assert [h.vfs for m in sent for h in m.helds] == [i["vfs"] for i in items]  # all, in order, once
        assert all(m.op == "holds" and not m.errors for m in sent)
        st = GuardState()
        for m in sent:
            st.apply(m, now=0.0)
        assert len(st.all_held()) == 300
    finally:
        client.proc.kill()
        client.proc.wait()


def test_hold_with_null_mount_and_pid() -> None:
    st = GuardState()
    st.apply(hold("home", 1.0, mountpoint=None, nfs_pid=None), now=0.0)
    (h,) = st.all_held()
    assert h.mountpoint is None and h.nfs_pid is None and h.device is None and h.vip == ipaddress.IPv4Interface(VIP)


# --- rule 5: what stops a running fence ---------------------------------------------------------


def running(st: GuardState, now: float, **kw: Any) -> guard.Ticket:
    """Arm a hold, let its deadline pass and start its fence (as Guard.fence_due does)."""
    st.apply(hold("home", 10.0, **kw), now=0.0)
    (h,) = st.take_due(now)
    return st.begin(h)


def test_release_never_stops_a_running_fence() -> None:
    st = GuardState()
    ticket = running(st, 10.5, epoch=7)
    assert st.apply({"op": "release", "vfs": "home", "epoch": 7}, now=11.0)
    assert st.apply({"op": "release", "vfs": "home"}, now=11.1)
    assert ticket.superseded_by is None


def test_same_epoch_hold_stops_the_fence_only_with_a_later_deadline() -> None:
    st = GuardState()
    ticket = running(st, 10.5, epoch=7)
    # The agent had nothing newer than what the guard fenced on: ignored, not armed either.
    assert not st.apply(hold("home", 10.0, epoch=7), now=11.0)
    assert ticket.superseded_by is None and st.all_held() == []
    # A late-acknowledged keepalive renewed the lease: the agent serves on, the guard is re-armed.
    assert st.apply(hold("home", 14.0, epoch=7), now=11.2)
    assert ticket.superseded_by is not None and "renewed" in ticket.superseded_by
    assert [h.deadline for h in st.all_held()] == [14.0]


@pytest.mark.parametrize(("change", "stops"), [
    ({}, True),                                     # same mount point, same device
    ({"device": None}, True),                       # the new hold names no device: the mount point decides
    ({"device": "/dev/loop9"}, False),              # another disk: the old one still has to go
    ({"mountpoint": "/mnt/other"}, False),          # another mount point
    ({"mountpoint": None}, False),                  # no storage in the new holding
    ({"deadline": 10.9}, False),                    # already past its deadline
])
def test_newer_holding_stops_the_fence_only_for_the_same_mount(change: dict[str, Any], stops: bool) -> None:
    st = GuardState()
    ticket = running(st, 10.5, epoch=7, device="/dev/loop3")
    new = {"deadline": 20.0, "mountpoint": "/mnt/x", "device": "/dev/loop3", **change}
    deadline = new.pop("deadline")
    assert st.apply(hold("home", deadline, epoch=9, **new), now=11.0)  # a new holding is always armed
    assert (ticket.superseded_by is not None) == stops
    assert [h.epoch for h in st.all_held()] == [9]


def test_agent_asked_fence_applies_only_to_that_holding_and_holds_cannot_stop_it() -> None:
    st = GuardState()
    st.apply(hold("home", 10.0, epoch=7), now=0.0)
    assert not st.apply({"op": "fence", "vfs": "home", "epoch": 6, "reason": "old"}, now=1.0)  # older
    assert not st.apply({"op": "fence", "vfs": "data", "epoch": 7}, now=1.0)  # nothing held
    assert st.take_requests() == []
    assert st.apply({"op": "fence", "vfs": "home", "epoch": 7, "reason": "VIP removal failed"}, now=1.0)
    ((h, why),) = st.take_requests()
    assert (h.vfs, h.epoch, why) == ("home", 7, "VIP removal failed") and st.all_held() == []
    ticket = st.begin(h, requested=True)
    assert not st.apply(hold("home", 30.0, epoch=7), now=1.5)  # the agent asked: the holding stays fenced
    assert ticket.superseded_by is None and st.all_held() == []
    # A fence op for a holding whose deadline fence is already running makes that fence unstoppable too.
    st2 = GuardState()
    t2 = running(st2, 10.5, epoch=3)
    assert st2.apply({"op": "fence", "vfs": "home", "epoch": 3}, now=10.6)
    assert not st2.apply(hold("home", 30.0, epoch=3), now=10.7)
    assert t2.requested and t2.superseded_by is None and st2.take_requests() == []


# --- fencing with fake actions and an injected clock -------------------------------------------


def test_escalation_order_kill_server_then_unmount_then_holders(tmp_path: Path) -> None:
    host = FakeHost(holders={500: "sleep"}, servers={str(tmp_path / "nfs/home/ganesha.conf"): [4242, 777]})
    f = fencer(host, tmp_path, release_bound=4.0, reset_command=["/sbin/reset-node"])
    (job,) = f.start([held()], lambda _h: "deadline passed")
    host.clock.now += 0.2
    rec = f.complete(job)
    assert host.calls == [("vip", "10.77.0.100"), ("kill", 4242),
                          ("find-servers", str(tmp_path / "nfs/home/ganesha.conf")),
                          ("kill", 777),  # found by its config path; 4242 is not killed twice
                          ("umount", "/mnt/x"), ("kill-holder", 500), ("umount", "/mnt/x")]
    assert rec["killed"] == [{"pid": 500, "comm": "sleep"}]
    assert "SIGKILLed holder 500 (sleep)" in rec["actions"]
    assert "unmounted /mnt/x (after: target is busy)" in rec["actions"]
    assert rec["reset"] is None and rec["final"] is True and rec["superseded"] is None
    assert 0.2 <= rec["released_after"] < 0.5
    assert (rec["device"], rec["epoch"]) == ("/dev/loop7", 7)
    assert read_actions(tmp_path) == [rec]


def test_the_agent_gets_a_quarter_of_the_bound_to_close_a_momentary_hold(tmp_path: Path) -> None:
    # The agent's own release check holds the device for an instant while the guard's fence of the
    # same disk runs: killing the agent for it would fence every other holding of the node too.
    host = FakeHost(holders={321: "nfs-ha-agent"})
    f = fencer(host, tmp_path, release_bound=4.0, agent_pid=321)
    f.agent_alive = lambda: True  # 321 stands for our parent
    (job,) = f.start([held()], lambda _h: "deadline passed")
    host.die_at[321] = job.started + 0.35  # closes its fd
    rec = f.complete(job)
    assert ("kill-holder", 321) not in host.calls and rec["killed"] == []
    assert "the agent (321) holds the filesystem: not killed in the first 1s" in rec["actions"]
    assert 0.35 <= rec["released_after"] < 0.5 and rec["reset"] is None


def test_an_agent_that_keeps_holding_is_killed_after_a_quarter_of_the_bound(tmp_path: Path) -> None:
    host = FakeHost(holders={321: "nfs-ha-agent", 500: "sleep"})
    f = fencer(host, tmp_path, release_bound=4.0, reset_command=["/sbin/reset-node"], agent_pid=321)
    f.agent_alive = lambda: True
    (job,) = f.start([held()], lambda _h: "deadline passed")
    kill_times: dict[int, float] = {}
    real_kill = host.kill_holder

    def kill(pid: int, devs: frozenset[int]) -> bool:
        kill_times.setdefault(pid, host.clock() - job.started)
        return real_kill(pid, devs)

    host.kill_holder = kill  # type: ignore[method-assign]
    f.actions = host.actions()
    rec = f.complete(job)
    assert kill_times[500] < 0.01  # any other holder: at once
    assert 1.0 <= kill_times[321] < 1.0 + guard.ROUND_PAUSE + 0.01  # the agent: at T_release/4
    assert rec["killed"] == [{"pid": 500, "comm": "sleep"}, {"pid": 321, "comm": "nfs-ha-agent"}]
    assert rec["reset"] is None and rec["released_after"] < 2.0  # released before the escalation


def test_the_agents_pid_is_not_spared_once_the_agent_is_gone(tmp_path: Path) -> None:
    host = FakeHost(holders={321: "reused"})
    f = fencer(host, tmp_path, release_bound=4.0, agent_pid=321)
    assert not f.agent_alive()  # 321 is not our parent: the agent died (or this is not its guard)
    rec = f.fence([held()], lambda _h: "agent exited")[0]
    assert rec["killed"] == [{"pid": 321, "comm": "reused"}] and rec["released_after"] < 0.5  # not T_release/4 = 1 s


def test_server_without_a_disk_needs_no_unmount(tmp_path: Path) -> None:
    host = FakeHost()
    f = fencer(host, tmp_path)
    (rec,) = f.fence([held(mountpoint=None, device=None)], lambda _h: "agent exited")
    assert host.kinds() == ["vip", "kill", "find-servers"]
    assert rec["released_after"] is None and rec["errors"] == []


def test_reset_command_runs_when_the_disk_stays_busy_past_half_the_bound(tmp_path: Path) -> None:
    host = FakeHost(holders={600: "writer"}, unkillable=[600])  # stuck in the kernel: SIGKILL does nothing
    f = fencer(host, tmp_path, release_bound=4.0, reset_command=["/sbin/reset-node", "--now"])
    (job,) = f.start([held()], lambda _h: "deadline passed")
    t0 = job.started
    rec = f.complete(job)
    resets = [c for c in host.calls if c[0] == "reset"]
    assert len(resets) == 1
    _, argv, timeout, at = resets[0]
    assert argv == ("/sbin/reset-node", "--now") and timeout == 2.0
    assert t0 + 2.0 <= at <= t0 + 2.0 + guard.ROUND_PAUSE  # on time, not a round late
    before = host.calls[:host.calls.index(resets[0])]
    assert [c[0] for c in before[:4]] == ["vip", "kill", "find-servers", "umount"] and ("kill-holder", 600) in before
    assert all("-l" not in c for c in host.calls)
    interim, final = read_actions(tmp_path)
    assert interim["final"] is False and interim["reset"]["command"] == ["/sbin/reset-node", "--now"]
    assert interim["reset"]["exit"] is None and interim["released_after"] is None  # written before the reset
    assert final == rec and final["final"] is True and final["reset"]["exit"] == 0
    assert final["reset"]["output"] == "node reset\n" and final["reset"]["after"] == pytest.approx(2.0, abs=0.11)
    assert final["released_after"] >= 2.0 and final["killed"] == [{"pid": 600, "comm": "writer"}]


def test_without_reset_command_the_broken_bound_is_critical_and_retries_go_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost(holders={600: "writer"}, unkillable=[600])
    host.die_at[600] = host.clock() + 30.0  # the stuck I/O finally ends
    f = fencer(host, tmp_path, release_bound=4.0, watchdog=True)
    (job,) = f.start([held()], lambda _h: "deadline passed")
    with caplog.at_level(logging.CRITICAL, logger="nfs-ha-guard"):
        rec = f.complete(job)
    msg = ("disk release bound broken: home still mounted/open after 2.0s and no reset command; "
           "the hardware watchdog is expected to reset the node")
    assert msg in caplog.text and msg in rec["errors"]
    assert "reset" not in host.kinds()
    assert rec["reset"] == {"command": None, "after": pytest.approx(2.0, abs=0.11), "exit": None, "output": "",
                            "error": msg, "watchdog": True}
    assert host.kinds().count("umount") > 25  # kept trying after the escalation, about once a second
    assert 30.0 <= rec["released_after"] < 31.5
    assert [r["final"] for r in read_actions(tmp_path)] == [False, True]


def test_a_release_does_not_stop_the_fence_but_a_renewed_hold_does(tmp_path: Path) -> None:
    st = GuardState()
    host = FakeHost(holders={600: "writer"}, unkillable=[600])
    host.die_at[600] = host.clock() + 1.0
    st.apply(hold("home", 50.0, epoch=7), now=host.clock())
    f = fencer(host, tmp_path, release_bound=10.0)
    host.clock.now = 50.5
    (job,) = f.start(st.take_due(host.clock()), lambda _h: "deadline", lambda h: st.begin(h))
    host.clock.on_sleep.append(lambda: st.apply({"op": "release", "vfs": "home", "epoch": 7}, host.clock()))
    rec = f.complete(job)
    assert rec["superseded"] is None and rec["released_after"] is not None
    assert host.calls[-1] == ("umount", "/mnt/x") and host.mounts == set()

    host2 = FakeHost(holders={600: "writer"}, unkillable=[600])
    st2 = GuardState()
    st2.apply(hold("home", 50.0, epoch=7), now=0.0)
    f2 = fencer(host2, tmp_path / "2", release_bound=10.0)
    host2.clock.now = 50.5
    (job2,) = f2.start(st2.take_due(host2.clock()), lambda _h: "deadline", lambda h: st2.begin(h))
    host2.clock.on_sleep.append(lambda: st2.apply(hold("home", 60.0, epoch=7), host2.clock()))
    rec2 = f2.complete(job2)
    assert rec2["superseded"] and "renewed" in rec2["superseded"] and rec2["released_after"] is None
    assert host2.kinds().count("umount") == 1 and "reset" not in host2.kinds()
    assert host2.mounts == {"/mnt/x"}  # left to the agent


def test_guard_fences_on_the_agents_request(tmp_path: Path) -> None:
    host = FakeHost()
    g = Guard(GuardState(), fencer(host, tmp_path), stdin_fd=-1, clock=host.clock)
    g.feed((json.dumps(hold("home", 1e9, epoch=7)) + "\n").encode())
    g.fence_due()
    assert host.calls == []
    g.feed(b'{"op": "fence", "vfs": "home", "epoch": 7, "reason": "VIP removal failed: EPERM"}\n')
    g.fence_due()
    g.join_workers()
    assert host.kinds() == ["vip", "kill", "find-servers", "umount"]
    (rec,) = read_actions(tmp_path)
    assert rec["reason"] == "agent asked: VIP removal failed: EPERM" and rec["released_after"] is not None
    assert g.state.running() == [] and g.state.all_held() == []


def test_eof_fences_everything_vips_first(tmp_path: Path) -> None:
    host = FakeHost(mounts=("/m/home", "/m/data"))
    r, w = os.pipe()
    g = Guard(GuardState(), fencer(host, tmp_path), stdin_fd=r)
    far = time.monotonic() + 60
    lines = [hold("home", far, mountpoint="/m/home", nfs_pid=11),
             hold("data", far, vip="10.77.0.101/24", mountpoint="/m/data", nfs_pid=22)]
    os.write(w, "".join(json.dumps(m) + "\n" for m in lines).encode())
    os.close(w)
    try:
        assert g.run() == 0
    finally:
        os.close(r)
    kinds = host.kinds()
    assert kinds[:2] == ["vip", "vip"]  # every VIP before anything slow
    for pid, mp in ((11, "/m/home"), (22, "/m/data")):
        assert host.calls.index(("kill", pid)) < host.calls.index(("umount", mp))
    records = read_actions(tmp_path)
    assert {r["vfs"] for r in records} == {"home", "data"}
    home = next(r for r in records if r["vfs"] == "home")
    assert home["reason"] == "agent exited" and home["vip"] == VIP and home["errors"] == []
    assert home["actions"][:2] == ["vip 10.77.0.100", "kill 11"]
    assert home["time"].endswith("Z")


def test_exit_message_fences_nothing(tmp_path: Path) -> None:
    host = FakeHost()
    r, w = os.pipe()
    g = Guard(GuardState(), fencer(host, tmp_path), stdin_fd=r)
    os.write(w, (json.dumps(hold("home", time.monotonic() + 60)) + '\n{"op": "exit"}\n').encode())
    os.close(w)
    try:
        assert g.run() == 0
    finally:
        os.close(r)
    assert host.calls == [] and read_actions(tmp_path) == []


def test_deadline_fences_in_order_and_keeps_running(tmp_path: Path) -> None:
    host = FakeHost()
    host.clock.now = 100.0
    g = Guard(GuardState(), fencer(host, tmp_path), stdin_fd=-1, clock=host.clock)
    g.state.apply(hold("home", 100.5), now=100.0)
    g.state.apply(hold("data", 200.0, vip="10.77.0.101/24"), now=100.0)
    g.fence_due()
    assert host.calls == []
    host.clock.now = 101.0
    g.fence_due()
    g.join_workers()
    assert host.kinds() == ["vip", "kill", "find-servers", "umount"]
    (record,) = read_actions(tmp_path)
    assert record["vfs"] == "home" and record["reason"] == "deadline passed by 0.500 s"
    assert [h.vfs for h in g.state.all_held()] == ["data"]


def test_a_hold_waiting_in_the_pipe_counts_before_the_deadline_is_judged(tmp_path: Path) -> None:
    host = FakeHost()
    r, w = os.pipe()
    try:
        g = Guard(GuardState(), fencer(host, tmp_path), stdin_fd=r, clock=host.clock)
        g.state.apply(hold("home", 100.5), now=100.0)
        os.write(w, (json.dumps(hold("home", 130.0)) + "\n").encode())  # sent in time, not read yet
        host.clock.now = 101.0
        g.fence_due()
        assert host.calls == [] and [h.deadline for h in g.state.all_held()] == [130.0]
    finally:
        os.close(r)
        os.close(w)


def test_failures_are_recorded_and_later_steps_still_run(tmp_path: Path) -> None:
    host = FakeHost()
    host.fail = {"vip", "kill"}
    (record,) = fencer(host, tmp_path).fence([held()], lambda _h: "agent exited")
    assert host.kinds() == ["vip", "kill", "find-servers", "umount"]
    assert record["actions"] == ["unmounted /mnt/x"]
    assert record["errors"] == ["removing VIP: vip broke", "stopping nfs server 4242: kill broke"]
    assert read_actions(tmp_path) == [record]


def test_timer_thread_escalates_while_the_worker_is_stuck(tmp_path: Path) -> None:
    """A umount stuck in the kernel must not delay the reset: the backstop thread runs it on time."""
    host = FakeHost(clock=None)
    stuck = threading.Event()

    def umount(path: str, timeout: float) -> str | None:
        stuck.wait(3.0)  # real time, far past the escalation
        host.mounts.discard(path)
        return None

    resets: list[float] = []

    def reset(argv: Sequence[str], timeout: float) -> dict[str, Any]:
        resets.append(time.monotonic())
        stuck.set()
        return {"exit": 0, "output": "", "error": None}

    actions = Actions(**{**host.actions().__dict__, "umount": umount, "reset": reset})
    f = Fencer(actions, tmp_path, release_bound=0.4, reset_command=["/sbin/reset-node"])
    jobs = f.start([held()], lambda _h: "deadline")
    t0 = jobs[0].started
    (rec,) = f.complete_all(jobs)
    assert len(resets) == 1 and 0.2 <= resets[0] - t0 < 0.6
    assert rec["reset"]["exit"] == 0 and rec["released_after"] is not None


# --- real host actions that need no root and no mount -----------------------------------------


def test_kill_server_checks_cmdline(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    fake = subprocess.Popen(["ganesha.nfsd", "30"], executable="/bin/sleep")  # argv[0] is what /proc shows
    try:
        for p in (sleeper, fake):  # just after exec, /proc/PID/cmdline can still be empty
            assert wait_for(lambda p=p: Path(f"/proc/{p.pid}/cmdline").read_bytes().endswith(b"30\0"), 2.0)
        assert "not ganesha.nfsd" in guard.kill_nfs_server(sleeper.pid)
        assert sleeper.poll() is None
        assert guard.kill_nfs_server(fake.pid) == f"nfs server {fake.pid} killed"
        assert fake.wait(timeout=2) == -signal.SIGKILL
        assert "already gone" in guard.kill_nfs_server(fake.pid)
    finally:
        for p in (sleeper, fake):
            p.kill()
            p.wait()


def test_servers_are_found_by_their_config_path(tmp_path: Path) -> None:
    """The fallback for a server whose pid the guard never learned (node.ganesha.stray_pids)."""
    conf = tmp_path / "nfs" / "home" / "ganesha.conf"
    # Stands in for `ganesha.nfsd -F -f CONF`: argv[0] and the -f argument are what count.
    proc = subprocess.Popen(["ganesha.nfsd", "-c", "import time; time.sleep(30)", "-F", "-f", str(conf)],
                            executable=sys.executable)
    try:
        assert wait_for(lambda: guard.find_nfs_servers(str(conf)) == [proc.pid], 2.0)
        assert guard.find_nfs_servers(str(tmp_path / "nfs" / "data" / "ganesha.conf")) == []
        host = FakeHost()
        actions = Actions(**{**host.actions().__dict__, "find_servers": guard.find_nfs_servers,
                             "kill_server": guard.kill_nfs_server})
        (rec,) = Fencer(actions, tmp_path).fence([held(nfs_pid=None, mountpoint=None, device=None)],
                                                 lambda _h: "deadline")
        assert proc.wait(timeout=2) == -signal.SIGKILL
        assert rec["actions"][-1] == f"nfs server {proc.pid} killed (found by its config {conf})"
    finally:
        proc.kill()
        proc.wait()


def _link(path: Path, target: Path | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def fake_proc(root: Path, data: Path, me: int) -> tuple[Path, int]:
    """A /proc tree: `self` (mount ns M1, net ns N1) and processes with various ways of holding the
    filesystem `data` lives on. Namespaces are symlinks to files, so their inodes differ."""
    proc = root / "proc"
    ns = root / "ns"
    ns.mkdir()
    for name in ("M1", "N1", "M2", "M3", "N3"):
        (ns / name).write_text(name)
    (data / "file").write_text("x")
    elsewhere = "/proc"  # procfs: never the filesystem under test
    dev = os.stat(data).st_dev

    def process(pid: int, mnt: str = "M1", net: str = "N1", cwd: Path | str = elsewhere, state: str = "S",
                fds: Sequence[Path | str] = (), maps: str = "", mountinfo: str = "") -> None:
        base = proc / str(pid)
        _link(base / "ns" / "mnt", ns / mnt)
        _link(base / "ns" / "net", ns / net)
        _link(base / "cwd", cwd)
        _link(base / "root", elsewhere)
        (base / "fd").mkdir()
        for i, target in enumerate(fds):
            _link(base / "fd" / str(i), target)
        (base / "stat").write_text(f"{pid} (p{pid}) {state} 1 1 1")
        (base / "comm").write_text(f"p{pid}\n")
        (base / "maps").write_text(maps)
        (base / "mountinfo").write_text(mountinfo)

    _link(proc / "self" / "ns" / "mnt", ns / "M1")
    _link(proc / "self" / "ns" / "net", ns / "N1")
    hexdev = f"{os.major(dev):02x}:{os.minor(dev):02x}"
    process(100, cwd=data)                                                # cwd on it
    process(101)                                                          # nothing on it
    process(102, fds=["/dev/null", data / "file"])                        # an open file
    process(103, maps=f"7f00-7f10 r-xp 00000000 {hexdev} 1234 {data}/lib.so\n"
                      "7f20-7f30 rw-p 00000000 00:00 0\n")                # a file mapping
    process(104, mnt="M2", mountinfo=f"36 35 {os.major(dev)}:{os.minor(dev)} / /mnt/x rw - xfs /dev/loop7 rw\n")
    process(105, mnt="M3", net="N3", cwd=data)                            # another node's process
    process(106, cwd=data, state="Z")                                     # a zombie holds nothing
    process(me, cwd=data)                                                 # the guard itself
    process(107, mnt="M2", cwd=elsewhere, mountinfo="36 35 0:99 / /other rw - tmpfs t rw\n")
    return proc, dev


def test_holders_are_found_in_a_fake_proc_tree(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    proc, dev = fake_proc(tmp_path, data, me=99999)
    holders = guard.find_holders(frozenset({dev}), proc_root=proc, me=99999)
    assert holders == [(100, "p100"), (102, "p102"), (103, "p103"), (104, "p104")]
    assert guard.find_holders(frozenset(), proc_root=proc, me=99999) == []
    assert [p for p, _other in guard.node_pids(proc, me=99999)] == [100, 101, 102, 103, 104, 107]


def test_still_mounted_lists_the_mount_point_and_every_mount_of_the_filesystem(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "40 22 7:3 / /mnt/x rw - xfs /dev/loop3 rw\n"
                    "41 40 7:3 /sub /mnt/x/bind rw - xfs /dev/loop3 rw\n"
                    "42 22 7:3 / /srv/other\\040copy rw - xfs /dev/loop3 rw\n"
                    "43 22 0:50 / /mnt/y rw - tmpfs tmpfs rw\n")
    devs = frozenset({os.makedev(7, 3)})
    assert guard.still_mounted("/mnt/x", devs, info) == ["/mnt/x/bind", "/mnt/x", "/srv/other copy"]
    assert guard.still_mounted("/mnt/y/", frozenset(), info) == ["/mnt/y"]  # whatever sits on the mount point
    assert guard.still_mounted("/mnt/z", devs - devs, info) == []


def test_fs_devices_never_names_the_root_filesystem(tmp_path: Path) -> None:
    assert guard.fs_devices(str(tmp_path / "not-mounted"), None) == frozenset()  # a plain directory
    assert guard.fs_devices("/", "/dev/null") == frozenset()  # / is mounted, but never "the filesystem"
    assert guard.fs_devices(None, str(tmp_path)) == frozenset()  # not a block device
    blocks = [p for p in Path("/dev").glob("loop[0-9]*") if stat.S_ISBLK(p.stat().st_mode)]
    if blocks:
        assert guard.fs_devices(None, str(blocks[0])) == frozenset({blocks[0].stat().st_rdev})


@pytest.fixture
def other_fs() -> Iterator[Path]:
    """A directory on a filesystem that is not / (every process's root is on /, so that one is held
    by everything): /dev/shm, as a stand-in for the VFS filesystem."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat("/").st_dev:
        pytest.skip("no /dev/shm filesystem apart from /")
    path = Path(tempfile.mkdtemp(prefix="nfsha-guard-test-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_kill_holder_kills_a_real_holder_and_spares_others(other_fs: Path) -> None:
    holder = subprocess.Popen(["sleep", "30"], cwd=other_fs)
    other = subprocess.Popen(["sleep", "30"], cwd="/proc")
    devs = frozenset({os.stat(other_fs).st_dev})
    try:
        assert wait_for(lambda: Path(f"/proc/{holder.pid}/cmdline").read_bytes().startswith(b"sleep"), 2.0)
        pids = [p for p, _comm in guard.find_holders(devs)]
        assert holder.pid in pids and other.pid not in pids and os.getpid() not in pids
        assert not guard.kill_holder(other.pid, devs)
        assert other.poll() is None
        assert guard.kill_holder(holder.pid, devs)
        assert holder.wait(timeout=2) == -signal.SIGKILL
        assert not guard.kill_holder(holder.pid, devs)  # gone
    finally:
        for p in (holder, other):
            p.kill()
            p.wait()


def test_unmount_is_never_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    argvs: list[list[str]] = []

    class Busy:
        returncode = 32

        def __init__(self, argv: list[str], **_kw: Any) -> None:
            argvs.append(argv)

        def communicate(self, timeout: float | None = None) -> tuple[str, str]:
            return "umount: /mnt/x: target is busy.\n", ""

    monkeypatch.setattr(guard.subprocess, "Popen", Busy)
    assert guard.run_umount("/mnt/x", 1.0) == "umount: /mnt/x: target is busy."
    assert argvs == [["umount", "--", "/mnt/x"]]
    src = inspect.getsource(guard)
    assert '"-l"' not in src and "MNT_DETACH" not in src and "umount2" not in src


def test_a_hanging_umount_is_not_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "umount"
    # Like a umount stuck in the kernel, it outlives its SIGKILL: the background child keeps the
    # output pipe open, so the reaper waits ~3 s (a plain `sleep` would be reaped at once, racing
    # the second call).
    fake.write_text("#!/bin/sh\nsleep 3 &\nwait\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    start = time.monotonic()
    assert "did not return within 0.2s" in (guard.run_umount("/mnt/hang", 0.2) or "")
    assert "has not returned" in (guard.run_umount("/mnt/hang", 0.2) or "")  # no second one piles up
    assert time.monotonic() - start < 2.5
    assert wait_for(lambda: "/mnt/hang" not in guard._umounts, 8.0)  # reaped once it ended


def test_run_reset_reports_exit_output_and_kills_a_slow_command(tmp_path: Path) -> None:
    ok = tmp_path / "reset-ok"
    ok.write_text("#!/bin/sh\necho resetting \"$@\"\nexit 3\n")
    slow = tmp_path / "reset-slow"
    slow.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {tmp_path}/child\nwait\n")
    for p in (ok, slow):
        p.chmod(0o755)
    assert guard.run_reset([str(ok), "node-a"], 5.0) == {"exit": 3, "output": "resetting node-a\n", "error": None}
    start = time.monotonic()
    res = guard.run_reset([str(slow)], 0.3)
    assert time.monotonic() - start < 2.0
    assert res["exit"] == -signal.SIGKILL and "no exit within 0.3s" in res["error"]
    child = int((tmp_path / "child").read_text())
    assert wait_for(lambda: guard._gone(child), 2.0)  # its whole process group went
    assert "cannot run it" in guard.run_reset([str(tmp_path / "missing")], 1.0)["error"]


# --- options and the real process, --dry-run ---------------------------------------------------


def wait_for(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.parametrize("args", [
    ["--reset-command", "/sbin/reboot"],           # not JSON
    ["--reset-command", '["reboot"]'],             # not absolute
    ["--reset-command", '["/sbin/reboot", 3]'],
    ["--reset-command", '"/sbin/reboot"'],
    ["--release-bound", "0"],
    ["--release-bound", "nan"],
    ["--release-bound", "soon"],
])
def test_bad_options_are_refused(args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        guard.main(["--state-dir", str(tmp_path), "--interface", "lo", "--dry-run", *args])
    assert exc.value.code == 2 and f"argument {args[0]}:" in capsys.readouterr().err
    with pytest.raises(ValueError):
        GuardClient(tmp_path, "eth-test", dry_run=True, reset_command=["reboot"])
    with pytest.raises(ValueError):
        GuardClient(tmp_path, "eth-test", dry_run=True, release_bound=-1)


def argv_text(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")


def test_client_passes_its_options_on(tmp_path: Path) -> None:
    client = GuardClient(tmp_path, "eth-test", dry_run=True, release_bound=6.0, reset_command=["/x/reset", "a b"],
                         watchdog=True, nfs_workroot=tmp_path / "work")
    try:
        # right after Popen the child may not have exec'd yet: its cmdline is still this process's
        assert wait_for(lambda: "node.guard" in argv_text(client.proc.pid), 3.0)
        argv = argv_text(client.proc.pid).split("\0")
        assert argv[argv.index("--release-bound") + 1] == "6.0"
        assert json.loads(argv[argv.index("--reset-command") + 1]) == ["/x/reset", "a b"]
        assert argv[argv.index("--nfs-workroot") + 1] == str(tmp_path / "work")
        assert "--watchdog" in argv and "--dry-run" in argv
        assert client.hold("home", VIP, time.monotonic() + 60, "/m", None, 3, device="/dev/loop3")
        assert client.fence_now("home", 3, "VIP removal failed")
        assert wait_for(lambda: read_actions(tmp_path), 3.0)
        (rec,) = read_actions(tmp_path)
        assert rec["reason"] == "agent asked: VIP removal failed" and rec["device"] == "/dev/loop3"
        assert client.close_clean() == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()


def test_guard_runs_real_time_with_locked_memory(tmp_path: Path) -> None:
    log_path = tmp_path / "guard.log"
    with open(log_path, "w") as err:
        client = GuardClient(tmp_path, "eth-test", dry_run=True, stderr=err.fileno())
    try:
        assert wait_for(lambda: "guarding" in log_path.read_text(), 5.0)
        line = next(x for x in log_path.read_text().splitlines() if "guarding" in x)
        policy = os.sched_getscheduler(client.proc.pid)
        if "SCHED_FIFO priority 10" in line:
            assert policy == os.SCHED_FIFO and os.sched_getparam(client.proc.pid).sched_priority == 10
        else:
            assert policy == os.SCHED_OTHER and ("nice -20" in line or "normal priority" in line)
        status = Path(f"/proc/{client.proc.pid}/status").read_text()
        locked = int(next(x for x in status.splitlines() if x.startswith("VmLck:")).split()[1])
        assert ("memory locked" in line) == (locked > 0)
        if os.geteuid() == 0:  # root here: both must have worked
            assert policy == os.SCHED_FIFO and locked > 0
        assert os.readlink(f"/proc/{client.proc.pid}/cwd") == "/"
    finally:
        assert client.close_clean() == 0


def test_process_fences_when_agent_pipe_closes(tmp_path: Path) -> None:
    client = GuardClient(tmp_path, "eth-test", dry_run=True)
    try:
        assert client.hold("home", VIP, time.monotonic() + 60, "/run/x/mnt/home", 1234)
        assert client.ping() and client.alive()
        time.sleep(0.3)  # let it read the hold (it buffers in the pipe anyway)
        assert client.proc.stdin is not None
        client.proc.stdin.close()  # as if the agent died
        assert client.proc.wait(timeout=2.0) == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
    (record,) = read_actions(tmp_path)
    assert record["vfs"] == "home" and record["reason"] == "agent exited" and record["dry_run"] is True
    assert record["actions"] == ["would remove VIP 10.77.0.100/24 from eth-test", "would kill nfs server 1234",
                                 "would unmount /run/x/mnt/home"]
    assert record["final"] is True and record["reset"] is None and record["released_after"] is not None
    assert not client.alive()
    assert not client.ping()  # a write to a dead guard reports failure, never raises


def test_process_fences_when_agent_is_killed(tmp_path: Path) -> None:
    # A helper "agent" starts the guard, says it holds a VFS, and is then SIGKILLed.
    script = textwrap.dedent(f"""
        import sys, time
        from node.guard import GuardClient
        c = GuardClient({str(tmp_path)!r}, "eth-test", dry_run=True)
        c.hold("home", {VIP!r}, time.monotonic() + 60, None, None)
        print(c.proc.pid, flush=True)
        time.sleep(60)
    """)
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    assert agent.stdout is not None
    guard_pid = int(agent.stdout.readline())
    try:
        time.sleep(0.3)
        agent.kill()
        agent.wait()
        assert wait_for(lambda: guard._gone(guard_pid), 2.0), "guard still running after the agent died"
    finally:
        if not guard._gone(guard_pid):
            os.kill(guard_pid, signal.SIGKILL)
    (record,) = read_actions(tmp_path)
    assert record["reason"] == "agent exited"
    assert record["actions"] == ["would remove VIP 10.77.0.100/24 from eth-test"]


def test_process_deadline_passes_and_guard_keeps_running(tmp_path: Path) -> None:
    client = GuardClient(tmp_path, "eth-test", dry_run=True)
    try:
        client.hold("home", VIP, time.monotonic() + 0.3, None, 4321)
        client.hold("data", "10.77.0.101/24", time.monotonic() + 60, None, None)
        assert wait_for(lambda: read_actions(tmp_path), 3.0)
        (record,) = read_actions(tmp_path)
        assert record["vfs"] == "home" and record["reason"].startswith("deadline passed by ")
        assert float(record["reason"].split()[3]) < 1.0
        assert client.alive()
        assert client.ping()
        time.sleep(0.2)
        assert client.proc.poll() is None
        assert client.release("data")
        assert client.close_clean() == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
    assert len(read_actions(tmp_path)) == 1  # neither release nor the clean exit fenced anything


def test_process_renewals_in_a_batch_keep_a_holding_and_let_another_lapse(tmp_path: Path) -> None:
    """The agent's renewals as it sends them (hold_many, op holds) to a real guard process: a holding
    renewed in a batch is kept, one the batch no longer renews is fenced when its deadline passes."""
    client = GuardClient(tmp_path, "eth-test", dry_run=True)
    try:
        now = time.monotonic()
        items = [{"vfs": vfs, "vip": vip, "deadline": now + 0.5, "mountpoint": None, "nfs_pid": None,
                  "epoch": epoch, "device": None}
                 for vfs, vip, epoch in (("home", VIP, 3), ("data", "10.77.0.101/24", 4))]
        assert client.hold_many(items)
        assert client.hold_many([{**items[1], "deadline": now + 60}])  # only data is renewed
        assert wait_for(lambda: read_actions(tmp_path), 3.0)
        time.sleep(0.3)  # data's old deadline has passed too
        assert [r["vfs"] for r in read_actions(tmp_path)] == ["home"]
        assert client.close_clean() == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()


def test_close_clean_fences_nothing(tmp_path: Path) -> None:
    client = GuardClient(tmp_path, "eth-test", dry_run=True)
    client.hold("home", VIP, time.monotonic() + 60, "/run/x/mnt/home", None)
    assert client.close_clean() == 0
    assert read_actions(tmp_path) == []
    assert not client.alive()


def test_sigterm_fences_everything(tmp_path: Path) -> None:
    client = GuardClient(tmp_path, "eth-test", dry_run=True)
    try:
        client.hold("home", VIP, time.monotonic() + 60, None, None)
        # Wait until the guard catches SIGTERM (SigCgt bit 15); the hold may still be in the pipe.
        status = Path(f"/proc/{client.proc.pid}/status")
        assert wait_for(lambda: any(line.startswith("SigCgt:") and int(line.split()[1], 16) & (1 << 14)
                                    for line in status.read_text().splitlines()), 5.0)
        client.proc.terminate()
        assert client.proc.wait(timeout=2.0) == 0
    finally:
        if client.proc.poll() is None:
            client.proc.kill()
    (record,) = read_actions(tmp_path)
    assert record["reason"] == "guard stopped by SIGTERM"


def test_a_slow_fence_of_a_vip_only_vfs_resets_nothing(tmp_path: Path) -> None:
    """No disk, no disk bound: however long the rest of its fence takes (a /proc scan for strays on a
    busy node), a VIP-only VFS never escalates to the reset command."""
    host = FakeHost(clock=None)
    resets: list[float] = []

    def slow_find(conf: str) -> list[int]:
        time.sleep(0.5)  # past half the bound (0.4 s / 2)
        return []

    def reset(argv: Sequence[str], timeout: float) -> dict[str, Any]:
        resets.append(time.monotonic())
        return {"exit": 0, "output": "", "error": None}

    actions = Actions(**{**host.actions().__dict__, "find_servers": slow_find, "reset": reset})
    f = Fencer(actions, tmp_path, release_bound=0.4, reset_command=["/sbin/reset-node"])
    (rec,) = f.complete_all(f.start([held(nfs_pid=None, mountpoint=None, device=None)], lambda _h: "deadline"))
    time.sleep(0.1)
    assert resets == [] and rec["reset"] is None


def test_guard_logs_json_at_the_agents_level(tmp_path: Path) -> None:
    """log_format json and log_level reach the guard: at WARNING its start-up INFO line is not logged,
    and what it logs is one JSON object per line."""
    log_path = tmp_path / "guard.log"
    with open(log_path, "w") as err:
        client = GuardClient(tmp_path, "eth-test", dry_run=True, stderr=err.fileno(), log_level="warning",
                             log_format="json")
    try:
        client._send({"op": "nonsense"})  # logged at WARNING: an unknown message changes nothing
        assert wait_for(lambda: log_path.read_text().strip() != "", 5.0)
    finally:
        assert client.close_clean() == 0
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert records and all(r["program"] == "nfs-ha-guard" and r["level"] in ("WARNING", "ERROR") for r in records)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    assert not any("guarding" in r["message"] for r in records)  # its INFO line
