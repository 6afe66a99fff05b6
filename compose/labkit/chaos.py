"""Chaos run: random faults against a lab with several NFS VFS under write load.

    from labkit.chaos import ChaosConfig, run
    report = run(ChaosConfig(faults=15, seed=7))      # builds and removes its own lab
    report["ok"]                                      # the invariants held

Builds a lab in /run/nfsha-lab-chaos (after waiting for any other lab on the machine to go
away), starts an agent under libfaketime on every node, ``vfs`` fileservers (own loop-device
xfs disk, own export, grace and lease 5 s) with a writer and an ARP sampler each, then injects
``faults`` seeded random faults one after another. Each fault is held for a seeded spacing,
healed, and the time until every VFS is serving again is measured (bounded). At the end:
acknowledged writes are read back through their VIPs (all, or ``nfs_read_max`` per VFS), then
the agents are stopped (releasing every VFS) and every acknowledged write is checked on its
disk; the ARP samples are checked for two MACs answering one VIP, agent logs are scanned for
errors. See docs/lab.md.
"""

from __future__ import annotations

import json
import random
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import diskcheck, netns
from .cluster import NODE_NAMES, LabCluster
from .lab import Lab

STATE_DIR = "/run/nfsha-lab-chaos"
GRACE = 5
FAULT_KINDS = (
    "node_kill", "agent_sigkill", "agent_sigstop", "node_cut_from_etcd", "node_cut_from_client",
    "etcd_leader_kill", "etcd_minority_partition", "etcd_restart_all", "ganesha_sigkill",
    "disk_block_next_candidate", "clock_jump",
)
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


@dataclass
class ChaosConfig:
    faults: int = 15
    seed: int = 1
    vfs: int = 4
    ttl: int = 2
    spacing: tuple[float, float] = (2.0, 6.0)  # seconds a fault is held before it is healed
    recovery_timeout: float = 60.0  # per fault, after the heal
    setup_timeout: float = 90.0
    writer_interval: float = 0.1
    nfs_read_max: int = 400  # per VFS read back through NFS (all are checked on disk)
    state_dir: str = STATE_DIR
    logdir: Path | None = None
    kinds: tuple[str, ...] = FAULT_KINDS
    wait_free_timeout: float = 600.0  # another lab on the machine: wait this long for it to go
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))


def wait_lab_free(timeout: float, log: Callable[[str], None], poll: float = 10.0) -> None:
    """Only one lab can exist: wait (poll every 10 s) until no nfsha-* namespace is left."""
    deadline = time.monotonic() + timeout
    while True:
        present = netns.existing_lab_namespaces()
        if not present:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"another lab is still up after {timeout}s: {present}")
        log(f"waiting for another lab to go away: {present}")
        time.sleep(poll)


class Chaos:
    def __init__(self, cfg: ChaosConfig, lab: Lab, logdir: Path) -> None:
        self.cfg = cfg
        self.lab = lab
        self.rng = random.Random(cfg.seed)
        self.cluster = LabCluster(lab, logdir)
        self.cluster.faketime = True
        self.vfs: dict[str, dict[str, Any]] = {}  # name -> vip, device, pseudo, candidates
        self.events: list[dict[str, Any]] = []
        self.status_errors: dict[str, int] = {}
        self.status_failures = 0
        self._deck: list[str] = []

    # --- helpers ------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        self.cfg.log(f"[chaos {time.strftime('%H:%M:%S')}] {msg}")

    def snapshot(self) -> dict[str, Any] | None:
        """nfs-ha status --json, or None while it fails (etcd down); errors are recorded."""
        try:
            data = self.cluster.status()
        except Exception as exc:  # a failed status call is data here
            self.status_failures += 1
            key = f"status call failed: {str(exc).strip()[-200:]}"
            self.status_errors[key] = self.status_errors.get(key, 0) + 1
            return None
        for row in data.get("vfs", []):
            if row.get("error"):
                key = f"{row['vfs']}: {row['error']}"
                self.status_errors[key] = self.status_errors.get(key, 0) + 1
        return data

    def not_serving(self, data: dict[str, Any] | None) -> list[str]:
        """VFS not serving: phase != serving, no owner, or its owner not alive."""
        if data is None:
            return sorted(self.vfs)
        alive = {n["node"] for n in data.get("nodes", []) if n.get("alive")}
        rows = {r["vfs"]: r for r in data.get("vfs", [])}
        bad = []
        for name in self.vfs:
            row = rows.get(name) or {}
            if row.get("phase") != "serving" or row.get("owner") not in alive:
                bad.append(name)
        return bad

    def wait_all_serving(self, timeout: float) -> tuple[float | None, list[str]]:
        """Seconds until every VFS serves (None on timeout) and what is not serving then."""
        start = time.monotonic()
        bad: list[str] = sorted(self.vfs)
        while time.monotonic() - start < timeout:
            bad = self.not_serving(self.snapshot())
            if not bad:
                return time.monotonic() - start, []
            time.sleep(0.2)
        return None, bad

    def hold(self, seconds: float) -> None:
        """Wait while a fault is active, sampling the status (errors are collected)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.snapshot()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def owners(self) -> dict[str, str]:
        data = self.snapshot() or {}
        return {r["vfs"]: r["owner"] for r in data.get("vfs", []) if r.get("owner") and r["vfs"] in self.vfs}

    def owner_node(self) -> str:
        """Owner of a random VFS (so the fault hits something), or a random node."""
        owners = self.owners()
        if owners:
            return owners[self.rng.choice(sorted(owners))]
        return self.rng.choice(NODE_NAMES)

    def ensure_agent(self, node: str) -> None:
        if node not in self.cluster.agents:
            self.cluster.start_agent(node, self.cfg.ttl)

    def next_kind(self) -> str:
        # A shuffled deck: every kind comes once per round, in seeded random order.
        if not self._deck:
            self._deck = list(self.cfg.kinds)
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    # --- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        c = self.cluster
        c.start_agents(self.cfg.ttl)  # one by one, each registered before the next (under faketime)
        for i in range(self.cfg.vfs):
            name = f"v{i}"
            device = self.lab.create_disk(f"chaos-{name}")
            c.disks.append(device)
            vip = c.new_vip()
            candidates = NODE_NAMES[i % 3:] + NODE_NAMES[:i % 3]  # spread the first choices
            pseudo = f"/{name}"
            c.put_spec(name, vip, candidates,
                       storage={"device": device, "fstype": "xfs", "options": "noatime"},
                       exports=[{"path": "/", "pseudo": pseudo, "access": "rw", "clients": ["10.77.0.0/24"],
                                 "squash": "none"}],
                       nfs={"backend": "ganesha", "grace_seconds": GRACE, "lease_seconds": GRACE})
            self.vfs[name] = {"vip": vip, "device": device, "pseudo": pseudo, "candidates": list(candidates)}
        took, bad = self.wait_all_serving(self.cfg.setup_timeout)
        if took is None:
            raise RuntimeError(f"VFS not serving after set-up: {bad}")
        self.log(f"{len(self.vfs)} VFS serving: {self.owners()}")
        for info in self.vfs.values():
            info["writer"] = c.start_writer(info["vip"], info["pseudo"], duration=24 * 3600,
                                            interval=self.cfg.writer_interval)
            info["sampler"] = c.sampler(info["vip"], duration=24 * 3600)

    # --- faults: each returns (target description, heal function) -----------------------------

    def inject(self, kind: str, spacing: float) -> tuple[str, Callable[[], object]]:
        c, lab = self.cluster, self.lab
        if kind == "node_kill":
            node = self.owner_node()
            c.kill_node(node)

            def heal() -> None:
                lab.revive_node(node)
                self.ensure_agent(node)
            return node, heal
        if kind == "agent_sigkill":
            node = self.owner_node()
            lab.agent_sigkill(c.agents.pop(node))
            return node, lambda: self.ensure_agent(node)
        if kind == "agent_sigstop":
            node = self.owner_node()
            pid = c.agents[node]
            seconds = max(spacing, self.cfg.ttl * 2 + 1.0)  # longer than the lease TTL
            lab.agent_sigstop(pid, seconds)
            until = time.monotonic() + seconds
            return f"{node} for {seconds:.1f}s", lambda: self._cont_at(pid, until)
        if kind == "node_cut_from_etcd":
            node = self.owner_node()
            lab.partition_node(node)
            return node, lambda: lab.heal(node)
        if kind == "node_cut_from_client":
            node = self.owner_node()
            lab.cut_from_client(node)
            return node, lambda: lab.heal_client(node)
        if kind == "etcd_leader_kill":
            index = lab.wait_etcd_leader(10)
            lab.kill_etcd_member(index)
            return f"etcd{index}", lambda: lab.start_etcd_member(index)
        if kind == "etcd_minority_partition":
            index = self.rng.choice((1, 2, 3))
            lab.etcd_minority_partition(index)
            return f"etcd{index}", lambda: lab.heal_etcd(index)
        if kind == "etcd_restart_all":
            leader = lab.restart_all_etcd()
            return f"all (etcd{leader} leads after)", lambda: None
        if kind == "ganesha_sigkill":
            node = self.owner_node()
            pids = lab.ganesha_sigkill(node)
            return f"{node} pids {pids}", lambda: None
        if kind == "disk_block_next_candidate":
            return self._disk_block()
        if kind == "clock_jump":
            node = self.rng.choice(NODE_NAMES)
            minutes = self.rng.choice((-1, 1)) * self.rng.randint(1, 10)
            offset = lab.clock_jump(node, minutes * 60)
            return f"{node} {offset}", lambda: lab.clock_jump(node, 0)
        raise ValueError(f"unknown fault kind {kind!r}")

    def _cont_at(self, pid: int, until: float) -> None:
        # The timer sends SIGCONT at `until`; the heal makes sure it happened.
        self.hold(max(0.0, until - time.monotonic()))
        self.lab.agent_sigcont(pid)

    def _disk_block(self) -> tuple[str, Callable[[], object]]:
        """Block the disk of a VFS on the node that would take it next, then crash its owner."""
        owners = self.owners()
        if not owners:
            raise RuntimeError("no VFS has an owner")
        name = self.rng.choice(sorted(owners))
        owner = owners[name]
        info = self.vfs[name]
        nxt = next(n for n in info["candidates"] if n != owner)
        self.lab.block_device_on(nxt, info["device"])
        self.cluster.kill_node(owner)

        def heal() -> None:
            self.lab.unblock_device_on(nxt, info["device"])
            self.lab.revive_node(owner)
            self.ensure_agent(owner)
        return f"{name}: blocked on {nxt}, killed owner {owner}", heal

    # --- the run ------------------------------------------------------------------------------

    def run_faults(self) -> None:
        for i in range(self.cfg.faults):
            kind = self.next_kind()
            spacing = round(self.rng.uniform(*self.cfg.spacing), 2)
            t0 = time.monotonic()
            event: dict[str, Any] = {"i": i, "kind": kind, "spacing_s": spacing}
            try:
                target, heal = self.inject(kind, spacing)
            except Exception as exc:  # record and go on
                event.update(target=None, inject_error=repr(exc))
                self.events.append(event)
                self.log(f"fault {i} {kind}: injection failed: {exc!r}")
                continue
            event["target"] = target
            self.log(f"fault {i} {kind} on {target}; holding {spacing}s")
            event["not_serving_during"] = sorted(set(self.not_serving(self.snapshot())))
            self.hold(spacing)
            t_heal = time.monotonic()
            try:
                heal()
            except Exception as exc:
                event["heal_error"] = repr(exc)
                self.log(f"fault {i} {kind}: heal failed: {exc!r}")
            took, bad = self.wait_all_serving(self.cfg.recovery_timeout)
            event["recovery_s"] = None if took is None else round(time.monotonic() - t_heal, 3)
            event["from_fault_s"] = None if took is None else round(time.monotonic() - t0, 3)
            event["not_serving_after"] = bad
            self.events.append(event)
            self.log(f"fault {i} {kind}: " + (f"all serving {event['recovery_s']}s after heal" if took is not None
                                              else f"NOT serving after {self.cfg.recovery_timeout}s: {bad}"))

    def finish(self) -> dict[str, Any]:
        """Heal everything, then check the promises: ARP samples, and every acknowledged write,
        read back through its VIP (all of them, or a sample of ``nfs_read_max`` per VFS) and
        then checked on its disk after the agents released every VFS (labkit.diskcheck)."""
        self.lab.heal()
        for node in NODE_NAMES:
            self.ensure_agent(node)
        _, bad_end = self.wait_all_serving(self.cfg.recovery_timeout)
        owners_before = self.owners()
        acked: dict[str, list[dict[str, Any]]] = {}
        writes: dict[str, Any] = {"acknowledged": 0, "failed_attempts": 0, "read_back_nfs": 0,
                                  "checked_on_disk": 0, "missing_or_wrong": 0, "missing_names": {}}
        for name, info in self.vfs.items():
            log = info["writer"].stop()
            acked[name] = [r for r in log if "name" in r and "sha256" in r]
            writes["acknowledged"] += len(acked[name])
            writes["failed_attempts"] += sum(1 for r in log if "failed" in r)
        arp = self.arp_report()
        lost: dict[str, set[str]] = {}
        for name in self.vfs:
            sample = self.nfs_sample(acked[name])
            writes["read_back_nfs"] += len(sample)
            lost[name] = set(self.verify_nfs(name, sample, writes))
        owners_after = self.owners()
        writes["owner_changes_during_check"] = {
            name: [owners_before.get(name), owners_after.get(name)]
            for name in self.vfs if owners_before.get(name) != owners_after.get(name)}
        self.check_disks(acked, lost, writes)
        for name, names in lost.items():
            writes["missing_or_wrong"] += len(names)
            if names:
                writes["missing_names"][name] = sorted(names)[:20]
        return {"writes": writes, "arp": arp, "not_serving_at_end": bad_end}

    def arp_report(self) -> dict[str, Any]:
        arp: dict[str, Any] = {"samples": 0, "double_mac_samples": 0, "per_vip": {}}
        for name, info in self.vfs.items():
            samples = info["sampler"].stop()
            doubles = [s for s in samples if len(set(s.get("macs", []))) > 1]
            arp["samples"] += len(samples)
            arp["double_mac_samples"] += len(doubles)
            arp["per_vip"][info["vip"]] = {"vfs": name, "samples": len(samples), "double_mac": len(doubles),
                                           "first_double": doubles[0] if doubles else None}
        return arp

    def nfs_sample(self, acked: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """What is read back through NFS: everything up to nfs_read_max, else the last writes
        (those nearest the last fault) plus a seeded random sample of the rest."""
        limit = self.cfg.nfs_read_max
        if len(acked) <= limit:
            return acked
        tail = min(limit // 4, len(acked))
        head = acked[:len(acked) - tail]
        return self.rng.sample(head, limit - tail) + acked[len(acked) - tail:]

    def verify_nfs(self, name: str, acked: list[dict[str, Any]], writes: dict[str, Any]) -> list[str]:
        """Acknowledged writes of one VFS missing or wrong when read through its VIP. A server
        that took over recently answers NFS4ERR_GRACE; such reads are retried (settle)."""
        if not acked:
            return []
        info = self.vfs[name]
        vip, pseudo = info["vip"], info["pseudo"]
        bad = self.cluster.verify_writes(vip, pseudo, acked, timeout=30, settle=GRACE * 4 + 40)
        for rec_name in bad[:5]:
            r = self.cluster.nfs_read(vip, pseudo, rec_name, timeout=10)
            writes.setdefault("errors", {})[f"{name}/{rec_name}"] = (
                r.stderr.strip()[-300:] if r.data is None else f"{len(r.data)} bytes, other content")
        return bad

    def check_disks(self, acked: dict[str, list[dict[str, Any]]], lost: dict[str, set[str]],
                    writes: dict[str, Any]) -> None:
        """Stop every agent with SIGTERM (each releases its VFS: VIP down, NFS server stopped,
        unmounted), then check every acknowledged write on each disk. A disk that cannot be
        checked is an error (it fails the run): its writes are counted as unverified."""
        for node in list(self.cluster.agents):
            self.cluster.stop_agent(node)
        devices = [info["device"] for info in self.vfs.values()]
        busy = set(diskcheck.wait_unmounted(devices, 60))
        for name, info in self.vfs.items():
            expected = {str(r["name"]): str(r["sha256"]) for r in acked[name]}
            try:
                if info["device"] in busy:
                    raise RuntimeError(f"{info['device']} still mounted after every agent stopped")
                result = diskcheck.check(info["device"], "xfs", expected)
            except Exception as exc:  # reported: the writes of this disk are unverified
                writes.setdefault("disk_check_errors", {})[name] = str(exc)[-500:]
                writes["unverified_on_disk"] = writes.get("unverified_on_disk", 0) + len(expected)
                continue
            writes["checked_on_disk"] += int(result["checked"])
            lost[name] |= set(result["missing"]) | set(result["wrong"])
            if result["missing"] or result["wrong"]:
                writes.setdefault("on_disk", {})[name] = {"missing": result["missing"][:20],
                                                          "wrong": result["wrong"][:20]}

    def agent_errors(self) -> list[str]:
        lines = []
        for node in NODE_NAMES:
            path = self.cluster.agent_log(node)
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                if _ERROR_LINE.search(line):
                    lines.append(f"{node}: {line.strip()[:400]}")
        return lines


def summarize(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def run(cfg: ChaosConfig) -> dict[str, Any]:
    """Build the lab, run the chaos, tear everything down; the report (see docs/lab.md)."""
    started = time.monotonic()
    logdir = Path(cfg.logdir) if cfg.logdir else Path(f"/tmp/nfsha-chaos-{cfg.seed}-{int(time.time())}")
    logdir.mkdir(parents=True, exist_ok=True)
    wait_lab_free(cfg.wait_free_timeout, cfg.log)
    lab = Lab(state_dir=cfg.state_dir)
    chaos: Chaos | None = None
    report: dict[str, Any] = {"seed": cfg.seed, "faults_requested": cfg.faults, "vfs": cfg.vfs,
                              "ttl": cfg.ttl, "logdir": str(logdir)}
    try:
        lab.up()
        chaos = Chaos(cfg, lab, logdir)
        chaos.setup()
        report["setup_s"] = round(time.monotonic() - started, 1)
        chaos.run_faults()
        end = chaos.finish()
        report.update(_report(chaos, end))
    except Exception as exc:  # reported; the lab still goes down
        report["error"] = repr(exc)
        report["ok"] = False
        if chaos is not None:
            report["faults"] = chaos.events
            report["agent_errors"] = chaos.agent_errors()[:200]
    finally:
        try:
            if chaos is not None:
                chaos.cluster.cleanup()
        finally:
            lab.down()
        report["duration_s"] = round(time.monotonic() - started, 1)
    return report


def _report(chaos: Chaos, end: dict[str, Any]) -> dict[str, Any]:
    by_kind: dict[str, Any] = {}
    for kind in sorted({e["kind"] for e in chaos.events}):
        events = [e for e in chaos.events if e["kind"] == kind]
        times = [e["recovery_s"] for e in events if e.get("recovery_s") is not None]
        from_fault = [e["from_fault_s"] for e in events if e.get("from_fault_s") is not None]
        by_kind[kind] = {
            "n": len(events),
            "recovery_after_heal_s": summarize(times),
            "recovery_from_fault_s": summarize(from_fault),
            "timed_out": sum(1 for e in events if "inject_error" not in e and e.get("recovery_s") is None),
            "vfs_not_serving_after": sum(len(e.get("not_serving_after", [])) for e in events),
            "inject_errors": sum(1 for e in events if "inject_error" in e),
        }
    injected = [e for e in chaos.events if "inject_error" not in e]
    faults_by_kind: dict[str, int] = {}
    for e in injected:
        faults_by_kind[e["kind"]] = faults_by_kind.get(e["kind"], 0) + 1
    agent_errors = chaos.agent_errors()
    serving_at_end = not end["not_serving_at_end"]
    ok = (end["arp"]["double_mac_samples"] == 0 and end["writes"]["missing_or_wrong"] == 0 and serving_at_end
          and not end["writes"].get("disk_check_errors"))
    return {
        "ok": ok,
        "faults_injected": len(injected),
        "faults_by_kind": faults_by_kind,
        "distinct_kinds": len(faults_by_kind),
        "arp": end["arp"],
        "writes": end["writes"],
        "recovery_by_kind": by_kind,
        "serving_at_end": serving_at_end,
        "not_serving_at_end": end["not_serving_at_end"],
        "agent_errors": {"count": len(agent_errors), "lines": agent_errors[:100]},
        "status_errors": {"distinct": len(chaos.status_errors), "failed_status_calls": chaos.status_failures,
                          "seen": dict(sorted(chaos.status_errors.items())[:100])},
        "faults": chaos.events,
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="chaos", description="Random faults against the nfs-ha lab.")
    parser.add_argument("--faults", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--vfs", type=int, default=4)
    parser.add_argument("--ttl", type=int, default=2)
    parser.add_argument("--spacing", type=float, nargs=2, default=(2.0, 6.0), metavar=("MIN", "MAX"))
    parser.add_argument("--recovery-timeout", type=float, default=60.0)
    parser.add_argument("--nfs-read-max", type=int, default=400,
                        help="acknowledged writes per VFS read back through NFS (all are checked on disk)")
    parser.add_argument("--logdir", help="agent, writer and sampler logs (default /tmp/nfsha-chaos-SEED-TIME)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    cfg = ChaosConfig(faults=args.faults, seed=args.seed, vfs=max(1, args.vfs), ttl=args.ttl,
                      spacing=(args.spacing[0], args.spacing[1]), recovery_timeout=args.recovery_timeout,
                      nfs_read_max=max(1, args.nfs_read_max), logdir=Path(args.logdir) if args.logdir else None)
    report = run(cfg)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report.get("ok") else 1
