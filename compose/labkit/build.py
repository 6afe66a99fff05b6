"""Build the lab's namespaces, cabling and node mount namespaces; tear everything down."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys

from . import disks, freeze, mntns, netns, procs
from .errors import LabError
from .state import StateDir
from .topology import MEMBERS, NETNS_DIR, NODE_RUN_DIR, NODES, lab_namespaces


def build_hosts(state: StateDir) -> None:
    """Namespaces, switch bridge, one veth cable per host, a persistent mount ns per node."""
    for ns in lab_namespaces():
        netns.add_namespace(ns)
    netns.add_bridge()
    for member in MEMBERS.values():
        netns.plug(member)
    mntns.prepare_pin_dir(state.mntns_dir)
    for node, member in NODES.items():
        mntns.create(member, state.mntns_file(node))


def lab_net_inodes() -> list[int]:
    """Inodes of every nfsha-* network namespace present now."""
    inodes = (procs.ns_inode(f"{NETNS_DIR}/{ns}") for ns in netns.existing_lab_namespaces())
    return [i for i in inodes if i is not None]


def lab_pids(state: StateDir) -> list[int]:
    """Every process inside an nfsha-* netns or a pinned node mount namespace."""
    return procs.pids_in_namespaces(lab_net_inodes(), mntns.pin_inodes(mntns.lab_mounts(state.root)))


def teardown(state: StateDir, leftovers: bool = False) -> list[int]:
    """Kill lab processes by PID, unmount pins, delete namespaces, detach the lab's loop
    devices (with ``leftovers`` those of any /run/nfsha-lab* dir too), remove the state dir.

    Works from the system's view (namespace names, /proc, mountinfo, the loop table), not from
    records, so it also clears what a killed run left. Returns the killed pids.
    """
    # SIGKILL, thaw, then wait: a process blocked on a frozen lab disk dies only once thawed,
    # and a frozen superblock must be thawed while a namespace still reaches it.
    killed = [pid for pid in lab_pids(state) if procs.signal_pid(pid, signal.SIGKILL)]
    try:
        freeze.thaw(state, [n for n in NODES if mntns.is_pinned(state.mntns_file(n))], killed)
    except LabError as exc:  # keep tearing down; a disk left frozen shows up below
        print(f"lab teardown: thawing failed: {exc}", file=sys.stderr)
    killed += [pid for pid in procs.kill_until_none_left(lambda: lab_pids(state), 5.0) if pid not in killed]
    procs.wait_gone(killed, 5.0)
    for mount in mntns.lab_mounts(state.root):
        mntns.unmount(mount.point)
    for ns in netns.existing_lab_namespaces():
        netns.delete_namespace(ns)
    _drop_empty_netns_dir()
    _remove_empty_dir(NODE_RUN_DIR)
    # Loops last: a disk mounted in a node's mount namespace keeps the device busy until that
    # namespace is gone (no process left, pin unmounted).
    stuck = disks.release_all(state, leftovers)
    if stuck and any(freeze.thaw_private(lp.device) for lp in stuck):
        # Unmounted while frozen: the superblock stayed, frozen, and kept the device busy.
        stuck = disks.wait_released(stuck, disks.RELEASE_TIMEOUT)
    held = [f"{lp.device} ({lp.backing}): {disks.describe_holders(lp.device, None)}" for lp in stuck]
    left = mntns.lab_mounts(state.root)
    if left:
        raise LabError(f"could not unmount {[m.point for m in left]}; state dir {state.root} kept")
    shutil.rmtree(state.root, ignore_errors=True)
    if held:
        raise LabError("loop devices still mounted outside the lab (they detach at the last unmount): "
                       + "; ".join(held))
    return killed


def _drop_empty_netns_dir() -> None:
    """Undo iproute2's /run/netns bind mount once no namespace is left in it."""
    try:
        if os.listdir(NETNS_DIR):
            return
    except FileNotFoundError:
        return
    if any(m.point == NETNS_DIR for m in mntns.mounts()):
        mntns.unmount(NETNS_DIR)
    _remove_empty_dir(NETNS_DIR)


def _remove_empty_dir(path: str) -> None:
    # The nodes' tmpfs mount point; only ever removed when empty (i.e. nobody uses it).
    with contextlib.suppress(OSError):
        os.rmdir(path)
