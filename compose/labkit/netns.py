"""Network namespaces, the switch bridge, veth ports, link state and blackhole routes.

Every ``ip`` call names its namespace (``ip -n NS`` or ``netns`` on ``link add``), so nothing
is ever created in the root network namespace.
"""

from __future__ import annotations

import json
import os
from typing import Any

from .runner import run
from .topology import BRIDGE, IFACE, NETNS_DIR, NS_PREFIX, SWITCH_NS, Member


def existing_lab_namespaces() -> list[str]:
    """Names of every nfsha-* namespace present now (ours or a killed run's)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(NS_PREFIX))


def add_namespace(ns: str) -> None:
    run(["ip", "netns", "add", ns])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])


def delete_namespace(ns: str) -> None:
    run(["ip", "netns", "delete", ns], check=False)


def add_bridge() -> None:
    run(["ip", "-n", SWITCH_NS, "link", "add", BRIDGE, "type", "bridge"])
    run(["ip", "-n", SWITCH_NS, "link", "set", BRIDGE, "up"])


def plug(member: Member) -> None:
    """Create the member's eth0 and its switch port as one veth pair, born in their namespaces."""
    run(["ip", "link", "add", IFACE, "netns", member.ns, "type", "veth",
         "peer", "name", member.port, "netns", SWITCH_NS])
    run(["ip", "-n", SWITCH_NS, "link", "set", member.port, "master", BRIDGE])
    run(["ip", "-n", SWITCH_NS, "link", "set", member.port, "up"])
    run(["ip", "-n", member.ns, "addr", "add", member.cidr, "dev", IFACE])
    run(["ip", "-n", member.ns, "link", "set", IFACE, "up"])


def reset_addresses(member: Member) -> None:
    """Only the member's own address on eth0, as after a reboot (VIPs it held are gone). IPv4 only:
    a rebooted machine gets its IPv6 link-local address back, and without one Ganesha 4.3 binds the
    wildcard [::]:2049 instead of its Bind_addr, so a second VFS's server on that node cannot start."""
    run(["ip", "-4", "-n", member.ns, "addr", "flush", "dev", IFACE])
    run(["ip", "-n", member.ns, "addr", "add", member.cidr, "dev", IFACE])


def set_link(ns: str, dev: str, up: bool) -> None:
    run(["ip", "-n", ns, "link", "set", dev, "up" if up else "down"])


def set_member_links(member: Member, up: bool) -> None:
    """Both ends of the member's cable: its eth0 and its switch port."""
    set_link(member.ns, IFACE, up)
    set_link(SWITCH_NS, member.port, up)


def _link(ns: str, dev: str) -> dict[str, Any] | None:
    proc = run(["ip", "-j", "-n", ns, "link", "show", "dev", dev], check=False)
    if proc.returncode != 0:
        return None
    links = json.loads(proc.stdout or "[]")
    return links[0] if links else None


def link_is_up(ns: str, dev: str) -> bool:
    """Administratively up (the UP flag), which is what kill/revive toggle."""
    link = _link(ns, dev)
    return link is not None and "UP" in link.get("flags", [])


def mac_of(ns: str, dev: str = IFACE) -> str:
    link = _link(ns, dev)
    if not link or "address" not in link:
        raise LookupError(f"no link {dev} in namespace {ns}")
    return str(link["address"]).lower()


def add_blackhole(ns: str, ip: str) -> None:
    # `replace` keeps it idempotent when a node is partitioned twice.
    run(["ip", "-n", ns, "route", "replace", "blackhole", f"{ip}/32"])


def del_blackhole(ns: str, ip: str) -> None:
    run(["ip", "-n", ns, "route", "del", "blackhole", f"{ip}/32"], check=False)


def blackholes(ns: str) -> list[str]:
    """Destinations of blackhole routes in ``ns`` (e.g. ["10.77.0.11"])."""
    proc = run(["ip", "-j", "-n", ns, "route", "show", "type", "blackhole"], check=False)
    if proc.returncode != 0:
        return []
    return sorted(str(r["dst"]).removesuffix("/32") for r in json.loads(proc.stdout or "[]"))
