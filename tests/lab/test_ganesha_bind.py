"""Ganesha 4.3 binds the wildcard [::]:2049 instead of its Bind_addr when the node's network
namespace has no IPv6 address outside lo. Such a server would answer on every VIP of the node and
keep the next VFS's server from binding: the agent stops it, says why, and the VFS moves on."""

from __future__ import annotations

from tests.lab.conftest import Cluster, wait_for
from tests.lab.test_fileserver import fileserver

DISABLE_V6 = "net.ipv6.conf.eth0.disable_ipv6"


def nfs_listeners(cluster: Cluster, node: str) -> list[str]:
    """Local addresses (as /proc/net writes them) of TCP listeners on port 2049 in the node."""
    out = cluster.lab.run(node, ["cat", "/proc/net/tcp", "/proc/net/tcp6"]).stdout.splitlines()
    return [f[1] for f in (line.split() for line in out) if len(f) > 3 and f[3] == "0A" and f[1].endswith(":0801")]


def test_a_wildcard_bound_ganesha_is_stopped_and_the_vfs_moves(cluster: Cluster) -> None:
    cluster.lab.run("node-a", ["sysctl", "-q", "-w", f"{DISABLE_V6}=1"])  # eth0 loses its link-local address
    try:
        cluster.start_agents()
        vip, _device = fileserver(cluster, "home", candidates=("node-a", "node-b"))
        row = cluster.wait_serving("home", "node-b", timeout=60)
        assert row["owner"] == "node-b"
        log = cluster.agent_log("node-a")
        wait_for(lambda: "binds the wildcard [::] instead of its Bind_addr" in log.read_text(), 10,
                 "the agent on node-a saying why its server was stopped")
        assert nfs_listeners(cluster, "node-a") == []  # the wildcard server was stopped
        data = b"served by node-b\n"
        assert cluster.nfs_write(vip, "/home", "x.txt", data).returncode == 0
        assert cluster.nfs_read(vip, "/home", "x.txt").data == data
    finally:
        cluster.lab.run("node-a", ["sysctl", "-q", "-w", f"{DISABLE_V6}=0"], check=False)
        # The next test's servers on node-a need the link-local address back (past its DAD).
        wait_for(lambda: link_local_ready(cluster, "node-a"), 10, "node-a's IPv6 link-local address back")


def link_local_ready(cluster: Cluster, node: str) -> bool:
    out = cluster.lab.run(node, ["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"]).stdout
    return "fe80::" in out and "tentative" not in out
