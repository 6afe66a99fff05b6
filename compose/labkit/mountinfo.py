"""Read mount tables of any mount namespace: a node's (via nsenter) or every process's (/proc).

Used to answer "where is this block device mounted?" across namespaces: the kernel lets
several namespaces mount one loop device at once, so no single table tells the whole story.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .nscmd import node_enter
from .runner import run
from .state import StateDir
from .topology import NODES

PROC = Path("/proc")


@dataclass(frozen=True)
class MountEntry:
    majmin: str  # "7:0": the device, whatever name it was mounted by
    root: str  # path inside the source fs ("/null" for a bind of /dev/null)
    point: str
    fstype: str
    source: str


@dataclass
class Holder:
    """One mount namespace in which a device is mounted."""

    mnt_inode: int | None
    points: list[str]
    pids: list[int]
    node: str | None = None  # set when it is a lab node's pinned namespace

    def describe(self) -> str:
        where = self.node or ("this process's namespace" if self.mnt_inode == own_mnt_inode() else "mount ns")
        pids = f", pids {self.pids[:8]}{'...' if len(self.pids) > 8 else ''}" if self.pids else ", no process"
        return f"{where} [{self.mnt_inode}] at {', '.join(self.points)}{pids}"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[MountEntry]:
    """Entries of a /proc/PID/mountinfo text, in mount order (later ones are on top)."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        found.append(MountEntry(fields[2], _unescape(fields[3]), _unescape(fields[4]), tail[0], _unescape(tail[1])))
    return found


def majmin(device: str) -> str:
    """"MAJOR:MINOR" of a block device node, as mountinfo shows it."""
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def node_entries(state: StateDir, node: str) -> list[MountEntry] | None:
    """Mount table of a node's persistent mount namespace; None when it is not pinned."""
    pin = state.mntns_file(node)
    if not pin.exists():
        return None
    proc = run(node_enter(NODES[node], str(pin), ["cat", "/proc/self/mountinfo"]), check=False)
    return parse(proc.stdout) if proc.returncode == 0 else None


def own_mnt_inode() -> int | None:
    return _mnt_inode("self")


def _mnt_inode(pid: str) -> int | None:
    try:
        return os.stat(PROC / pid / "ns" / "mnt").st_ino
    except OSError:
        return None


def holders(device_majmin: str, state: StateDir | None = None) -> list[Holder]:
    """Every mount namespace with ``device_majmin`` mounted: lab nodes' pinned namespaces
    (which may hold it with no process inside) plus any namespace a live process is in."""
    by_ns: dict[int | None, list[int]] = defaultdict(list)
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            by_ns[_mnt_inode(entry.name)].append(int(entry.name))
    by_ns.pop(None, None)
    found: dict[int | None, Holder] = {}
    if state is not None:
        for node in NODES:
            entries = node_entries(state, node)
            points = [e.point for e in entries or [] if e.majmin == device_majmin]
            if points:
                inode = _pin_inode(state, node)
                found[inode] = Holder(inode, points, sorted(by_ns.get(inode, [])), node)
    for inode, pids in by_ns.items():
        if inode in found:
            continue
        points = _points_in(pids, device_majmin)
        if points:
            found[inode] = Holder(inode, points, sorted(pids))
    return list(found.values())


def _pin_inode(state: StateDir, node: str) -> int | None:
    try:
        return os.stat(state.mntns_file(node)).st_ino
    except OSError:
        return None


def _points_in(pids: list[int], device_majmin: str) -> list[str]:
    # Every process of a namespace shows the same table; read the first one still alive.
    for pid in pids:
        try:
            text = (PROC / str(pid) / "mountinfo").read_text()
        except OSError:
            continue
        return [e.point for e in parse(text) if e.majmin == device_majmin]
    return []
