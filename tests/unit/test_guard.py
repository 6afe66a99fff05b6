"""node/guard.py: the fence guard's core with fake actions, and the real process in --dry-run mode."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from node import guard
from node.guard import Actions, BadMessage, Fencer, Guard, GuardClient, GuardState, read_actions

VIP = "10.77.0.100/24"


def hold(vfs: str, deadline: float, vip: str = VIP, mountpoint: str | None = "/mnt/x", nfs_pid: int | None = 4242,
         epoch: int | None = None):
    msg = {"op": "hold", "vfs": vfs, "vip": vip, "deadline": deadline, "mountpoint": mountpoint, "nfs_pid": nfs_pid}
    return msg if epoch is None else {**msg, "epoch": epoch}


class Recorder:
    """Fake host actions that remember the order of the calls."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail or set()

    def _do(self, kind: str, arg: str) -> str:
        self.calls.append((kind, arg))
        if kind in self.fail:
            raise RuntimeError(f"{kind} broke")
        return f"{kind} {arg}"

    def actions(self) -> Actions:
        return Actions(remove_vip=lambda vip: self._do("vip", str(vip.ip)),
                       kill_server=lambda pid: self._do("kill", str(pid)),
                       unmount=lambda mp, _superseded: self._do("umount", mp))


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
    st.apply(hold("home", 10.0), now=0.0)
    gen = st.generation("home")
    st.apply({"op": "ping"}, now=1.0)
    assert len(st.all_held()) == 1 and st.generation("home") == gen
    st.apply({"op": "release", "vfs": "home"}, now=2.0)
    assert st.all_held() == [] and st.due(100.0) == []
    assert st.generation("home") == gen + 1


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
    (held,) = st.all_held()
    assert (held.epoch, held.deadline, held.nfs_pid) == (142, 11.0, 200)
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
    hold("-home", 1.0),
    hold("x" * 64, 1.0),
    hold("home", 1.0, vip="10.77.0.300/24"),
    hold("home", 1.0, vip="fd00::1/64"),
    {**hold("home", 1.0), "vip": 17},
    {**hold("home", 1.0), "deadline": "soon"},
    {**hold("home", 1.0), "deadline": True},
    {**hold("home", 1.0), "deadline": float("nan")},
    hold("home", 1.0, mountpoint="relative/mnt"),
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
    rec = Recorder()
    g = Guard(GuardState(), Fencer(rec.actions(), tmp_path), stdin_fd=-1, clock=lambda: 0.0)
    good = json.dumps(hold("home", 10.0)).encode()
    g.feed(b"not json\n" + json.dumps(hold("bad_name", 1.0)).encode() + b"\n" + good[:20])
    assert g.state.all_held() == []
    g.feed(good[20:] + b"\n")
    assert [h.vfs for h in g.state.all_held()] == ["home"]
    assert rec.calls == []


def test_hold_with_null_mount_and_pid() -> None:
    st = GuardState()
    st.apply(hold("home", 1.0, mountpoint=None, nfs_pid=None), now=0.0)
    (h,) = st.all_held()
    assert h.mountpoint is None and h.nfs_pid is None and h.vip == ipaddress.IPv4Interface(VIP)


# --- fencing with fake actions ------------------------------------------------------------------


def test_eof_fences_everything_vips_first(tmp_path: Path) -> None:
    rec = Recorder()
    r, w = os.pipe()
    g = Guard(GuardState(), Fencer(rec.actions(), tmp_path), stdin_fd=r)
    far = time.monotonic() + 60
    lines = [hold("home", far, mountpoint="/m/home", nfs_pid=11),
             hold("data", far, vip="10.77.0.101/24", mountpoint="/m/data", nfs_pid=22)]
    os.write(w, "".join(json.dumps(m) + "\n" for m in lines).encode())
    os.close(w)
    try:
        assert g.run() == 0
    finally:
        os.close(r)
    kinds = [k for k, _ in rec.calls]
    assert kinds[:2] == ["vip", "vip"]  # every VIP before anything slow
    slow = [("kill", "11"), ("umount", "/m/home"), ("kill", "22"), ("umount", "/m/data")]
    assert sorted(rec.calls[2:]) == sorted(slow)
    for pid, mp in (("11", "/m/home"), ("22", "/m/data")):
        assert rec.calls.index(("kill", pid)) < rec.calls.index(("umount", mp))
    records = read_actions(tmp_path)
    assert {r["vfs"] for r in records} == {"home", "data"}
    home = next(r for r in records if r["vfs"] == "home")
    assert home["reason"] == "agent exited" and home["vip"] == VIP and home["errors"] == []
    assert home["actions"] == ["vip 10.77.0.100", "kill 11", "umount /m/home"]
    assert home["time"].endswith("Z")


def test_exit_message_fences_nothing(tmp_path: Path) -> None:
    rec = Recorder()
    r, w = os.pipe()
    g = Guard(GuardState(), Fencer(rec.actions(), tmp_path), stdin_fd=r)
    os.write(w, (json.dumps(hold("home", time.monotonic() + 60)) + '\n{"op": "exit"}\n').encode())
    os.close(w)
    try:
        assert g.run() == 0
    finally:
        os.close(r)
    assert rec.calls == [] and read_actions(tmp_path) == []


def test_deadline_fences_in_order_and_keeps_running(tmp_path: Path) -> None:
    rec = Recorder()
    now = [100.0]
    g = Guard(GuardState(), Fencer(rec.actions(), tmp_path), stdin_fd=-1, clock=lambda: now[0])
    g.state.apply(hold("home", 100.5), now=100.0)
    g.state.apply(hold("data", 200.0, vip="10.77.0.101/24"), now=100.0)
    g.fence_due()
    assert rec.calls == []
    now[0] = 101.0
    g.fence_due()
    g.join_workers()
    assert rec.calls == [("vip", "10.77.0.100"), ("kill", "4242"), ("umount", "/mnt/x")]
    (record,) = read_actions(tmp_path)
    assert record["vfs"] == "home" and record["reason"] == "deadline passed by 0.500 s"
    assert [h.vfs for h in g.state.all_held()] == ["data"]


def test_failures_are_recorded_and_later_steps_still_run(tmp_path: Path) -> None:
    rec = Recorder(fail={"vip", "kill"})
    st = GuardState()
    st.apply(hold("home", 1.0), now=0.0)
    (record,) = Fencer(rec.actions(), tmp_path).fence(st.take_all(), lambda _h: "agent exited")
    assert [k for k, _ in rec.calls] == ["vip", "kill", "umount"]
    assert record["actions"] == ["umount /mnt/x"]
    assert record["errors"] == ["removing VIP: vip broke", "stopping nfs server 4242: kill broke"]
    assert read_actions(tmp_path) == [record]


def test_new_hold_supersedes_slow_steps(tmp_path: Path) -> None:
    rec = Recorder()
    st = GuardState()
    st.apply(hold("home", 1.0), now=0.0)
    fencer = Fencer(rec.actions(), tmp_path)
    (job,) = fencer.start(st.take_due(2.0), lambda _h: "deadline", st.generation)
    st.apply(hold("home", 50.0), now=2.1)  # the agent is back before the slow steps ran
    record = fencer.complete(job, lambda j: st.generation(j.held.vfs) != j.generation)
    assert rec.calls == [("vip", "10.77.0.100")]
    assert record["actions"][-1].startswith("superseded")


def test_read_actions_skips_torn_lines(tmp_path: Path) -> None:
    assert read_actions(tmp_path) == []
    (tmp_path / guard.ACTIONS_FILE).write_text('{"vfs": "home"}\n{"vfs": "da')
    assert read_actions(tmp_path) == [{"vfs": "home"}]


# --- real host actions that need no root --------------------------------------------------------


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


def test_unmount_of_unmounted_dir_is_noop(tmp_path: Path) -> None:
    assert guard.unmount_path(str(tmp_path)) == "not mounted"


def test_busy_unmount_gives_up_when_superseded_and_never_goes_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new hold while the unmount is busy: the agent is back and its NFS server uses the mount.
    A lazy unmount now would leave the mount point an empty directory for the next server."""
    import node.storage

    calls: list[list[str]] = []
    monkeypatch.setattr(node.storage, "mounted_at", lambda _path: "/dev/loop9")
    monkeypatch.setattr(guard, "_umount", lambda argv: calls.append(argv) or "target is busy")
    rounds = iter([False, False, True])
    result = guard.unmount_path("/mnt/x", lambda: next(rounds, True), wait=30.0)
    assert result.startswith("superseded by a new hold while busy (target is busy)")
    assert calls and all("-l" not in argv for argv in calls)
    calls.clear()
    with pytest.raises(RuntimeError, match="umount -l failed too"):  # not superseded: lazy at the end
        guard.unmount_path("/mnt/x", lambda: False, wait=0.0)
    assert calls[-1] == ["umount", "-l", "--", "/mnt/x"]


# --- the real process, --dry-run ----------------------------------------------------------------


def wait_for(cond, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


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
