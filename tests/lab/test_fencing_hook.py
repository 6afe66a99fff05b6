"""Issue 5: the fencing hook runs before a takeover from a lost node, never for a planned move,
and a failing required hook blocks the takeover with a clear status error."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.lab.conftest import Cluster, wait_for


def fence_script(tmp_path: Path, exit_code: int) -> tuple[str, Path]:
    marker = tmp_path / "fenced.txt"
    script = tmp_path / "fence-node"
    script.write_text("#!/usr/bin/env python3\nimport sys\n"
                      f"open({str(marker)!r}, 'a').write(sys.argv[1] + '\\n')\n"
                      f"print('powering off', sys.argv[1])\nsys.exit({exit_code})\n")
    script.chmod(0o755)
    return json.dumps([str(script), "{node}"]), marker


def start(cluster: Cluster, command: str, required: bool) -> None:
    cluster.start_agents(extra=("--fence-command", command, *(("--fence-required",) if required else ())))


def test_hook_fences_lost_owner_before_takeover_but_not_on_planned_moves(cluster: Cluster, tmp_path: Path) -> None:
    command, marker = fence_script(tmp_path, 0)
    start(cluster, command, required=True)
    vip = cluster.new_vip()
    cluster.put_spec("home", vip)
    cluster.wait_serving("home", "node-a")
    cluster.put_intent("home", "node-b")  # planned: no fencing
    cluster.wait_serving("home", "node-b")
    time.sleep(1)
    assert not marker.exists()
    cluster.kill_node("node-b")
    row = wait_for(lambda: (r := cluster.vfs_status("home")).get("owner") not in (None, "node-b")
                   and r.get("phase") == "serving" and r, 30, "takeover after the kill")
    assert marker.read_text().split() == ["node-b"]
    status = cluster.get_json(cluster.key("home", "status"))
    assert status["fence"]["node"] == "node-b" and status["fence"]["ok"] is True
    assert "powering off node-b" in status["fence"]["detail"]
    cluster.wait_served_by(vip, row["owner"])


def test_failing_required_hook_blocks_takeover(cluster: Cluster, tmp_path: Path) -> None:
    command, marker = fence_script(tmp_path, 1)
    start(cluster, command, required=True)
    vip = cluster.new_vip()
    cluster.put_spec("home", vip)
    cluster.wait_serving("home", "node-a")
    cluster.kill_node("node-a")
    wait_for(lambda: "fencing lost owner node-a failed, takeover blocked" in cluster.vfs_status("home")["error"],
             30, "status error naming the failed fence")
    time.sleep(3)
    assert cluster.holders(vip) == []
    assert cluster.vfs_status("home")["phase"] != "serving"
    assert set(marker.read_text().split()) == {"node-a"}  # it was tried, only ever on the lost node
    status = cluster.get_json(cluster.key("home", "status"))
    assert status.get("lost_owner") == "node-a"
