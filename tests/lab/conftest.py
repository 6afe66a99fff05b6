"""Fixtures for tests against the namespace lab: real etcd (3 members), real namespaces.

The lab is built once per session; each test gets its own key prefix and its own VIPs,
and everything it started is stopped (by PID) and every fault healed, even on failure.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "compose"))

from labkit import Lab  # noqa: E402

BIN = Path(sys.executable).parent
NODES = ("node-a", "node-b", "node-c")
CLIENT_IP = "10.77.0.50"
_vips = itertools.count(100)
_prefixes = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        for item in items:
            if "tests/lab/" in str(item.fspath):
                item.add_marker(pytest.mark.skip(reason="the lab needs root"))


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    lab = Lab(state_dir=os.environ.get("NFSHA_TEST_LAB_DIR", "/run/nfsha-lab-test"))
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


class Sampler:
    """Samples, from the client namespace, which MACs answer ARP for a VIP (every ~20 ms)."""

    def __init__(self, cluster: Cluster, vip: str, duration: float) -> None:
        self.path = cluster.logdir / f"arp-{vip}.jsonl"
        argv = [str(BIN / "python"), "-m", "node.arp", "watch", "--iface", "eth0", "--ip", vip,
                "--src-ip", CLIENT_IP, "--interval", "0.02", "--duration", str(duration)]
        with open(self.path, "wb") as out:
            self.proc = subprocess.Popen(cluster.lab.client_cmd(argv), stdout=out, stderr=subprocess.DEVNULL)

    def samples(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines[:-1] if line.strip()]  # the last may be partial

    def wait_for_mac(self, mac: str, timeout: float = 20) -> None:
        wait_for(lambda: any(mac in s["macs"] for s in self.samples()), timeout, f"sampler seeing {mac}")

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class Cluster:
    """One test's view of the lab: its prefix, its agents, its VIPs."""

    def __init__(self, lab: Lab, logdir: Path) -> None:
        self.lab = lab
        self.logdir = logdir
        self.prefix = f"/nfs-ha-test/{os.getpid()}-{next(_prefixes)}"
        self.agents: dict[str, int] = {}
        self.vips: list[str] = []
        self.samplers: list[Sampler] = []

    # --- set-up ---------------------------------------------------------------------------

    def new_vip(self) -> str:
        vip = f"10.77.0.{next(_vips)}"
        self.vips.append(vip)
        return vip

    def start_agent(self, node: str, ttl: int = 2, extra: tuple[str, ...] = ()) -> int:
        argv = [str(BIN / "nfs-ha-agent"), "--name", node, "--etcd", self.lab.etcd_endpoints_arg,
                "--interface", "eth0", "--lease-ttl", str(ttl), "--prefix", self.prefix,
                "--state-dir", "/run/nfs-ha", "--rank-delay", "0.3", "--log-level", "DEBUG", *extra]
        pid = self.lab.spawn(node, argv, self.logdir / f"agent-{node}.log")
        self.agents[node] = pid
        return pid

    def start_agents(self, ttl: int = 2, nodes: tuple[str, ...] = NODES) -> None:
        for node in nodes:
            self.start_agent(node, ttl)
        wait_for(lambda: all(n["alive"] for n in self.status()["nodes"] if n["node"] in nodes)
                 and {n["node"] for n in self.status()["nodes"]} >= set(nodes), 20, "agents registered")

    def stop_agent(self, node: str, sig: int = signal.SIGTERM) -> int | None:
        pid = self.agents.pop(node)
        return self.lab.stop(pid, sig, timeout=10)

    # --- etcd -----------------------------------------------------------------------------

    def key(self, vfs: str, field: str) -> str:
        return f"{self.prefix}/vfs/{vfs}/{field}"

    def put(self, key: str, value: str) -> None:
        self.lab.etcdctl("put", key, value)

    def put_spec(self, vfs: str, vip: str, candidates: list[str] | tuple[str, ...] = NODES, **extra: Any) -> None:
        self.put(self.key(vfs, "spec"), json.dumps({"vip": f"{vip}/24", "candidates": list(candidates), **extra}))

    def put_intent(self, vfs: str, node: str) -> None:
        self.put(self.key(vfs, "intent"), node)

    def delete(self, key: str) -> None:
        self.lab.etcdctl("del", key)

    def get_json(self, key: str) -> dict[str, Any] | None:
        out = self.lab.etcdctl("get", key, "--print-value-only").stdout.strip()
        return json.loads(out) if out else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / "nfs-ha"), "--etcd", self.lab.etcd_endpoints_arg, "--prefix", self.prefix, *args]
        return subprocess.run(self.lab.client_cmd(argv), capture_output=True, text=True, timeout=30)

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def vfs_status(self, vfs: str) -> dict[str, Any]:
        rows = [r for r in self.status()["vfs"] if r["vfs"] == vfs]
        return rows[0] if rows else {}

    # --- the network as a client sees it ------------------------------------------------------

    def answering_macs(self, vip: str) -> list[str]:
        argv = [str(BIN / "python"), "-m", "node.arp", "probe", "--iface", "eth0", "--ip", vip]
        out = self.lab.run("client", argv, timeout=20).stdout
        return json.loads(out)

    def wait_served_by(self, vip: str, node: str, timeout: float = 20) -> None:
        mac = self.lab.mac_of(node)
        wait_for(lambda: self.answering_macs(vip) == [mac], timeout, f"{vip} answered only by {node} ({mac})")

    def vip_on(self, node: str, vip: str) -> bool:
        out = self.lab.run(node, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        return f" {vip}/" in out

    def holders(self, vip: str) -> list[str]:
        return [n for n in NODES if self.vip_on(n, vip)]

    def sampler(self, vip: str, duration: float) -> Sampler:
        s = Sampler(self, vip, duration)
        self.samplers.append(s)
        return s

    # --- tear-down ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        for s in self.samplers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
        for node, pid in list(self.agents.items()):
            try:
                self.lab.stop(pid, signal.SIGKILL, timeout=10)
            except Exception as exc:  # keep cleaning up the rest
                print(f"stopping agent on {node} failed: {exc}")
        self.agents.clear()
        self.lab.heal()
        for node in NODES:
            self.lab.revive_node(node)
            for vip in self.vips:
                self.lab.run(node, ["ip", "addr", "del", f"{vip}/24", "dev", "eth0"], check=False)
            self.lab.run(node, ["rm", "-f", "/run/nfs-ha/" + node + "/raised-vips.json"], check=False)
        self.lab.etcdctl("del", "--prefix", self.prefix + "/", check=False)


@pytest.fixture
def cluster(lab: Lab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(lab, tmp_path)
    try:
        yield c
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            for log in sorted(tmp_path.glob("agent-*.log")):
                print(f"===== {log.name}\n{log.read_text()[-6000:]}")
        c.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
