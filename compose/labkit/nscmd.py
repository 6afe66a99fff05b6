"""Build argv prefixes that run a command inside a lab host's namespaces."""

from __future__ import annotations

from .topology import Member


def netns_exec(member: Member, argv: list[str]) -> list[str]:
    """Plain network namespace (etcd members, client, switch).

    ``ip netns exec`` execs the command itself, so the pid we get is the command's pid.
    """
    return ["ip", "netns", "exec", member.ns, *argv]


def node_enter(member: Member, mntns_file: str, argv: list[str]) -> list[str]:
    """Node: its network namespace plus its persistent mount namespace.

    nsenter execs without forking (no --pid), so the pid is the command's pid.
    The command starts in "/" of the node's mount namespace.
    """
    return ["nsenter", f"--net={member.netns_path}", f"--mount={mntns_file}", "--", *argv]
