"""Driving nfs-ha in the lab: agents on nodes, specs and intents in etcd, and what a
client sees on the wire. Shared by the tests, the benchmark and the demo.

Each LabCluster uses its own key prefix and its own VIPs, so several can run one after
another on one lab without seeing each other's leftovers.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .lab import Lab
from .topology import NODES

CLIENT_IP = "10.77.0.50"
NODE_NAMES = tuple(NODES)
_vips = itertools.count(100)
_prefixes = itertools.count(1)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until `predicate` returns something truthy; return it, or raise AssertionError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value {last!r}")


class Sampler:
    """Samples from the client namespace which MACs answer ARP for a VIP, every ~20 ms.

    Sample times are CLOCK_MONOTONIC, which all namespaces share, so they compare with
    time.monotonic() in this process.
    """

    def __init__(self, lab: Lab, bindir: Path, vip: str, path: Path, duration: float) -> None:
        self.path = path
        argv = [str(bindir / "python"), "-m", "node.arp", "watch", "--iface", "eth0", "--ip", vip,
                "--src-ip", CLIENT_IP, "--interval", "0.02", "--duration", str(duration)]
        with open(path, "wb") as out:
            self.proc = subprocess.Popen(lab.client_cmd(argv), stdout=out, stderr=subprocess.DEVNULL)

    def samples(self) -> list[dict[str, Any]]:
        lines = self.path.read_text().splitlines()
        return [json.loads(line) for line in lines[:-1] if line.strip()]  # the last may be partial

    def wait_for_mac(self, mac: str, timeout: float = 20, after: float = 0.0) -> float:
        """Monotonic time of the first sample (at or after `after`) in which `mac` answered."""
        def first() -> float | None:
            return next((s["t"] for s in self.samples() if s["t"] >= after and mac in s["macs"]), None)
        return float(wait_for(first, timeout, f"sampler seeing {mac}"))

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class LabCluster:
    """One run's view of the lab: its prefix, its agents, its VIPs, its samplers."""

    def __init__(self, lab: Lab, logdir: Path, bindir: Path | None = None) -> None:
        self.lab = lab
        self.logdir = logdir
        self.bindir = bindir or Path(sys.executable).parent
        self.prefix = f"/nfs-ha-lab/{os.getpid()}-{next(_prefixes)}"
        self.agents: dict[str, int] = {}
        self.vips: list[str] = []
        self.samplers: list[Sampler] = []

    # --- agents ---------------------------------------------------------------------------

    def new_vip(self) -> str:
        host = next(_vips)
        if host > 250:
            raise RuntimeError("out of lab VIPs")
        vip = f"10.77.0.{host}"
        self.vips.append(vip)
        return vip

    def start_agent(self, node: str, ttl: int = 2, extra: tuple[str, ...] = ()) -> int:
        argv = [str(self.bindir / "nfs-ha-agent"), "--name", node, "--etcd", self.lab.etcd_endpoints_arg,
                "--interface", "eth0", "--lease-ttl", str(ttl), "--prefix", self.prefix,
                "--state-dir", "/run/nfs-ha", "--rank-delay", "0.3", "--log-level", "DEBUG", *extra]
        pid = self.lab.spawn(node, argv, self.agent_log(node))
        self.agents[node] = pid
        return pid

    def agent_log(self, node: str) -> Path:
        return self.logdir / f"agent-{node}.log"

    def start_agents(self, ttl: int = 2, nodes: tuple[str, ...] = NODE_NAMES) -> None:
        """Start agents one by one, each registered before the next starts (a fixed order)."""
        for node in nodes:
            self.start_agent(node, ttl)
            wait_for(lambda n=node: self.node_alive(n), 20, f"{node} registered")

    def stop_agent(self, node: str, sig: int = signal.SIGTERM) -> int | None:
        pid = self.agents.pop(node)
        return self.lab.stop(pid, sig, timeout=10)

    def kill_node(self, node: str) -> None:
        self.lab.kill_node(node)
        self.agents.pop(node, None)

    # --- etcd -----------------------------------------------------------------------------

    def key(self, vfs: str, field: str) -> str:
        return f"{self.prefix}/vfs/{vfs}/{field}"

    def put(self, key: str, value: str) -> None:
        self.lab.etcdctl("put", key, value)

    def put_spec(self, vfs: str, vip: str, candidates: tuple[str, ...] | list[str] = NODE_NAMES,
                 **extra: Any) -> None:
        self.put(self.key(vfs, "spec"), json.dumps({"vip": f"{vip}/24", "candidates": list(candidates), **extra}))

    def put_intent(self, vfs: str, node: str) -> None:
        self.put(self.key(vfs, "intent"), node)

    def delete(self, key: str) -> None:
        self.lab.etcdctl("del", key)

    def get_json(self, key: str) -> dict[str, Any] | None:
        out = self.lab.etcdctl("get", key, "--print-value-only").stdout.strip()
        return json.loads(out) if out else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / "nfs-ha"), "--etcd", self.lab.etcd_endpoints_arg, "--prefix", self.prefix, *args]
        return subprocess.run(self.lab.client_cmd(argv), capture_output=True, text=True, timeout=30)

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        if proc.returncode != 0:
            raise RuntimeError(f"nfs-ha status failed: {proc.stderr}")
        return json.loads(proc.stdout)

    def vfs_status(self, vfs: str) -> dict[str, Any]:
        rows = [r for r in self.status()["vfs"] if r["vfs"] == vfs]
        return rows[0] if rows else {}

    def node_alive(self, node: str) -> bool:
        return any(n["node"] == node and n["alive"] for n in self.status()["nodes"])

    def wait_serving(self, vfs: str, node: str | None = None, timeout: float = 20,
                     not_epoch: int | None = None) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            row = self.vfs_status(vfs)
            ok = row.get("phase") == "serving" and (node is None or row.get("owner") == node) \
                and (not_epoch is None or row.get("epoch") != not_epoch)
            return row if ok else None
        return dict(wait_for(ready, timeout, f"{vfs} serving on {node or 'any node'}"))

    # --- the network as a client sees it ------------------------------------------------------

    def answering_macs(self, vip: str) -> list[str]:
        argv = [str(self.bindir / "python"), "-m", "node.arp", "probe", "--iface", "eth0", "--ip", vip]
        return list(json.loads(self.lab.run("client", argv, timeout=20).stdout))

    def wait_served_by(self, vip: str, node: str, timeout: float = 20) -> None:
        mac = self.lab.mac_of(node)
        wait_for(lambda: self.answering_macs(vip) == [mac], timeout, f"{vip} answered only by {node} ({mac})")

    def vip_on(self, node: str, vip: str) -> bool:
        out = self.lab.run(node, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        return f" {vip}/" in out

    def holders(self, vip: str) -> list[str]:
        return [n for n in NODE_NAMES if self.vip_on(n, vip)]

    def sampler(self, vip: str, duration: float = 120) -> Sampler:
        s = Sampler(self.lab, self.bindir, vip, self.logdir / f"arp-{vip}-{len(self.samplers)}.jsonl", duration)
        self.samplers.append(s)
        return s

    # --- tear-down ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop what this run started (by PID), heal every fault, remove its VIPs and keys."""
        for s in self.samplers:
            s.kill()
        for node, pid in list(self.agents.items()):
            try:
                self.lab.stop(pid, signal.SIGKILL, timeout=10)
            except Exception as exc:  # keep cleaning up the rest
                print(f"stopping agent on {node} failed: {exc}", file=sys.stderr)
        self.agents.clear()
        self.lab.heal()
        for node in NODE_NAMES:
            self.lab.revive_node(node)
            for vip in self.vips:
                self.lab.run(node, ["ip", "addr", "del", f"{vip}/24", "dev", "eth0"], check=False)
            self.lab.run(node, ["rm", "-f", f"/run/nfs-ha/{node}/raised-vips.json"], check=False)
        self.lab.etcdctl("del", "--prefix", self.prefix + "/", check=False)
