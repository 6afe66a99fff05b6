"""A short chaos run (compose/labkit/chaos.py): ~15 seeded faults against 4 NFS VFS under
write load; the invariants must hold. Builds its own lab (/run/nfsha-lab-chaos)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "compose"))

from labkit.chaos import ChaosConfig, run

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, mounts)"),
]

SEED = 20240607
FAULTS = 15


def test_chaos_short(tmp_path: Path) -> None:
    report = run(ChaosConfig(faults=FAULTS, seed=SEED, vfs=4, ttl=2, spacing=(2.0, 4.0),
                             recovery_timeout=60.0, logdir=tmp_path))
    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    summary = {k: report.get(k) for k in ("error", "faults_by_kind", "arp", "writes", "not_serving_at_end",
                                          "recovery_by_kind", "agent_errors")}
    print(json.dumps(report, indent=2))
    assert "error" not in report, summary
    assert report["arp"]["double_mac_samples"] == 0, summary
    assert report["arp"]["samples"] > 0, summary
    assert report["writes"]["missing_or_wrong"] == 0, summary
    assert report["writes"]["acknowledged"] > 0, summary
    # Every acknowledged write was found on its disk after the run, not only through NFS.
    assert report["writes"]["checked_on_disk"] == report["writes"]["acknowledged"], summary
    assert report["writes"]["read_back_nfs"] > 0, summary
    assert report["serving_at_end"] and report["not_serving_at_end"] == [], summary
    assert report["distinct_kinds"] >= 5, summary
    assert report["ok"], summary
