"""Fault injection: node crash/revive, partitions (from etcd, from the client, an isolated
etcd member), heal, Ganesha processes of a node."""

from __future__ import annotations

from . import mntns, netns, procs
from .state import StateDir
from .topology import CLIENT, ETCD_MEMBERS, MEMBERS, Member


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
    """Drop the etcd and client blackhole routes and plug both cable ends back in."""
    for etcd_member in ETCD_MEMBERS.values():
        netns.del_blackhole(member.ns, etcd_member.ip)
    heal_client(member)
    netns.set_member_links(member, up=True)


def cut_from_client(member: Member) -> None:
    """Blackhole routes between the node and the client namespace, both ways (etcd and the
    other nodes still reach it)."""
    netns.add_blackhole(member.ns, CLIENT.ip)
    netns.add_blackhole(CLIENT.ns, member.ip)


def heal_client(member: Member) -> None:
    netns.del_blackhole(member.ns, CLIENT.ip)
    netns.del_blackhole(CLIENT.ns, member.ip)


def isolate_etcd(etcd: Member) -> None:
    """etcd member cut from every other lab host (the two other members, the nodes, the
    client): blackholes in its namespace to them, and in theirs to it."""
    for other in MEMBERS.values():
        if other.name == etcd.name:
            continue
        netns.add_blackhole(etcd.ns, other.ip)
        netns.add_blackhole(other.ns, etcd.ip)


def heal_etcd(etcd: Member) -> None:
    for other in MEMBERS.values():
        if other.name == etcd.name:
            continue
        netns.del_blackhole(etcd.ns, other.ip)
        netns.del_blackhole(other.ns, etcd.ip)


def ganesha_pids(member: Member) -> list[int]:
    """ganesha.nfsd processes in the member's network namespace (by namespace inode and
    /proc/PID/comm, never by a name search across the machine)."""
    inode = procs.ns_inode(member.netns_path)
    found = []
    for pid in procs.pids_in_namespaces([inode] if inode is not None else []):
        try:
            comm = (procs.PROC / str(pid) / "comm").read_text().strip()
        except OSError:
            continue
        if comm == "ganesha.nfsd":
            found.append(pid)
    return found
