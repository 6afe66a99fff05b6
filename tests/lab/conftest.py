"""Fixtures for tests against the namespace lab: real etcd (3 members), real namespaces.

The lab is built once per session; each test gets its own LabCluster (key prefix, VIPs),
and everything it started is stopped (by PID) and every fault healed, even on failure.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "compose"))

from labkit import Lab  # noqa: E402
from labkit.cluster import NODE_NAMES, LabCluster, wait_for  # noqa: E402

NODES = NODE_NAMES
Cluster = LabCluster
__all__ = ["NODES", "Cluster", "guard_pid", "guard_records", "wait_for"]


def guard_pid(cluster: LabCluster, node: str) -> int:
    """The pid of the fence guard the agent on `node` started."""
    for pid in cluster.lab.pids(node):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"node.guard" in cmdline:
            return pid
    raise AssertionError(f"no fence guard running on {node}")


def guard_records(cluster: LabCluster, node: str) -> list[dict]:
    """What the guard on `node` recorded (its file lives in the node's private /run/nfs-ha)."""
    out = cluster.lab.run(node, ["cat", f"/run/nfs-ha/{node}/guard-actions.jsonl"], check=False).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def final_guard_record(cluster: LabCluster, node: str, vfs: str, timeout: float = 10) -> dict:
    """The guard's last final record for `vfs` on `node`, waited for: the guard writes it after its
    host actions, so a test that saw the VIP go or the disk unmounted may be a moment early."""
    found: list[dict] = []

    def final() -> bool:
        found[:] = [r for r in guard_records(cluster, node) if r["vfs"] == vfs and r.get("final")]
        return bool(found)

    wait_for(final, timeout, f"the guard's final record for {vfs} on {node}")
    return found[-1]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            item.add_marker(pytest.mark.skip(reason="the lab needs root"))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    with Lab(state_dir=os.environ.get("NFSHA_TEST_LAB_DIR", "/run/nfsha-lab-test")).running() as lab:
        yield lab


@pytest.fixture
def cluster(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LabCluster]:
    c = LabCluster(lab, tmp_path)
    try:
        yield c
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            for log in sorted(tmp_path.glob("agent-*.log")):
                print(f"===== {log.name}\n{log.read_text()[-8000:]}")
        c.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
