"""Find lab processes by namespace inode and stop them by PID (never by name)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PROC = Path("/proc")


def ns_inode(path: str | os.PathLike[str]) -> int | None:
    """Inode of a namespace file (/run/netns/X or an nsfs bind mount); None if missing."""
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _ns_link_inode(pid: str, kind: str) -> int | None:
    # /proc/PID/ns/net reads like "net:[4026532281]".
    try:
        link = os.readlink(PROC / pid / "ns" / kind)
    except OSError:
        return None
    return int(link[link.index("[") + 1 : -1])


def mnt_inode(pid: int) -> int | None:
    """Mount-namespace inode of ``pid`` (None if it is gone)."""
    return _ns_link_inode(str(pid), "mnt")


def net_inode(pid: int) -> int | None:
    """Network-namespace inode of ``pid`` (None if it is gone)."""
    return _ns_link_inode(str(pid), "net")


def pids_in_namespaces(net_inodes: Iterable[int] = (), mnt_inodes: Iterable[int] = ()) -> list[int]:
    """PIDs whose network or mount namespace is one of the given inodes (never our own pid)."""
    nets, mnts = set(net_inodes), set(mnt_inodes)
    found: list[int] = []
    if not nets and not mnts:
        return found
    me = os.getpid()
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) in (me, 1):
            continue
        if (nets and _ns_link_inode(entry.name, "net") in nets) or (
            mnts and _ns_link_inode(entry.name, "mnt") in mnts
        ):
            found.append(int(entry.name))
    return sorted(found)


def wait_entered(pid: int, net_inode: int | None, mnt_inode: int | None, timeout: float = 5.0) -> bool:
    """Wait until ``pid`` has joined the given namespaces (nsenter/ip setns after fork).

    Without this a kill-by-namespace scan right after a spawn can miss the new process.
    False if it exited first or the timeout passed.
    """
    deadline = time.monotonic() + timeout
    while is_alive(pid):
        net_ok = net_inode is None or _ns_link_inode(str(pid), "net") == net_inode
        mnt_ok = mnt_inode is None or _ns_link_inode(str(pid), "mnt") == mnt_inode
        if net_ok and mnt_ok:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)
    return False


def is_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    # The state letter follows the ")" that closes the command name.
    return stat[stat.rindex(")") + 2] not in "ZX"


def _reap(pid: int) -> int | None:
    """Collect ``pid`` if it is our exited child; its exit code (negative = signal) or None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done == pid else None


def signal_pid(pid: int, sig: int) -> bool:
    """Send ``sig``; False when the process is already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every pid has exited (reaping our children); return the ones still alive."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        for pid in list(pending):
            _reap(pid)
            if not is_alive(pid):
                pending.discard(pid)
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        time.sleep(0.02)


def kill_all(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL every pid and wait for them; return the pids that were signalled."""
    hit = [pid for pid in pids if signal_pid(pid, signal.SIGKILL)]
    wait_gone(hit, timeout)
    return hit


def kill_until_none_left(find: Callable[[], Iterable[int]], timeout: float = 5.0) -> list[int]:
    """SIGKILL what ``find`` returns, again and again, until it finds nothing alive (or the timeout
    passed): a process forked between a scan and the kill (an agent starting a umount, say) is only
    caught by the next scan. Returns every pid signalled, in order."""
    hit: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in find() if is_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return hit
        for pid in alive:
            if signal_pid(pid, signal.SIGKILL) and pid not in hit:
                hit.append(pid)
        wait_gone(alive, min(0.2, max(0.0, deadline - time.monotonic())))


def stop(
    pid: int,
    sig: int = signal.SIGTERM,
    timeout: float = 5.0,
    popen: subprocess.Popen[bytes] | None = None,
) -> int | None:
    """Send ``sig``, wait up to ``timeout`` for exit, then SIGKILL.

    Returns the exit code (negative = killed by that signal) when it is known, i.e. when the
    process is our child; for someone else's child /proc is polled and None is returned.
    """
    if popen is not None:
        if popen.poll() is None:
            signal_pid(pid, sig)
            try:
                return popen.wait(timeout)
            except subprocess.TimeoutExpired:
                signal_pid(pid, signal.SIGKILL)
        return popen.wait(timeout)
    signal_pid(pid, sig)
    deadline = time.monotonic() + timeout
    killed = False
    while True:
        code = _reap(pid)
        if code is not None:
            return code
        if not is_alive(pid):
            # It may have turned zombie just now; reap it if it is ours.
            return _reap(pid)
        if time.monotonic() >= deadline:
            if killed:
                return None
            # Escalate once, then give it a short grace to disappear.
            signal_pid(pid, signal.SIGKILL)
            killed, deadline = True, time.monotonic() + 2.0
        time.sleep(0.02)
