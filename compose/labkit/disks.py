"""Shared disks: sparse image files under STATE/disks/, attached as loop devices.

Loop devices are global (not namespaced), so every node sees /dev/loopN, as every node of a
real cluster sees a SAN LUN. The system's loop table (``losetup --json --list``) is the only
record: a disk is "ours" when its backing file lies under our state dir, which also finds what
a killed run left behind (the backing file then shows as "PATH (deleted)").
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError
from .mountinfo import holders, majmin, node_entries
from .nscmd import node_enter
from .runner import run
from .state import StateDir
from .topology import DEFAULT_STATE_DIR, NODES

MKFS: dict[str, list[str]] = {
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
MIN_XFS_MB = 300  # mkfs.xfs refuses smaller filesystems
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DELETED = " (deleted)"
# Backing files of any lab state dir (/run/nfsha-lab, /run/nfsha-lab-test, ...): up() clears them.
LEFTOVER_BACKING = re.compile("^" + re.escape(DEFAULT_STATE_DIR) + r"[^/]*/")
RELEASE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Loop:
    device: str
    backing: str  # absolute path, " (deleted)" stripped
    deleted: bool


def loops() -> list[Loop]:
    """Every attached loop device on the machine."""
    proc = run(["losetup", "--json", "--list"], check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    found = []
    for dev in json.loads(proc.stdout).get("loopdevices", []):
        back = str(dev.get("back-file") or "")
        deleted = back.endswith(_DELETED)
        found.append(Loop(str(dev["name"]), back.removesuffix(_DELETED), deleted))
    return found


def disks_dir(state: StateDir) -> Path:
    return state.root / "disks"


def image_path(state: StateDir, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise LabError(f"bad disk name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
    return disks_dir(state) / f"{name}.img"


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _real_root(state: StateDir) -> str:
    # The kernel reports the resolved path of the backing file.
    return os.path.realpath(state.root)


def lab_loops(state: StateDir, leftovers: bool = False) -> list[Loop]:
    """Loops backed by a file under our state dir (and, with ``leftovers``, under any lab dir)."""
    root = _real_root(state)
    return [lp for lp in loops() if _under(lp.backing, root) or (leftovers and LEFTOVER_BACKING.match(lp.backing))]


def _disk_loops(state: StateDir) -> dict[str, Loop]:
    directory = os.path.join(_real_root(state), "disks")
    found: dict[str, Loop] = {}
    for lp in loops():
        parent, base = os.path.split(lp.backing)
        if parent == directory and base.endswith(".img") and not lp.deleted:
            found.setdefault(base.removesuffix(".img"), lp)
    return found


def lab_disk_devs(state: StateDir, sys_block: str = "/sys/block") -> dict[int, str]:
    """{device number (st_rdev): disk name} of the attached lab disks, read from sysfs (no
    process started: cheap enough for the dual-mount sampler's every sample)."""
    directory = os.path.join(_real_root(state), "disks")
    found: dict[int, str] = {}
    try:
        names = os.listdir(sys_block)
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        try:
            with open(f"{sys_block}/{name}/loop/backing_file") as fh:
                backing = fh.read().strip()
            with open(f"{sys_block}/{name}/dev") as fh:
                major, minor = fh.read().strip().split(":")
        except (OSError, ValueError):
            continue  # not attached (no loop/ dir), or detached meanwhile
        parent, base = os.path.split(backing)
        if parent == directory and base.endswith(".img"):
            found[os.makedev(int(major), int(minor))] = base.removesuffix(".img")
    return found


def lab_disks(state: StateDir) -> dict[str, str]:
    """{name: /dev/loopN} of the attached disks whose image is STATE/disks/<name>.img."""
    return {name: lp.device for name, lp in _disk_loops(state).items()}


def create(state: StateDir, name: str, size_mb: int, fstype: str | None) -> str:
    """Sparse image, mkfs (unless fstype is None), loop device attached; returns /dev/loopN."""
    image = image_path(state, name)
    if fstype is not None and fstype not in MKFS:
        raise LabError(f"fstype must be one of {sorted(MKFS)} or None, not {fstype!r}")
    if fstype == "xfs" and size_mb < MIN_XFS_MB:
        raise LabError(f"an xfs disk needs at least {MIN_XFS_MB} MB, not {size_mb}")
    if image.exists() or name in lab_disks(state):
        raise LabError(f"disk {name!r} already exists ({image})")
    image.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(image, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)  # sparse: only written blocks use space
        if fstype is not None:
            run([*MKFS[fstype], str(image)], timeout=120)
        # Formatting the file before attaching means a failed mkfs leaves no loop device.
        return run(["losetup", "--find", "--show", str(image)]).stdout.strip()
    except BaseException:
        image.unlink(missing_ok=True)
        raise


def is_busy(device: str) -> bool:
    """True while the device is mounted (or otherwise claimed) anywhere, in any namespace:
    an exclusive open of a block device fails with EBUSY then."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        raise
    os.close(fd)
    return False


def describe_holders(device: str, state: StateDir | None) -> str:
    try:
        found = holders(majmin(device), state)
    except OSError:
        return "device node gone"
    if not found:
        return "busy, but no mount of it found (held by an open file or a namespace with no process)"
    return "; ".join(h.describe() for h in found)


def destroy(state: StateDir, name: str, force: bool = False) -> str | None:
    """Detach and delete a disk. If it is still mounted: LabError naming the holders, or with
    ``force`` lazily unmount it in every lab node, detach anyway (the kernel frees it at the
    last close) and return what still held it. None means cleanly gone."""
    image = image_path(state, name)
    loop = _disk_loops(state).get(name)
    if loop is None and not image.exists():
        raise LabError(f"no disk named {name!r}")
    note = None
    if loop is not None:
        device = loop.device
        if force and is_busy(device):
            unmount_in_nodes(state, device)
        if is_busy(device):
            note = f"disk {name!r} ({device}) is still in use: {describe_holders(device, state)}"
            if not force:
                raise LabError(note)
        detach([device])
        if wait_released([loop], 0.0 if note else RELEASE_TIMEOUT) and not note:
            note = f"disk {name!r} ({device}) did not detach: {describe_holders(device, state)}"
            if not force:
                raise LabError(note)
    image.unlink(missing_ok=True)
    return note


def unmount_in_nodes(state: StateDir, device: str) -> None:
    """Lazily unmount ``device`` wherever a lab node has it mounted (best effort)."""
    wanted = majmin(device)
    for node, member in NODES.items():
        for entry in reversed(node_entries(state, node) or []):
            if entry.majmin == wanted:
                run(node_enter(member, str(state.mntns_file(node)), ["umount", "-l", entry.point]), check=False)


def detach(devices: list[str]) -> None:
    # On a device still open, `losetup -d` only sets autoclear: the kernel detaches it at the
    # last close (e.g. when a dying mount namespace finally unmounts it).
    for device in devices:
        run(["losetup", "-d", device], check=False)


def wait_released(mine: list[Loop], timeout: float) -> list[Loop]:
    """Wait until none of ``mine`` is attached; return the ones still attached. Compared by
    device *and* backing file: a freed /dev/loopN may at once be reused for another file."""
    deadline = time.monotonic() + timeout
    while True:
        attached = {(lp.device, lp.backing) for lp in loops()}
        left = [lp for lp in mine if (lp.device, lp.backing) in attached]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def release_all(state: StateDir, leftovers: bool) -> list[Loop]:
    """Detach every lab loop (ours; with ``leftovers`` any lab dir's) and wait for the kernel
    to let go. Call after the node mount namespaces are gone, or mounts keep them busy.
    Returns the loops still attached (mounted somewhere outside the lab)."""
    mine = lab_loops(state, leftovers)
    if not mine:
        return []
    detach([lp.device for lp in mine])
    return wait_released(mine, RELEASE_TIMEOUT)
