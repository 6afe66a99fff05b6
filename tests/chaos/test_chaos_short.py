"""A short chaos run (compose/labkit/chaos.py): every fault kind this nfs-ha can take, seeded,
against 4 NFS VFS under write load; the invariants must hold. Builds its own lab
(/run/nfsha-lab-chaos)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "compose"))

from labkit.chaos import FAULT_KINDS, NEEDS_RAISE_EPOCH, NEEDS_RESET, ChaosConfig, run

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, mounts)"),
]

SEED = 20240607
# Every kind runs: slow_unmount needs the guard's reset command (a frozen filesystem cannot be released
# otherwise), etcd_snapshot_restore the agents' recovery from revisions going back and raise-epoch.
PENDING_AGENT_WORK: tuple[str, ...] = ()
assert set(PENDING_AGENT_WORK) <= {*NEEDS_RESET, *NEEDS_RAISE_EPOCH}
KINDS = tuple(k for k in FAULT_KINDS if k not in PENDING_AGENT_WORK)
FAULTS = max(15, len(KINDS))  # every kind at least once (a shuffled deck)


def test_chaos_short(tmp_path: Path) -> None:
    report = run(ChaosConfig(faults=FAULTS, seed=SEED, vfs=4, ttl=2, spacing=(2.0, 4.0),
                             recovery_timeout=60.0, logdir=tmp_path, kinds=KINDS))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    summary = {k: report.get(k) for k in ("error", "kinds_skipped", "faults_by_kind", "arp", "mounts", "writes",
                                          "not_serving_at_end", "recovery_by_kind", "agent_errors", "resets",
                                          "agent_restarts", "malformed_specs")}
    print(json.dumps(report, indent=2))
    assert "error" not in report, summary
    assert report["kinds_skipped"] == {}, summary  # the agent lacks what a requested kind needs
    assert report["arp"]["double_mac_samples"] == 0, summary
    assert report["arp"]["samples"] > 0, summary
    # No disk mounted (or held open) by two nodes at once, sampled every ~20 ms all run long.
    assert report["dual_mount_samples"] == 0, summary
    assert report["mounts"]["samples"] > 0 and not report["mounts"].get("error"), summary
    assert report["writes"]["missing_or_wrong"] == 0, summary
    assert report["writes"]["acknowledged"] > 0, summary
    # Every acknowledged write was found on its disk after the run, not only through NFS.
    assert report["writes"]["checked_on_disk"] == report["writes"]["acknowledged"], summary
    assert report["writes"]["read_back_nfs"] > 0, summary
    assert report["serving_at_end"] and report["not_serving_at_end"] == [], summary
    assert report["distinct_kinds"] == len(KINDS), summary
    assert report["agent_restarts"]["unexpected"] == [], summary
    malformed = report["malformed_specs"]
    assert malformed["faults"] >= 1 and malformed["junk_without_status_error"] == [], summary
    assert malformed["stopped_serving"] == [] and malformed["overwritten_without_status_error"] == [], summary
    assert report["ok"], summary
