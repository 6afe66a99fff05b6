"""Fixed shape of the lab: namespaces, addresses, interface names, ports.

Everything lives in 10.77.0.0/24 inside namespaces whose names start with ``nfsha-``;
nothing is ever created in the root network namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

NS_PREFIX = "nfsha-"
NETNS_DIR = "/run/netns"
SWITCH_NS = "nfsha-sw"
BRIDGE = "br0"
IFACE = "eth0"
PREFIX_LEN = 24

ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_CLUSTER_TOKEN = "nfsha-lab"

# Agent-local state directory; every node gets its own private tmpfs there.
NODE_RUN_DIR = "/run/nfs-ha"

STATE_ENV = "NFSHA_LAB_DIR"
DEFAULT_STATE_DIR = "/run/nfsha-lab"


@dataclass(frozen=True)
class Member:
    """One lab host: its namespace, its address on eth0 and its port on the switch."""

    name: str
    ip: str

    @property
    def ns(self) -> str:
        return NS_PREFIX + self.name

    @property
    def port(self) -> str:
        # Switch-side veth name; "p-node-a" fits IFNAMSIZ (15 chars).
        return "p-" + self.name

    @property
    def netns_path(self) -> str:
        return f"{NETNS_DIR}/{self.ns}"

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{PREFIX_LEN}"


ETCD_MEMBERS: dict[str, Member] = {
    f"etcd{i}": Member(f"etcd{i}", f"10.77.0.1{i}") for i in (1, 2, 3)
}
NODES: dict[str, Member] = {
    name: Member(name, ip)
    for name, ip in (("node-a", "10.77.0.21"), ("node-b", "10.77.0.22"), ("node-c", "10.77.0.23"))
}
CLIENT = Member("client", "10.77.0.50")

# Every host plugged into the switch, in creation order.
MEMBERS: dict[str, Member] = {**ETCD_MEMBERS, **NODES, CLIENT.name: CLIENT}


def etcd_member(index: int) -> Member:
    """Member for etcd index 1..3."""
    try:
        return ETCD_MEMBERS[f"etcd{index}"]
    except KeyError:
        raise ValueError(f"etcd member index must be 1, 2 or 3, not {index!r}") from None


def client_url(member: Member) -> str:
    return f"http://{member.ip}:{ETCD_CLIENT_PORT}"


def peer_url(member: Member) -> str:
    return f"http://{member.ip}:{ETCD_PEER_PORT}"


def lab_namespaces() -> list[str]:
    """Every namespace a complete lab has, switch first."""
    return [SWITCH_NS, *(m.ns for m in MEMBERS.values())]
