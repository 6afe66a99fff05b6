"""Self-test of the extra lab faults: client cut, isolated etcd member, etcd restart,
SIGSTOP/SIGCONT, Ganesha SIGKILL by namespace, per-process clock jumps (libfaketime)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
sys.path.insert(0, str(COMPOSE))

from labkit import Lab  # noqa: E402

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root (network namespaces, mounts)"),
]

STATE_DIR = "/run/nfsha-lab-selftest-faults"
NODE_A, NODE_B, CLIENT = "10.77.0.21", "10.77.0.22", "10.77.0.50"
ETCD = {1: "10.77.0.11", 2: "10.77.0.12", 3: "10.77.0.13"}
REACHABLE = ("open", "refused")
CUT = "error:EINVAL"  # connect() through a blackhole route


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_cut_from_client(healed: Lab) -> None:
    lab = healed
    lab.cut_from_client("node-a")
    assert lab.probe("client", NODE_A, 9) == CUT
    assert lab.probe("node-a", CLIENT, 9) == CUT
    assert lab.probe("node-a", ETCD[1], 2379) == "open"      # etcd still reachable
    assert lab.probe("client", NODE_B, 9) in REACHABLE        # other nodes unaffected
    lab.heal("node-a")
    assert lab.probe("client", NODE_A, 9) in REACHABLE
    assert lab.probe("node-a", CLIENT, 9) in REACHABLE


def test_etcd_minority_partition(healed: Lab) -> None:
    lab = healed
    lab.etcd_minority_partition(1)
    assert lab.probe("etcd2", ETCD[1], 2380) == CUT
    assert lab.probe("etcd1", ETCD[3], 2380) == CUT
    assert lab.probe("node-b", ETCD[1], 2379) == CUT
    assert lab.probe("client", ETCD[1], 2379) == CUT
    assert lab.probe("node-b", ETCD[2], 2379) == "open"
    # The majority keeps (or elects) a leader and serves writes.
    assert lab.wait_etcd_leader(10) in (2, 3)
    lab.etcdctl("--endpoints=http://10.77.0.12:2379", "put", "/selftest/minority", "ok")
    lab.heal()
    assert lab.probe("client", ETCD[1], 2379) == "open"
    assert lab.probe("etcd1", ETCD[2], 2380) == "open"


def test_restart_all_etcd(lab: Lab) -> None:
    lab.etcdctl("put", "/selftest/restart", "kept")
    before = [lab.etcd_pid(i) for i in (1, 2, 3)]
    leader = lab.restart_all_etcd()
    after = [lab.etcd_pid(i) for i in (1, 2, 3)]
    assert leader in (1, 2, 3)
    assert all(after) and not set(before) & set(after)
    assert lab.etcdctl("get", "/selftest/restart", "--print-value-only").stdout.strip() == "kept"


def test_sigstop_then_sigcont(lab: Lab, tmp_path: Path) -> None:
    pid = lab.spawn("node-a", ["sleep", "60"], tmp_path / "sleep.log")
    try:
        lab.agent_sigstop(pid, 2.0)
        # SIGSTOP is delivered when the target is next scheduled: on a loaded machine not at once.
        deadline = time.monotonic() + 1.0
        while _state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) == "T"
        time.sleep(2.5)
        assert _state(pid) != "T"
        lab.agent_sigstop(pid)  # no timer: stays stopped until heal()
        deadline = time.monotonic() + 1.0
        while _state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _state(pid) == "T" and lab.stopped_pids() == [pid]
        lab.heal()
        assert _state(pid) != "T" and lab.stopped_pids() == []
        lab.agent_sigstop(pid, 30)
        assert lab.agent_sigkill(pid) == -9   # a stopped process dies too, its timer is dropped
        assert lab.stopped_pids() == []
    finally:
        lab.sigcont_all()


def test_ganesha_sigkill_by_namespace(lab: Lab, tmp_path: Path) -> None:
    fake = lab.state_dir / "bin" / "ganesha.nfsd"  # comm "ganesha.nfsd"
    fake.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy("/bin/sleep", fake)
    on_a = lab.spawn("node-a", [str(fake), "60"], tmp_path / "g-a.log")
    on_b = lab.spawn("node-b", [str(fake), "60"], tmp_path / "g-b.log")
    other = lab.spawn("node-a", ["sleep", "60"], tmp_path / "s-a.log")
    try:
        assert lab.ganesha_pids("node-a") == [on_a]
        assert lab.ganesha_sigkill("node-a") == [on_a]
        assert lab.pids("node-b").count(on_b) == 1 and other in lab.pids("node-a")
        assert on_a not in lab.pids("node-a")
    finally:
        for pid in (on_b, other):
            lab.stop(pid)


CLOCK_PROBE = """
import json, sys, time
time.sleep(0.05)  # clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) must work under libfaketime
m0 = time.monotonic()
while time.monotonic() - m0 < 20:
    print(json.dumps({"wall": time.time(), "mono": time.monotonic()}), flush=True)
    time.sleep(0.1)
"""


def test_clock_jump_under_faketime(healed: Lab, tmp_path: Path) -> None:
    lab = healed
    log = tmp_path / "clock.log"
    env = lab.faketime_env("node-a")
    assert Path(env["FAKETIME_TIMESTAMP_FILE"]).read_text().strip() == "+0"
    pid = lab.spawn("node-a", [sys.executable, "-c", CLOCK_PROBE], log, env=env)

    def last() -> dict[str, float]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            lines = [ln for ln in log.read_text().splitlines() if ln.startswith("{")]
            if len(lines) >= 2:
                return dict(json.loads(lines[-2]))
            time.sleep(0.05)
        raise AssertionError(f"no output: {log.read_text()[-2000:]}")

    def settled(offset: float) -> dict[str, float]:
        """The first sample showing the offset: libfaketime re-reads it at most a second later."""
        deadline = time.monotonic() + 5
        while True:
            sample = last()
            if abs(sample["wall"] - time.time() - offset) < 2 or time.monotonic() > deadline:
                return sample
            time.sleep(0.1)

    try:
        time.sleep(0.5)
        assert abs(last()["wall"] - time.time()) < 2
        assert lab.clock_jump("node-a", 300) == "+300s"
        sample = settled(300)
        assert abs(sample["wall"] - time.time() - 300) < 2       # wall clock jumped
        assert abs(sample["mono"] - time.monotonic()) < 2        # monotonic did not
        assert lab.clock_jump("node-a", -120) == "-120s"
        assert abs(settled(-120)["wall"] - time.time() + 120) < 2
        lab.heal("node-a")                                        # back to real time
        assert lab.clock_offset("node-a") == "+0"
        assert abs(settled(0)["wall"] - time.time()) < 2
        assert "Error" not in log.read_text()
    finally:
        lab.stop(pid)
