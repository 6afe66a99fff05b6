"""Issue 5: a node configured with a hardware watchdog serves nothing the watchdog does not
cover. The lab has no watchdog (and arming a real one could reset the machine), so node-a gets
/dev/null: a character device that passes the start-up check but refuses the watchdog ioctls.
The arming rule itself is unit-tested in tests/unit/test_watchdog.py."""

from __future__ import annotations

import json

from tests.lab.conftest import Cluster, wait_for


def test_node_whose_watchdog_cannot_be_armed_hands_the_vfs_on(cluster: Cluster) -> None:
    cluster.start_agent("node-a", extra=("--watchdog", "/dev/null"))
    wait_for(lambda: cluster.node_alive("node-a"), 20, "node-a registered")
    cluster.start_agents(nodes=("node-b", "node-c"))
    vip = cluster.new_vip()
    cluster.put_spec("home", vip)  # node-a is the first candidate
    row = cluster.wait_serving("home", "node-b", timeout=30)
    assert row["owner"] == "node-b"
    cluster.wait_served_by(vip, "node-b")
    assert not cluster.vip_on("node-a", vip)
    registration = json.loads(cluster.lab.etcdctl("get", f"{cluster.prefix}/nodes/node-a",
                                                  "--print-value-only").stdout)
    assert registration["watchdog"] == "/dev/null"
    reason = registration["backoff"]["home"]
    assert "cannot arm the hardware watchdog" in reason and "/dev/null" in reason, reason
    log = cluster.agent_log("node-a").read_text()
    assert "takeover failed: cannot arm the hardware watchdog" in log
