"""Node policy in the lab (controller/policy.py): a node whose allowed_devices exclude a VFS's disk never
mounts it, even as its first candidate; the next candidate serves it at once, over NFS, and `nfs-ha status`
says which node refuses and why. An intent naming the refusing node moves nothing."""

from __future__ import annotations

import json
import time

from tests.lab.conftest import Cluster
from tests.lab.test_fileserver import GRACE, fileserver, mounted_on


def test_a_node_whose_policy_refuses_the_disk_leaves_the_vfs_to_the_next_candidate(cluster: Cluster) -> None:
    strict = json.dumps(["/dev/disk/by-id/*"])  # the lab's disks are /dev/loopN
    cluster.agent_args = lambda node: ["--allowed-devices", strict] if node == "node-a" else []
    cluster.start_agents(nodes=("node-a", "node-b"))
    vip, device = fileserver(cluster, "home", candidates=("node-a", "node-b"))
    row = cluster.wait_serving("home", "node-b", timeout=30)
    assert mounted_on(cluster, device) == ["node-b"]
    assert row["error"] == f"node-a refuses: storage.device {device} is not in this node's allowed_devices"
    status = cluster.cli("status")  # served, but degraded: a monitoring check sees exit code 1
    assert status.returncode == 1 and "DEGRADED: home: node-a refuses" in status.stdout, status.stdout
    data = b"served by the node whose policy allows this disk\n"
    assert cluster.nfs_write(vip, "/home", "policy.txt", data).returncode == 0
    cluster.wait_nfs_read(vip, "/home", "policy.txt", data, timeout=GRACE * 4 + 20)

    cluster.put_intent("home", "node-a")  # the operator asks for the refusing node: nothing moves
    time.sleep(3.0)
    row = cluster.vfs_status("home")
    assert row["owner"] == "node-b" and row["phase"] == "serving"
    assert mounted_on(cluster, device) == ["node-b"]
    assert "refused by this node's policy" in cluster.agent_log("node-a").read_text()
