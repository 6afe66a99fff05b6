"""The coordination contract (tests/unit/test_coordination_contract.py) against the lab's etcd: three
members in namespaces of their own, reached over the lab's bridge from the client namespace, with
EtcdStore's failover between endpoints, instead of one member on loopback. Same tests, the etcd half
of them (the MemStore half does not depend on where etcd runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_coordination_contract_holds_against_the_labs_three_etcd_members(lab) -> None:
    env = {**os.environ, "NFS_HA_TEST_ETCD": lab.etcd_endpoints_arg, "PYTHONPATH": str(REPO)}
    argv = lab.client_cmd([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not memstore",
                           str(REPO / "tests/unit/test_coordination_contract.py")])
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    passed = re.search(r"(\d+) passed", out.stdout)
    # the etcd half ran (one per contract test; none skipped): as many as the file has tests
    tests = len(re.findall(r"^def test_", (REPO / "tests/unit/test_coordination_contract.py").read_text(), re.M))
    assert passed and int(passed.group(1)) == tests >= 17, report
    assert "skipped" not in out.stdout.splitlines()[-1], report
