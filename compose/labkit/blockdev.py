"""Make a block device unreachable from one node: /dev/null bind-mounted over its device node
inside that node's mount namespace, so `mount /dev/loopN ...` there fails ("not a block
device") while the other nodes still mount it. Existing mounts are not affected.

Blocks are recorded under STATE/blocked/<node> so they survive kill_node (a rebooted machine
still cannot reach that disk); heal() removes them.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import LabError
from .mountinfo import MountEntry, node_entries
from .nscmd import node_enter
from .runner import run
from .state import StateDir
from .topology import NODES


def _record_file(state: StateDir, node: str) -> Path:
    return state.root / "blocked" / node


def recorded(state: StateDir, node: str) -> list[str]:
    """Devices blocked on ``node`` (as recorded by block)."""
    try:
        return sorted(json.loads(_record_file(state, node).read_text()))
    except (OSError, ValueError):
        return []


def _save(state: StateDir, node: str, devices: list[str]) -> None:
    path = _record_file(state, node)
    if not devices:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sorted(set(devices))) + "\n")


def _is_block_mount(entry: MountEntry) -> bool:
    # Our bind of /dev/null: a devtmpfs file "/null" mounted on a /dev/ node.
    return entry.root == "/null" and entry.point.startswith("/dev/")


def _in_node(state: StateDir, node: str, argv: list[str]) -> None:
    run(node_enter(NODES[node], str(state.mntns_file(node)), argv))


def _check_device(device: str) -> None:
    try:
        mode = os.stat(device).st_mode
    except OSError as exc:
        raise LabError(f"{device}: {exc.strerror}") from None
    if not device.startswith("/dev/") or not stat.S_ISBLK(mode):
        raise LabError(f"{device} is not a block device under /dev/")


def _apply(state: StateDir, node: str, device: str) -> None:
    entries = node_entries(state, node)
    if entries is None:
        raise LabError(f"{node} has no mount namespace (is the lab up?)")
    if not any(_is_block_mount(e) and e.point == device for e in entries):
        _in_node(state, node, ["mount", "--bind", "/dev/null", device])


def block(state: StateDir, node: str, device: str) -> None:
    _check_device(device)
    _apply(state, node, device)
    _save(state, node, [*recorded(state, node), device])


def unblock(state: StateDir, node: str, device: str | None = None) -> None:
    """Remove the block of ``device`` on ``node`` (None: every block on that node)."""
    for entry in reversed(node_entries(state, node) or []):
        if _is_block_mount(entry) and device in (None, entry.point):
            # The target exists as a mount point, so umount takes it as the target, never as
            # "wherever this device is mounted".
            _in_node(state, node, ["umount", entry.point])
    _save(state, node, [d for d in recorded(state, node) if device not in (None, d)])


def reapply(state: StateDir, node: str) -> None:
    """Block again what was blocked, in a node's fresh mount namespace (after kill_node)."""
    for device in recorded(state, node):
        if os.path.exists(device):
            _apply(state, node, device)
