"""Persistent per-node mount namespaces, pinned by nsfs bind mounts in the state dir.

`ip netns exec` gives every call a fresh mount namespace, so mounts made by one call vanish;
a node instead keeps one mount namespace for its whole life (until kill_node or down).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .nscmd import node_enter
from .runner import run
from .topology import NETNS_DIR, NODE_RUN_DIR, Member

MOUNTINFO = "/proc/self/mountinfo"
# Mount points of mount-namespace pins left by any lab state dir (nfsha-lab*), even another one's.
_LEFTOVER_PIN = re.compile(r"/nfsha-lab[^/]*/mntns(/|$)")


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str = MOUNTINFO) -> list[Mount]:
    found = []
    for line in Path(mountinfo).read_text().splitlines():
        left, _, right = line.partition(" - ")
        found.append(Mount(_unescape(left.split()[4]), right.split()[0]))
    return found


def lab_mounts(state_root: Path) -> list[Mount]:
    """Mounts under the state dir plus leftover pins of other lab dirs, deepest first."""
    root = str(state_root)
    found = {
        m for m in mounts() if m.point == root or m.point.startswith(root + "/") or _LEFTOVER_PIN.search(m.point)
    }
    return sorted(found, key=lambda m: (m.point.count("/"), m.point), reverse=True)


def pin_inodes(pins: list[Mount]) -> list[int]:
    """Mount-namespace inodes of the nsfs pins among ``pins`` (vanished ones skipped)."""
    inodes = []
    for m in pins:
        if m.fstype == "nsfs":
            try:
                inodes.append(os.stat(m.point).st_ino)
            except OSError:
                continue
    return inodes


def is_pinned(path: Path) -> bool:
    """True when ``path`` holds an nsfs mount (a live namespace pin)."""
    return any(m.point == str(path) and m.fstype == "nsfs" for m in mounts())


def unmount(point: str) -> None:
    """Unmount, falling back to a lazy detach when something still holds it."""
    if run(["umount", point], check=False).returncode != 0:
        run(["umount", "-l", point], check=False)


def prepare_pin_dir(directory: Path) -> None:
    """Bind the pin dir onto itself, private: nsfs pins must not sit on a shared mount."""
    directory.mkdir(parents=True, exist_ok=True)
    if not any(m.point == str(directory) for m in mounts()):
        run(["mount", "--bind", str(directory), str(directory)])
    run(["mount", "--make-private", str(directory)])


def create(member: Member, pin: Path) -> None:
    """New private mount namespace for a node, pinned at ``pin`` and set up for that node."""
    pin.touch(exist_ok=True)
    run(["unshare", f"--mount={pin}", "--propagation", "private", "true"])

    def inside(*argv: str, check: bool = True) -> None:
        run(node_enter(member, str(pin), list(argv)), check=check)

    # Drop copied lab internals: /run/netns pins (so this namespace keeps no other namespace
    # alive) and the private pin dir.
    inside("umount", "-l", NETNS_DIR, check=False)
    inside("umount", "-l", str(pin.parent), check=False)
    # A sysfs mounted from inside the node's netns shows only the node's own links.
    inside("umount", "-l", "/sys", check=False)
    inside("mount", "-t", "sysfs", "sysfs", "/sys")
    os.makedirs(NODE_RUN_DIR, exist_ok=True)
    inside("mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "nfs-ha", NODE_RUN_DIR)


def drop(pin: Path) -> None:
    """Unpin a node's mount namespace; it and its mounts die once no process is inside."""
    if is_pinned(pin):
        unmount(str(pin))
