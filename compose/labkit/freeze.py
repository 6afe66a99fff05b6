"""fsfreeze in the lab: freeze a node's mount, and thaw lab disks wherever the lab can reach them.

All lab nodes share one kernel, and with it one superblock per disk: a freeze made on node-a
would follow the disk to node-b (its mount reuses the frozen superblock and its writes hang in
D state, unkillable). Measured here (kernel 6.18): `umount` of a frozen, idle xfs succeeds and
leaves the superblock frozen and detached; the device stays busy and the next mount, in any
namespace, gets the frozen superblock back. So:

- a node's freeze is thawed before its mount namespace is dropped (crash, reset, teardown);
- ``FreezeWatch`` makes a freeze local to its node, as on real hardware: once the frozen node
  neither mounts nor holds the disk any more, the superblock is thawed (through another node's
  mount of it, or a private mount when nothing else reaches it);
- a thaw only ever uses FITHAW (or `fsfreeze -u`) on lab disks (loop devices backed by
  STATE/disks/*.img), never on any other filesystem of the host.

A superblock is reached through a mount in a node's pinned mount namespace (`nsenter ...
fsfreeze -u POINT`), or from the root namespace through /proc: a process's cwd, root or open
file on the filesystem (/proc/PID/fd/N), or a mount in its namespace (/proc/PID/root/POINT).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterable

from . import disks, mntns, mountinfo, procs
from .nscmd import node_enter
from .runner import run
from .state import StateDir
from .topology import NODES, Member

FITHAW = 0xC0045878  # _IOWR('X', 120, int)
FREEZE_TIMEOUT = 60.0


def _dev(majmin: str) -> int | None:
    try:
        major, minor = majmin.split(":")
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def freeze_mount(state: StateDir, member: Member, point: str, timeout: float = FREEZE_TIMEOUT) -> None:
    """`fsfreeze -f POINT` inside the node (flushes dirty data first, so it may take a while)."""
    run(node_enter(member, str(state.mntns_file(member.name)), ["fsfreeze", "-f", point]), timeout=timeout)


def node_pids(state: StateDir, member: Member) -> list[int]:
    """Processes of a node: in its network namespace or its pinned mount namespace."""
    net = procs.ns_inode(member.netns_path)
    pin = state.mntns_file(member.name)
    mnt = procs.ns_inode(pin) if mntns.is_pinned(pin) else None
    return procs.pids_in_namespaces([net] if net is not None else [], [mnt] if mnt is not None else [])


def holdings(pid: int, devs: Iterable[int]) -> dict[int, str]:
    """{device: a /proc path that reaches its filesystem} for the lab devices among ``devs`` that
    ``pid`` uses: cwd, root, an open file, or a mount in its own mount namespace."""
    wanted = set(devs)
    found: dict[int, str] = {}
    base = f"/proc/{pid}"
    candidates = [f"{base}/cwd", f"{base}/root"]
    with contextlib.suppress(OSError):
        candidates += [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
    for path in candidates:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        if dev in wanted and dev not in found:
            found[dev] = path
    try:
        with open(f"{base}/mountinfo") as fh:
            text = fh.read()
    except OSError:
        text = ""
    for entry in mountinfo.parse(text):
        dev = _dev(entry.majmin)
        if dev in wanted and dev not in found:
            found[dev] = f"{base}/root{entry.point}"
    return found


def thaw_path(path: str) -> bool | None:
    """FITHAW on the filesystem of ``path``: True if it was frozen and is thawed now, False if
    it was not frozen, None if the path could not be used (gone, not ours)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError as exc:
        return False if exc.errno == errno.EINVAL else None
    finally:
        os.close(fd)


def _thaw_in_node(state: StateDir, node: str, point: str) -> bool | None:
    proc = run(node_enter(NODES[node], str(state.mntns_file(node)), ["fsfreeze", "-u", point]),
               check=False, timeout=30)
    if proc.returncode == 0:
        return True
    return False if "Invalid argument" in proc.stderr else None


def thaw(state: StateDir, nodes: Iterable[str], pids: Iterable[int], only: int | None = None) -> list[str]:
    """Thaw every frozen lab disk (or only device number ``only``) reachable through the pinned
    mount namespaces of ``nodes`` or through ``pids``. Returns what was thawed, e.g.
    ["chaos-v0 via node-a:/run/nfs-ha/node-a/mnt/v0"]. A disk found not frozen is left alone."""
    return _thaw(state, nodes, pids, only)[0]


def _thaw(state: StateDir, nodes: Iterable[str], pids: Iterable[int],
          only: int | None) -> tuple[list[str], set[int]]:
    """(what was thawed, the devices reached at all, frozen or not)."""
    devs = disks.lab_disk_devs(state)
    if only is not None:
        devs = {d: n for d, n in devs.items() if d == only}
    done: set[int] = set()
    thawed: list[str] = []
    if not devs:
        return thawed, done
    for node in nodes:
        for entry in mountinfo.node_entries(state, node) or []:
            dev = _dev(entry.majmin)
            if dev in devs and dev not in done:
                result = _thaw_in_node(state, node, entry.point)
                if result is not None:
                    done.add(dev)
                if result:
                    thawed.append(f"{devs[dev]} via {node}:{entry.point}")
    for pid in pids:
        if len(done) == len(devs):
            break
        for dev, path in holdings(pid, [d for d in devs if d not in done]).items():
            result = thaw_path(path)
            if result is not None:
                done.add(dev)
            if result:
                thawed.append(f"{devs[dev]} via {path}")
    return thawed, done


def thaw_everywhere(state: StateDir, device: str | None = None) -> list[str]:
    """Thaw lab disks (or only ``device``, e.g. "/dev/loop3") through every lab node and every
    process in a lab namespace; a disk still frozen that nothing reaches (unmounted while
    frozen) is thawed through a private mount."""
    from .build import lab_pids  # build imports this module

    only = os.stat(device).st_rdev if device is not None else None
    thawed, reached = _thaw(state, NODES, lab_pids(state), only)
    for name, path in disks.lab_disks(state).items():
        try:
            dev = os.stat(path).st_rdev
        except OSError:
            continue
        if (only is None or dev == only) and dev not in reached and disks.is_busy(path) and thaw_private(path):
            thawed.append(f"{name} via a private mount")
    return thawed


def thaw_private(device_path: str, timeout: float = 30.0) -> bool:
    """Thaw a frozen superblock that no namespace mounts any more (umount of a frozen fs leaves
    it frozen, detached, the device busy): mount it in a throw-away mount namespace, which
    reuses that superblock, FITHAW, unmount. True if it was frozen. Only for lab disks."""
    with tempfile.TemporaryDirectory(prefix="nfsha-thaw-") as point:
        script = 'mount -- "$1" "$2" || exit 3; fsfreeze -u "$2"; rc=$?; umount "$2"; exit $rc'
        try:
            proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "--",
                                   "sh", "-c", script, "thaw", device_path, point],
                                  capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def node_holds(state: StateDir, member: Member, device: int) -> bool:
    """True while the node mounts ``device`` (its pinned namespace or a process's) or one of its
    processes holds a file on it."""
    pin = state.mntns_file(member.name)
    pin_inode = procs.ns_inode(pin) if mntns.is_pinned(pin) else None
    pids = node_pids(state, member)
    reader = next((p for p in pids if procs.mnt_inode(p) == pin_inode), None) if pin_inode else None
    if pin_inode is not None and reader is None:
        entries = mountinfo.node_entries(state, member.name) or []
        if any(_dev(e.majmin) == device for e in entries):
            return True
    return any(device in holdings(pid, [device]) for pid in pids)


class FreezeWatch:
    """A freeze of one node's mount that stays on that node: polls (every ``interval`` s) and,
    once the node neither mounts nor holds the disk, thaws its superblock wherever it is
    reachable (another node's mount of it, a process, or a private mount). ``stop()`` ends the
    watch; ``thawed`` says what the watch thawed."""

    def __init__(self, state: StateDir, member: Member, device_path: str, interval: float = 0.05) -> None:
        self.state = state
        self.member = member
        self.device_path = device_path
        self.device = os.stat(device_path).st_rdev
        self.interval = interval
        self.thawed: list[str] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"freeze-watch-{member.name}", daemon=True)

    def start(self) -> FreezeWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                if node_holds(self.state, self.member, self.device):
                    continue
                self.thawed = thaw_everywhere(self.state, self.device_path)
                return
        except Exception as exc:  # reported; the heal thaws anyway
            self.error = repr(exc)
