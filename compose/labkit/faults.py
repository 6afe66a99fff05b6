"""Node-level fault injection: crash, revive, partition from etcd, heal."""

from __future__ import annotations

from . import mntns, netns, procs
from .state import StateDir
from .topology import ETCD_MEMBERS, Member


def crash(member: Member, state: StateDir) -> list[int]:
    """Unplug both cable ends, SIGKILL everything in the node, give it a fresh mount ns
    and only its own address (revive_node then plugs in a freshly rebooted machine).

    A crashed machine loses its mounts, so the old mount namespace is unpinned (it dies with
    its last process) and a clean one takes its place; node commands keep working meanwhile.
    """
    netns.set_member_links(member, up=False)
    pin = state.mntns_file(member.name)
    net = procs.ns_inode(member.netns_path)
    mnt = procs.ns_inode(pin) if mntns.is_pinned(pin) else None
    killed = procs.kill_all(
        procs.pids_in_namespaces([net] if net is not None else [], [mnt] if mnt is not None else [])
    )
    mntns.drop(pin)
    mntns.create(member, pin)
    # A crashed machine comes back without the VIPs it held.
    netns.reset_addresses(member)
    return killed


def revive(member: Member) -> None:
    netns.set_member_links(member, up=True)


def partition(member: Member) -> None:
    """Blackhole routes to every etcd member: etcd is cut off, everyone else still reaches it."""
    for etcd_member in ETCD_MEMBERS.values():
        netns.add_blackhole(member.ns, etcd_member.ip)


def heal(member: Member) -> None:
    """Drop the etcd blackhole routes and plug both cable ends back in."""
    for etcd_member in ETCD_MEMBERS.values():
        netns.del_blackhole(member.ns, etcd_member.ip)
    netns.set_member_links(member, up=True)
