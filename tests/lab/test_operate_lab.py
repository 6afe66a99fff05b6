"""The operator's commands driven through the CLI in the lab (controller/operate.py): apply a file,
pause a VFS, drain a node (what is paused stays, the rest moves, drain names what it waits for),
resume, undrain, move --wait, delete. Each step is checked where clients see it: who answers the VIP."""

from __future__ import annotations

from pathlib import Path

from tests.lab.conftest import Cluster


def test_apply_pause_drain_resume_move_and_delete_through_the_cli(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_agents()
    home, work = cluster.new_vip(), cluster.new_vip()
    specs = tmp_path / "specs.yaml"
    specs.write_text(f"home:\n  vip: {home}/24\n  candidates: [node-a, node-b, node-c]\n"
                     f"work:\n  vip: {work}/24\n  candidates: [node-a, node-b, node-c]\n")
    dry = cluster.cli("apply", "-f", str(specs), "--dry-run")
    assert dry.returncode == 0 and "2 VFS would change (dry run)" in dry.stdout, dry.stderr
    assert cluster.get_json(cluster.key("home", "spec")) is None
    done = cluster.cli("apply", "-f", str(specs))
    assert done.returncode == 0 and "home: created" in done.stdout and "work: created" in done.stdout
    cluster.wait_serving("home", "node-a")
    cluster.wait_serving("work", "node-a")

    assert cluster.cli("pause", "home").returncode == 0
    drain = cluster.cli("drain", "node-a", "--timeout", "6")
    assert drain.returncode == 1 and "home: paused" in drain.stderr, drain.stdout + drain.stderr
    cluster.wait_served_by(work, "node-b")  # not paused: moved off the drained node
    cluster.wait_served_by(home, "node-a")  # paused: stays
    status = cluster.cli("status")
    assert status.returncode == 1 and "home is paused" in status.stdout and "node node-a is drained" in status.stdout

    assert cluster.cli("resume", "home").returncode == 0
    drain = cluster.cli("drain", "node-a", "--timeout", "20")
    assert drain.returncode == 0 and "node-a holds nothing" in drain.stdout, drain.stderr
    cluster.wait_served_by(home, "node-b")

    assert cluster.cli("undrain", "node-a").returncode == 0
    move = cluster.cli("move", "home", "node-a", "--wait", "--timeout", "20")
    assert move.returncode == 0 and "home serving on node-a" in move.stdout, move.stderr
    cluster.wait_served_by(home, "node-a")

    delete = cluster.cli("delete", "work", "--timeout", "20")
    assert delete.returncode == 0 and "work released" in delete.stdout, delete.stderr
    assert cluster.answering_macs(work) == []
