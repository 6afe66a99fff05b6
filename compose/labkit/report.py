"""Per-node part of Lab.status(): link state, partitions, mount namespace, processes."""

from __future__ import annotations

from typing import Any

from . import mntns, netns, procs
from .state import StateDir, recorded_procs
from .topology import IFACE, SWITCH_NS, Member


def node_report(member: Member, state: StateDir, present: set[str]) -> dict[str, Any]:
    exists = member.ns in present
    inode = procs.ns_inode(member.netns_path) if exists else None
    return {
        "ip": member.ip,
        "mac": netns.mac_of(member.ns) if exists else None,
        "link_up": exists and netns.link_is_up(member.ns, IFACE),
        "switch_port_up": SWITCH_NS in present and netns.link_is_up(SWITCH_NS, member.port),
        "partitioned_from": netns.blackholes(member.ns) if exists else [],
        "mntns": mntns.is_pinned(state.mntns_file(member.name)),
        "pids": procs.pids_in_namespaces([inode]) if inode is not None else [],
        "spawned": recorded_procs(state.procs_dir(member.name)),
    }
