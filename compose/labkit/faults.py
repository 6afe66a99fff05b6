"""Fault injection: node crash/revive and reset (power cycle), partitions (from etcd, from the
client, an isolated etcd member), heal, Ganesha processes of a node.

A crash and a reset replace the node's mount namespace under the node's exclusive lock
(labkit.nodelock), and thaw any frozen lab disk of the node before the old namespace is
dropped (labkit.freeze: the superblock is shared by every node of the lab).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from . import freeze, mntns, netns, nodelock, procs
from .jsonl import read_json_lines
from .state import StateDir
from .topology import CLIENT, ETCD_MEMBERS, MEMBERS, Member

KILL_WAIT = 5.0


def crash(member: Member, state: StateDir) -> list[int]:
    """Unplug both cable ends, SIGKILL everything in the node, give it a fresh mount ns
    and only its own address (revive_node then plugs in a freshly rebooted machine).

    A crashed machine loses its mounts, so the old mount namespace is unpinned (it dies with
    its last process) and a clean one takes its place; node commands keep working meanwhile.
    """
    netns.set_member_links(member, up=False)
    with nodelock.exclusive(state, member.name):
        killed, _ = _power_cycle(member, state)
    return killed


def reset(member: Member, state: StateDir) -> dict[str, Any]:
    """What a power cycle does to a node, links left up (the machine reboots): every process
    of the node SIGKILLed (found by its namespaces), frozen lab disks it mounts or holds thawed,
    a fresh mount namespace (its mounts are gone), only its own address (its VIPs are gone).
    Appends a record to STATE/resets.jsonl and returns it."""
    started = time.monotonic()
    with nodelock.exclusive(state, member.name):
        killed, thawed = _power_cycle(member, state)
    record = {"node": member.name, "t": round(started, 3), "took_s": round(time.monotonic() - started, 3),
              "killed": killed, "thawed": thawed, "caller": os.getppid()}
    path = resets_file(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")
    return record


def resets_file(state: StateDir) -> Path:
    return state.root / "resets.jsonl"


def read_resets(state: StateDir) -> list[dict[str, Any]]:
    """Every reset recorded so far, oldest first ("t" is CLOCK_MONOTONIC)."""
    return read_json_lines(resets_file(state))


def _power_cycle(member: Member, state: StateDir) -> tuple[list[int], list[str]]:
    pin = state.mntns_file(member.name)
    pids = freeze.node_pids(state, member)
    # SIGKILL first: nothing of the node runs user code again. A process blocked on a frozen
    # filesystem only dies once it is thawed, and the thaw must come before the namespace goes
    # (afterwards nothing may reach that superblock any more).
    hit = [pid for pid in pids if procs.signal_pid(pid, signal.SIGKILL)]
    thawed = freeze.thaw(state, [member.name], hit)
    hit += [pid for pid in procs.kill_until_none_left(lambda: freeze.node_pids(state, member), KILL_WAIT)
            if pid not in hit]  # forked meanwhile
    procs.wait_gone(hit, KILL_WAIT)
    mntns.drop(pin)
    mntns.create(member, pin)
    # A crashed or reset machine comes back without the VIPs it held.
    netns.reset_addresses(member)
    return hit, thawed


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
