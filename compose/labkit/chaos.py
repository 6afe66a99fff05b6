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
disk; the ARP samples are checked for two MACs answering one VIP, the dual-mount sampler's for
one disk mounted (or held open) by two nodes, agent logs are scanned for errors. See docs/lab.md.

Invariants of the run itself: every fault undoes what it created (processes by PID, routes,
freezes, keys) in its heal, also when its injection failed half-way; agents that died (a fence
guard's reset, as a power cycle) are started again after each heal and before each fault, as a
rebooted machine's init would, and counted; the lab is always removed at the end.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import diskcheck, etcd, netns
from .arpscan import ArpScan
from .cluster import (
    CLIENT_IP,
    NODE_NAMES,
    LabCluster,
    MountSampler,
    agent_supports,
    cli_supports,
    many_vip,
    spread_candidates,
)
from .errors import LabError
from .lab import Lab

STATE_DIR = "/run/nfsha-lab-chaos"
GRACE = 5
FAULT_KINDS = (
    "node_kill", "agent_sigkill", "agent_sigstop", "node_cut_from_etcd", "node_cut_from_client",
    "etcd_leader_kill", "etcd_minority_partition", "etcd_restart_all", "ganesha_sigkill",
    "disk_block_next_candidate", "clock_jump",
    "ganesha_ignores_sigterm", "mount_held_open", "slow_unmount", "agent_starvation", "malformed_specs",
    "etcd_snapshot_restore",
)
# Kinds that need agent features (docs/safety.md): without them the old owner can still have the
# disk when the next one mounts it, which the dual-mount invariant rightly counts as a failure.
NEEDS_RESET = ("ganesha_ignores_sigterm", "mount_held_open", "slow_unmount")
NEEDS_RAISE_EPOCH = ("etcd_snapshot_restore",)
_ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")
RAISE_EPOCH = re.compile(r"nfs-ha raise-epoch (\d+)")
DEFAULT_RELEASE_BOUND = 10.0  # the agent's default T_release (node/config.py)
JUNK_VIP = "10.77.0.251"  # outside LabCluster's VIPs (100-250) and every lab host
JUNK_DEVICE = "/dev/nfsha-chaos-no-such-disk"


def unsupported_kinds(bindir: Path, kinds: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Requested kinds this nfs-ha cannot take yet, with the reason (read from --help)."""
    missing: dict[str, str] = {}
    for kind in kinds:
        if kind in NEEDS_RESET and not (agent_supports(bindir, "--reset-command")
                                        and agent_supports(bindir, "--release-bound")):
            missing[kind] = "needs the agent's --reset-command and --release-bound (fence guard reset, T_release)"
        if kind in NEEDS_RAISE_EPOCH and not cli_supports(bindir, "raise-epoch"):
            missing[kind] = "needs `nfs-ha raise-epoch` (recovery after an etcd snapshot restore)"
    return missing


def junk_specs(prefix_name: str) -> list[tuple[str, bytes]]:
    """(label, raw spec) an operator or an attacker could write: each must be refused with a
    status error, never crash an agent or touch a real disk or address. A spec that happens to
    pass validation still fails harmlessly: its device does not exist, its VIP is unused."""
    vip = f"{JUNK_VIP}/24"
    storage = {"device": JUNK_DEVICE, "fstype": "xfs"}

    def spec(**fields: Any) -> bytes:
        doc: dict[str, Any] = {"vip": vip, "candidates": list(NODE_NAMES), "storage": storage,
                               "exports": [{"path": "/", "pseudo": "/junk", "access": "rw",
                                            "clients": ["10.77.0.0/24"]}]}
        doc.update(fields)
        return json.dumps(doc).encode()

    def export(**fields: Any) -> list[dict[str, Any]]:
        return [{"path": "/", "pseudo": "/junk", "access": "rw", "clients": ["10.77.0.0/24"], **fields}]

    def nested(depth: int) -> bytes:
        return b'{"vip": ' + b"[" * depth + b"]" * depth + b', "candidates": ["node-a"]}'

    return [
        ("deep nesting", nested(30_000)),  # fits the size limit: the parser's recursion must hold
        ("deep nesting, oversized", nested(100_000)),
        ("deep nesting in exports", spec(exports=[{"clients": [[[[[[[[[[[[[[[[[["x"]]]]]]]]]]]]]]]]]]}])),
        ("huge string", spec(storage={"device": "/dev/" + "x" * 900_000, "fstype": "xfs"})),
        ("long device path", spec(storage={"device": "/dev/" + "x" * 60_000, "fstype": "xfs"})),
        ("long candidate list", spec(candidates=[f"node-{i}" for i in range(5_000)])),
        ("VIP not an address", spec(vip="10.77.0.300/24")),
        ("VIP with a /0 prefix", spec(vip=f"{JUNK_VIP}/0")),
        ("IPv6 VIP", spec(vip="fe80::1%eth0/64")),
        ("VIP with shell text", spec(vip=f"{JUNK_VIP}/24; ip link set eth0 down")),
        ("VIP as a number", spec(vip=174_326_011)),
        ("client IPv6 with scope id", spec(exports=export(clients=["fe80::1%eth0"]))),
        ("client /0", spec(exports=export(clients=["0.0.0.0/0"]))),
        ("client with Ganesha config text", spec(exports=export(clients=['10.77.0.0/24; } EXPORT { Path = "/"']))),
        ("export path /.nfs-ha", spec(exports=export(path="/.nfs-ha"))),
        ("export path escaping the disk", spec(exports=export(path="/../../etc"))),
        ("pseudo with config injection", spec(exports=export(pseudo='/j"; } EXPORT { Export_Id = 9; Path = "/'))),
        ("pseudo with a newline", spec(exports=export(pseudo="/junk\nEXPORT {"))),
        ("mount options injection", spec(storage={"device": JUNK_DEVICE, "fstype": "xfs",
                                                  "options": "noatime,remount\nexec"})),
        ("device with shell text", spec(storage={"device": "/dev/loop0; rm -rf /", "fstype": "xfs"})),
        ("fstype injection", spec(storage={"device": JUNK_DEVICE, "fstype": "xfs -o remount"})),
        ("negative grace", spec(nfs={"backend": "ganesha", "grace_seconds": -5, "lease_seconds": 5})),
        ("lease TTL true", spec(lease_ttl=True)),
        ("candidates not names", spec(candidates=["../etc", "", "node-a node-b"])),
        ("duplicate keys", b'{"vip": "' + vip.encode() + b'", "vip": "10.77.0.252/24", "candidates": ["node-a"]}'),
        ("NaN", b'{"vip": NaN, "candidates": ["node-a"]}'),
        ("integer with 100000 digits", b'{"vip": ' + b"9" * 100_000 + b', "candidates": ["node-a"]}'),
        ("not UTF-8", b'{"vip": "\xff\xfe", "candidates": ["node-a"]}'),
        ("a JSON list", b"[1, 2, 3]"),
        ("null", b"null"),
        ("empty", b""),
        ("unknown field", spec(owner=prefix_name)),
    ]


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
    skip_unsupported: bool = True  # kinds this nfs-ha cannot take yet are left out (and reported)
    release_bound: float | None = None  # the agents' --release-bound (None: their default)
    junk_per_fault: int = 6  # malformed specs written to new VFS names per malformed_specs fault
    vip_vfs: int = 0  # VIP-only VFS besides the NFS ones (issue 9: 100), ARP-sampled together in passes
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
    def __init__(self, cfg: ChaosConfig, lab: Lab, logdir: Path, kinds: tuple[str, ...] | None = None) -> None:
        self.cfg = cfg
        self.lab = lab
        self.logdir = logdir
        self.kinds = kinds if kinds is not None else cfg.kinds
        self.rng = random.Random(cfg.seed)
        self.cluster = LabCluster(lab, logdir)
        # Agents run under libfaketime only for clock jumps: it has limits of its own (docs/lab.md).
        self.cluster.faketime = "clock_jump" in self.kinds
        self.cluster.release_bound = cfg.release_bound
        self.vfs: dict[str, dict[str, Any]] = {}  # name -> vip, device, pseudo, candidates
        self.vip_only: dict[str, str] = {}  # VIP-only VFS: name -> VIP (a /32 outside the lab /24)
        self.vip_scan: ArpScan | None = None
        self.events: list[dict[str, Any]] = []
        self.status_errors: dict[str, int] = {}
        self.status_failures = 0
        self._deck: list[str] = []
        self.mounts: MountSampler | None = None
        self.etcd_snapshot: Path | None = None
        self.etcd_snapshot_revision: int | None = None
        self.agent_started: dict[str, float] = {}  # node -> monotonic start of its current agent
        self.agent_restarts: list[dict[str, Any]] = []  # agents found dead and started again
        self.malformed: list[dict[str, Any]] = []
        # What the fault being injected created, undone in reverse order by its heal (also when
        # the injection fails half-way), and what it reports about itself.
        self._undo: list[tuple[str, Callable[[], object]]] = []
        self._info: dict[str, Any] = {}
        self._observe: Callable[[dict[str, Any]], None] | None = None
        self._hold_more: Callable[[], bool] | None = None  # keep the fault a while longer while True
        self._hold_more_max = 15.0

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
                key = f"{row['vfs']}: {str(row['error'])[:500]}"
                self.status_errors[key] = self.status_errors.get(key, 0) + 1
        if self._observe is not None:
            self._observe(data)
        return data

    def not_serving(self, data: dict[str, Any] | None) -> list[str]:
        """VFS not serving: phase != serving, no owner, or its owner not alive."""
        if data is None:
            return sorted([*self.vfs, *self.vip_only])
        alive = {n["node"] for n in data.get("nodes", []) if n.get("alive")}
        rows = {r["vfs"]: r for r in data.get("vfs", [])}
        bad = []
        for name in [*self.vfs, *self.vip_only]:
            row = rows.get(name) or {}
            if row.get("phase") != "serving" or row.get("owner") not in alive:
                bad.append(name)
        return bad

    def wait_all_serving(self, timeout: float, restart_agents: bool = False) -> tuple[float | None, list[str]]:
        """Seconds until every VFS serves (None on timeout) and what is not serving then. With
        ``restart_agents``, agents that die meanwhile (a reset) are started again."""
        start = time.monotonic()
        bad: list[str] = sorted(self.vfs)
        while time.monotonic() - start < timeout:
            if restart_agents:
                self.restart_dead_agents()
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
            self.agent_started[node] = time.monotonic()

    def restart_dead_agents(self) -> list[str]:
        """Start again every agent that died (not those a fault removed on purpose): a node's
        fence guard may have reset it, which kills everything on it, agent included. Each death
        is classified by the reset records (STATE/resets.jsonl) since that agent started."""
        dead = [n for n in NODE_NAMES if n in self.cluster.agents and not self.cluster.agent_alive(n)]
        if not dead:
            return []
        resets = self.lab.resets()
        for node in dead:
            since = self.agent_started.get(node, 0.0)
            reset = [r for r in resets if r.get("node") == node and float(r.get("t", 0)) >= since - 1.0]
            record: dict[str, Any] = {"node": node, "t": round(time.monotonic(), 3),
                                      "cause": "reset" if reset else "unexpected"}
            if not reset:
                record["log_tail"] = self._log_tail(node)
            self.agent_restarts.append(record)
            self.log(f"agent on {node} died ({record['cause']}); starting it again")
        restarted = self.cluster.ensure_agents(nodes=tuple(dead))
        for node in restarted:
            self.agent_started[node] = time.monotonic()
        return restarted

    def _log_tail(self, node: str, lines: int = 8) -> list[str]:
        try:
            text = self.cluster.agent_log(node).read_text(errors="replace")
        except OSError:
            return []
        return [line[:300] for line in text.splitlines()[-lines:]]

    def next_kind(self) -> str:
        # A shuffled deck: every kind comes once per round, in seeded random order.
        if not self._deck:
            self._deck = list(self.kinds)
            self.rng.shuffle(self._deck)
        return self._deck.pop()

    # --- set-up -------------------------------------------------------------------------------

    def setup(self) -> None:
        c = self.cluster
        c.start_agents(self.cfg.ttl)  # one by one, each registered before the next (under faketime)
        now = time.monotonic()
        self.agent_started = {node: now for node in NODE_NAMES}
        self.mounts = c.mount_sampler(duration=24 * 3600)
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
        if self.cfg.vip_vfs:
            # The NFS VFS first: a hundred VIP takeovers on top of four Ganesha starts, on a 2-core
            # machine under libfaketime, starved the agents' keepalives at set-up (not a fault).
            took, bad = self.wait_all_serving(self.cfg.setup_timeout)
            if took is None:
                raise RuntimeError(f"NFS VFS not serving after set-up: {bad}")
        for i in range(self.cfg.vip_vfs):
            name, vip = f"p{i:03d}", many_vip(i)
            c.put(c.key(name, "spec"), json.dumps({"vip": f"{vip}/32", "candidates": spread_candidates(i)}))
            self.vip_only[name] = vip
        took, bad = self.wait_all_serving(self.cfg.setup_timeout)
        if took is None:
            raise RuntimeError(f"VFS not serving after set-up: {bad}")
        self.log(f"{len(self.vfs)} VFS serving: {self.owners()}")
        if "etcd_snapshot_restore" in self.kinds:
            # What an operator restores after losing etcd: a snapshot taken while all was well.
            self.etcd_snapshot = self.logdir / "etcd-setup.snapshot.db"
            self.etcd_snapshot_revision = self.lab.etcd_snapshot_save(self.etcd_snapshot)
            self.log(f"etcd snapshot at revision {self.etcd_snapshot_revision}: {self.etcd_snapshot}")
        for info in self.vfs.values():
            info["writer"] = c.start_writer(info["vip"], info["pseudo"], duration=24 * 3600,
                                            interval=self.cfg.writer_interval)
            info["sampler"] = c.sampler(info["vip"], duration=24 * 3600)
        if self.vip_only:
            # One raw socket asks for every VIP-only VFS per 50 ms pass: a takeover takes longer than
            # that (an ARP probe alone is 0.27 s), so two MACs in one pass are two claims at once.
            self.vip_scan = ArpScan(self.lab.client_cmd([]), str(c.bindir / "python"), CLIENT_IP,
                                    list(self.vip_only.values()), self.logdir, interval=0.05, duration=24 * 3600)

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
        new_kinds: dict[str, Callable[[float], str]] = {
            "ganesha_ignores_sigterm": self._ganesha_ignores_sigterm,
            "mount_held_open": self._mount_held_open,
            "slow_unmount": self._slow_unmount,
            "agent_starvation": self._agent_starvation,
            "malformed_specs": self._malformed_specs,
            "etcd_snapshot_restore": self._etcd_snapshot_restore,
        }
        if kind in new_kinds:
            return new_kinds[kind](spacing), self.undo_all
        raise ValueError(f"unknown fault kind {kind!r}")

    # --- faults that register their undo steps ------------------------------------------------

    def on_heal(self, what: str, step: Callable[[], object]) -> None:
        """Register an undo step of the fault being injected (run in reverse order at heal)."""
        self._undo.append((what, step))

    def undo_all(self) -> None:
        """Run every registered undo step, newest first, each even if another failed."""
        errors = []
        while self._undo:
            what, step = self._undo.pop()
            try:
                step()
            except Exception as exc:  # the other steps must still run
                errors.append(f"{what}: {exc!r}"[:500])
        if errors:
            raise RuntimeError("; ".join(errors))

    def _stop_pid(self, pid: int) -> None:
        """SIGKILL a process we spawned in the lab, if it still runs (a reset may have killed it)."""
        with contextlib.suppress(LabError):
            self.lab.stop(pid, signal.SIGKILL, timeout=10)

    def _owner_mount(self) -> tuple[str, str, str, str]:
        """(vfs, owner, mount point on the owner, device) of a random VFS mounted on its owner."""
        owners = self.owners()
        names = sorted(owners)
        self.rng.shuffle(names)
        for name in names:
            node, device = owners[name], self.vfs[name]["device"]
            with contextlib.suppress(LabError):
                point = next((p for d, p in self.lab.mounts_of(node) if d == device), None)
                if point:
                    return name, node, point, device
        raise RuntimeError(f"no VFS is mounted on its owner (owners {owners})")

    def _cut_from_etcd(self, node: str) -> None:
        self.on_heal(f"heal {node}", lambda: self.lab.heal(node))
        self.lab.partition_node(node)

    def _hold_until_moved(self, name: str, node: str) -> None:
        """Keep the fault until another node serves ``name``: the point of these faults is that
        the stuck node is forced off the disk (fence guard, reset within T_release) before the
        next owner mounts it, not that the heal frees it first. Bounded by lease expiry +
        T_release + a margin."""
        def not_moved() -> bool:
            row = next((r for r in (self.snapshot() or {}).get("vfs", []) if r.get("vfs") == name), {})
            return not (row.get("phase") == "serving" and row.get("owner") not in (None, node))
        self._hold_more = not_moved
        self._hold_more_max = 3 * self.cfg.ttl + (self.cfg.release_bound or DEFAULT_RELEASE_BOUND) + 15.0

    def _ganesha_ignores_sigterm(self, spacing: float) -> str:
        """The owner's Ganesha servers ignore SIGTERM (SIGSTOPped: a pending SIGTERM does nothing,
        only SIGKILL works) and the owner is cut from etcd, so it self-fences and must stop them."""
        name, node, _, _ = self._owner_mount()
        pids = self.lab.ganesha_pids(node)
        if not pids:
            raise RuntimeError(f"no ganesha.nfsd on {node}")
        for pid in pids:
            self.on_heal(f"SIGCONT {pid}", lambda p=pid: self.lab.agent_sigcont(p))
            self.lab.agent_sigstop(pid)
        self._cut_from_etcd(node)
        self._hold_until_moved(name, node)
        return f"{name} on {node}: ganesha.nfsd {pids} stopped, {node} cut from etcd"

    def _mount_held_open(self, spacing: float) -> str:
        """A process of the owner keeps its cwd and an open directory in the VFS's mount (so a
        plain umount fails with EBUSY), and the owner is cut from etcd."""
        name, node, point, device = self._owner_mount()
        argv = ["sh", "-c", 'cd "$1" && exec sleep "$2" 3<.', "hold-open", point, str(int(spacing) + 600)]
        pid = self.lab.spawn(node, argv, self.logdir / "hold-open.log")
        self.on_heal(f"stop holder {pid}", lambda: self._stop_pid(pid))
        rdev = os.stat(device).st_rdev
        deadline = time.monotonic() + 5
        while not _cwd_on(pid, rdev):
            if time.monotonic() > deadline:
                raise RuntimeError(f"holder {pid} did not get into {point} on {node}")
            time.sleep(0.02)
        self._cut_from_etcd(node)
        self._hold_until_moved(name, node)
        self._info["holder_pid"] = pid
        return f"{name} on {node}: pid {pid} holds {point}, {node} cut from etcd"

    def _slow_unmount(self, spacing: float) -> str:
        """The owner's filesystem is frozen (fsfreeze -f: writes block, the NFS server hangs in
        D state) and the owner is cut from etcd. The freeze stays on that node (FreezeWatch:
        the lab's nodes share one superblock); the heal thaws whatever is still frozen."""
        name, node, point, device = self._owner_mount()
        self.on_heal(f"thaw {device}", lambda: self._info.setdefault("thawed_at_heal", self.lab.thaw_disk(device)))
        watch = self.lab.freeze(node, point)
        assert watch is not None

        def stop_watch() -> None:
            watch.stop()
            self._info["thawed_by_watch"] = watch.thawed
            if watch.error:
                self._info["watch_error"] = watch.error
        self.on_heal("stop the freeze watch", stop_watch)
        self._cut_from_etcd(node)
        self._hold_until_moved(name, node)
        return f"{name} on {node}: {point} frozen, {node} cut from etcd"

    def _agent_starvation(self, spacing: float) -> str:
        """The owner's agent reniced to 19 and pinned to one CPU, with two busy loops at nice -5
        pinned there too, in the node's namespaces (its guard, NFS servers and the rest of the
        lab keep the other CPUs)."""
        node = self.owner_node()
        pid = self.cluster.agents.get(node)
        if pid is None:
            raise RuntimeError(f"no agent on {node}")
        cpu = (os.cpu_count() or 1) - 1
        everything = set(range(os.cpu_count() or 1))
        self.on_heal(f"un-starve agent {pid}", lambda: _set_sched(pid, 0, everything))
        _set_sched(pid, 19, {cpu})
        hogs = []
        for i in range(2):
            argv = ["timeout", str(int(spacing) + 120), "taskset", "-c", str(cpu),
                    "nice", "-n", "-5", "sh", "-c", "while :; do :; done"]
            hog = self.lab.spawn(node, argv, self.logdir / f"hog-{i}.log")
            self.on_heal(f"stop hog {hog}", lambda h=hog: self._stop_pid(h))
            hogs.append(hog)
        return f"{node}: agent {pid} at nice 19 on CPU {cpu} with hogs {hogs} at nice -5"

    def _malformed_specs(self, spacing: float) -> str:
        """Junk specs under new VFS names (and two keys with invalid VFS names), and one over an
        existing VFS's spec, restored at heal. Every junk VFS must show a status error, the
        overwritten VFS keep serving on its last valid spec, and no VFS stop serving."""
        c = self.cluster
        # Only VFS serving now can "stop serving because of it" (an earlier fault may still be
        # recovering when this one starts).
        serving_before = set(self.vfs) - set(self.not_serving(self.snapshot()))
        junk = junk_specs(c.prefix)
        chosen = self.rng.sample(range(len(junk)), min(self.cfg.junk_per_fault, len(junk)))
        fault = len(self.events)
        names: dict[str, str] = {}
        for k, index in enumerate(chosen):
            name = f"junk{fault}-{k}"
            self.on_heal(f"delete {name}", lambda n=name: c.lab.etcdctl("del", "--prefix", f"{c.prefix}/vfs/{n}/"))
            self._put_raw(c.key(name, "spec"), junk[index][1])
            names[name] = junk[index][0]
        for bad in (f"{c.prefix}/vfs/bad name!/spec", f"{c.prefix}/vfs/a/b/spec"):
            self.on_heal(f"delete {bad!r}", lambda k=bad: c.lab.etcdctl("del", k))
            self._put_raw(bad, junk[chosen[0]][1])
        target = self.rng.choice(sorted(self.vfs))
        key = c.key(target, "spec")
        original = self._get_raw(key)
        if original is None:
            raise RuntimeError(f"{key} has no spec to overwrite")
        over = self.rng.randrange(len(junk))
        self.on_heal(f"restore {target}'s spec", lambda: self._put_raw(key, original))
        self._put_raw(key, junk[over][1])
        seen: dict[str, Any] = {"junk": names, "overwritten": target, "overwritten_with": junk[over][0],
                                "errors": {}, "stopped_serving": set(), "serving_before": sorted(serving_before)}

        def observe(data: dict[str, Any]) -> None:
            rows = {r["vfs"]: r for r in data.get("vfs", [])}
            for name in [*names, target]:
                error = (rows.get(name) or {}).get("error")
                if error and name not in seen["errors"]:
                    seen["errors"][name] = str(error)[:300]
            seen["stopped_serving"] |= set(self.not_serving(data)) & serving_before
        self._observe = observe
        # Held until every junk VFS has shown its status error (at most 15 s more).
        self._hold_more = lambda: any(n not in seen["errors"] for n in [*names, target])
        self._info["malformed"] = seen
        self.on_heal("stop observing", lambda: setattr(self, "_observe", None))
        return f"{len(names)} junk VFS ({', '.join(names.values())}); {target} overwritten with {junk[over][0]!r}"

    def _put_raw(self, key: str, value: bytes) -> None:
        # The value goes through stdin: argv cannot carry NUL-free binary of this size (128 KB
        # per argument) and etcdctl reads a missing value from stdin. Except the empty value:
        # etcdctl refuses an empty stdin ("needs 1 argument and input from stdin"), not an empty argument.
        argv = self.lab.client_cmd(etcd.etcdctl_argv(["put", key] + ([""] if not value else [])))
        proc = subprocess.run(argv, input=value, capture_output=True, timeout=60, check=False,
                              env={**os.environ, "ETCDCTL_API": "3"})
        if proc.returncode != 0:
            raise RuntimeError(f"etcdctl put {key} failed: {proc.stderr.decode(errors='replace')[-300:]}")

    def _get_raw(self, key: str) -> bytes | None:
        out = self.lab.etcdctl("get", key, "-w", "json").stdout
        kvs = json.loads(out or "{}").get("kvs") or []
        return base64.b64decode(kvs[0].get("value", "")) if kvs else None

    def _etcd_snapshot_restore(self, spacing: float) -> str:
        """All three members stopped and restored from the snapshot taken at set-up: keys,
        leases and revisions go back. Owners' storage epochs on the disks are now above what
        etcd hands out, so takeovers are refused with `nfs-ha raise-epoch N`; the heal plays
        the operator: it runs that with the highest N shown, until every VFS serves."""
        if self.etcd_snapshot is None:
            raise RuntimeError("no etcd snapshot was taken at set-up")
        leader = self.lab.etcd_snapshot_restore(self.etcd_snapshot)
        self.on_heal("raise the storage epoch", self._raise_epoch_recovery)
        return f"restored to revision {self.etcd_snapshot_revision}; etcd{leader} leads"

    def _raise_epoch_recovery(self) -> None:
        """Watch the status; whenever a refused takeover names a higher N, run `nfs-ha
        raise-epoch N`. Returns once every VFS has served for 2 s after a settle time (the
        restored owners' leases must run out first), or after the recovery timeout."""
        started = time.monotonic()
        settle = started + 3 * self.cfg.ttl + 5
        deadline = started + self.cfg.recovery_timeout
        raised = 0
        serving_since: float | None = None
        runs: list[dict[str, Any]] = self._info.setdefault("raise_epoch", [])
        while time.monotonic() < deadline:
            data = self.snapshot()
            rows = (data or {}).get("vfs", [])
            wanted = max((int(n) for r in rows for n in RAISE_EPOCH.findall(str(r.get("error") or ""))), default=0)
            if wanted > raised:
                proc = self.cluster.cli("raise-epoch", str(wanted))
                runs.append({"n": wanted, "rc": proc.returncode, "after_s": round(time.monotonic() - started, 2),
                             "output": (proc.stdout + proc.stderr).strip()[-300:]})
                self.log(f"nfs-ha raise-epoch {wanted}: exit {proc.returncode}")
                if proc.returncode == 0:
                    raised = wanted
            now = time.monotonic()
            if data is not None and not self.not_serving(data):
                serving_since = serving_since or now
                if now >= settle and now - serving_since >= 2.0:
                    return
            else:
                serving_since = None
            time.sleep(0.3)

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
            self.restart_dead_agents()
            t0 = time.monotonic()
            event: dict[str, Any] = {"i": i, "kind": kind, "spacing_s": spacing, "t": round(t0, 3)}
            self._undo, self._info, self._hold_more, self._hold_more_max = [], {}, None, 15.0
            try:
                target, heal = self.inject(kind, spacing)
            except Exception as exc:  # record, undo what it did, and go on
                event.update(target=None, inject_error=repr(exc))
                try:
                    self.undo_all()
                except Exception as undo_exc:
                    event["heal_error"] = repr(undo_exc)
                self._observe = None
                event["t_end"] = round(time.monotonic(), 3)
                self.events.append(event)
                self.log(f"fault {i} {kind}: injection failed: {exc!r}")
                self.wait_all_serving(self.cfg.recovery_timeout, restart_agents=True)
                continue
            event["target"] = target
            self.log(f"fault {i} {kind} on {target}; holding {spacing}s")
            event["not_serving_during"] = sorted(set(self.not_serving(self.snapshot())))
            t_held = time.monotonic()
            self.hold(spacing)
            more_until = time.monotonic() + self._hold_more_max
            while self._hold_more is not None and self._hold_more() and time.monotonic() < more_until:
                self.hold(0.5)
            self._hold_more = None
            event["held_s"] = round(time.monotonic() - t_held, 2)
            t_heal = time.monotonic()
            try:
                heal()
            except Exception as exc:
                event["heal_error"] = repr(exc)
                self.log(f"fault {i} {kind}: heal failed: {exc!r}")
            if self._undo:  # an old-style heal of a kind that also registered undo steps
                try:
                    self.undo_all()
                except Exception as exc:
                    event["heal_error"] = repr(exc)
            self._observe = None
            self._record_info(event)
            took, bad = self.wait_all_serving(self.cfg.recovery_timeout, restart_agents=True)
            event["recovery_s"] = None if took is None else round(time.monotonic() - t_heal, 3)
            event["from_fault_s"] = None if took is None else round(time.monotonic() - t0, 3)
            event["not_serving_after"] = bad
            event["t_end"] = round(time.monotonic(), 3)
            self.events.append(event)
            self.log(f"fault {i} {kind}: " + (f"all serving {event['recovery_s']}s after heal" if took is not None
                                              else f"NOT serving after {self.cfg.recovery_timeout}s: {bad}"))

    def _record_info(self, event: dict[str, Any]) -> None:
        info = dict(self._info)
        seen = info.pop("malformed", None)
        if seen is not None:
            junk = dict(seen["junk"])
            result = {
                "junk": junk,
                "without_status_error": sorted(n for n in junk if n not in seen["errors"]),
                "overwritten": seen["overwritten"],
                "overwritten_with": seen["overwritten_with"],
                "overwritten_error": seen["errors"].get(seen["overwritten"]),
                "stopped_serving": sorted(seen["stopped_serving"]),
                "serving_before": seen["serving_before"],
                "errors": seen["errors"],
            }
            self.malformed.append(result)
            info["malformed"] = result
        event.update(info)

    def finish(self) -> dict[str, Any]:
        """Heal everything, then check the promises: ARP samples, and every acknowledged write,
        read back through its VIP (all of them, or a sample of ``nfs_read_max`` per VFS) and
        then checked on its disk after the agents released every VFS (labkit.diskcheck)."""
        self.lab.heal()
        self.lab.thaw_disk()  # nothing should be frozen any more; never leave it so
        self.restart_dead_agents()
        for node in NODE_NAMES:
            self.ensure_agent(node)
        _, bad_end = self.wait_all_serving(self.cfg.recovery_timeout, restart_agents=True)
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
        mounts = self.mount_report()
        self.check_disks(acked, lost, writes)
        for name, names in lost.items():
            writes["missing_or_wrong"] += len(names)
            if names:
                writes["missing_names"][name] = sorted(names)[:20]
        return {"writes": writes, "arp": arp, "mounts": mounts, "not_serving_at_end": bad_end}

    def mount_report(self) -> dict[str, Any]:
        """The dual-mount sampler's summary; a sampler that died early counts as not sampled."""
        if self.mounts is None:
            return {"samples": 0, "dual_mount_samples": 0, "error": "no mount sampler"}
        died = not self.mounts.alive()
        summary = self.mounts.stop()
        if died:
            summary["error"] = "the mount sampler exited before the end of the run"
        # Which fault each dual-mount sample belongs to: from its injection to its recovery.
        duals = [r for r in self.mounts.records() if r.get("dual")]
        by_kind: dict[str, int] = {}
        for event in self.events:
            start, end = event.get("t", 0.0), event.get("t_end", 0.0)
            n = sum(int(r["n"]) for r in duals if start <= r["t0"] <= end)
            if n:
                event["dual_mount_samples"] = n
                by_kind[event["kind"]] = by_kind.get(event["kind"], 0) + n
        summary["dual_by_kind"] = by_kind
        return summary

    def arp_report(self) -> dict[str, Any]:
        arp: dict[str, Any] = {"samples": 0, "double_mac_samples": 0, "per_vip": {}}
        for name, info in self.vfs.items():
            samples = info["sampler"].stop()
            doubles = [s for s in samples if len(set(s.get("macs", []))) > 1]
            arp["samples"] += len(samples)
            arp["double_mac_samples"] += len(doubles)
            arp["per_vip"][info["vip"]] = {"vfs": name, "samples": len(samples), "double_mac": len(doubles),
                                           "first_double": doubles[0] if doubles else None}
        if self.vip_scan is not None:
            passes = self.vip_scan.stop()
            dual = [(p["t"], ip, macs) for p in passes for ip, macs in p["a"].items() if len(set(macs)) > 1]
            answered = sum(len(p["a"]) for p in passes)
            arp["vip_only"] = {"vfs": len(self.vip_only), "passes": len(passes), "answers": answered,
                               "double_mac_samples": len(dual), "first_doubles": dual[:5]}
            arp["samples"] += answered
            arp["double_mac_samples"] += len(dual)
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


def _cwd_on(pid: int, device: int) -> bool:
    """True once ``pid``'s working directory lies on the filesystem of ``device`` (st_rdev)."""
    try:
        return os.stat(f"/proc/{pid}/cwd").st_dev == device
    except OSError:
        return False


def _set_sched(pid: int, nice: int, cpus: set[int]) -> None:
    """Nice value and CPU affinity of every thread of ``pid`` (both are per thread on Linux; new
    threads inherit them from the thread that creates them). A process already gone is fine."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            os.sched_setaffinity(tid, cpus)


def summarize(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def run(cfg: ChaosConfig) -> dict[str, Any]:
    """Build the lab, run the chaos, tear everything down; the report (see docs/lab.md)."""
    started = time.monotonic()
    logdir = Path(cfg.logdir) if cfg.logdir else Path(f"/tmp/nfsha-chaos-{cfg.seed}-{int(time.time())}")
    logdir.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    unknown = sorted(set(cfg.kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    skipped = unsupported_kinds(bindir, cfg.kinds) if cfg.skip_unsupported else {}
    kinds = tuple(k for k in cfg.kinds if k not in skipped)
    if not kinds:
        raise ValueError(f"no fault kind left to run (skipped: {skipped})")
    for kind, why in skipped.items():
        cfg.log(f"[chaos] skipping {kind}: {why}")
    wait_lab_free(cfg.wait_free_timeout, cfg.log)
    lab = Lab(state_dir=cfg.state_dir)
    chaos: Chaos | None = None
    report: dict[str, Any] = {"seed": cfg.seed, "faults_requested": cfg.faults, "vfs": cfg.vfs,
                              "ttl": cfg.ttl, "logdir": str(logdir), "kinds": list(kinds), "kinds_skipped": skipped}
    try:
        lab.up()
        chaos = Chaos(cfg, lab, logdir, kinds)
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
            if chaos.mounts is not None:
                report["mounts"] = chaos.mounts.summary()
    finally:
        try:
            if chaos is not None:
                with contextlib.suppress(Exception):
                    chaos.undo_all()  # a fault interrupted half-way
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
    mounts = end["mounts"]
    resets = chaos.lab.resets()
    unexpected = [r for r in chaos.agent_restarts if r["cause"] == "unexpected"]
    malformed = {
        "faults": len(chaos.malformed),
        "junk_written": sum(len(m["junk"]) for m in chaos.malformed),
        "junk_without_status_error": [n for m in chaos.malformed for n in m["without_status_error"]],
        "overwritten_without_status_error": [m["overwritten"] for m in chaos.malformed if not m["overwritten_error"]],
        "stopped_serving": sorted({n for m in chaos.malformed for n in m["stopped_serving"]}),
    }
    mounts_ok = mounts.get("samples", 0) > 0 and mounts.get("dual_mount_samples") == 0 and not mounts.get("error")
    ok = (end["arp"]["double_mac_samples"] == 0 and end["writes"]["missing_or_wrong"] == 0 and serving_at_end
          and not end["writes"].get("disk_check_errors") and mounts_ok and not unexpected
          and not malformed["junk_without_status_error"] and not malformed["overwritten_without_status_error"]
          and not malformed["stopped_serving"])
    return {
        "ok": ok,
        "faults_injected": len(injected),
        "faults_by_kind": faults_by_kind,
        "distinct_kinds": len(faults_by_kind),
        "arp": end["arp"],
        "dual_mount_samples": mounts.get("dual_mount_samples"),
        "mounts": mounts,
        "writes": end["writes"],
        "resets": {"count": len(resets), "by_node": {n: sum(1 for r in resets if r.get("node") == n)
                                                     for n in NODE_NAMES},
                   "records": resets[:50]},
        "agent_restarts": {"after_reset": sum(1 for r in chaos.agent_restarts if r["cause"] == "reset"),
                           "unexpected": unexpected},
        "malformed_specs": malformed,
        "etcd_snapshot_revision": chaos.etcd_snapshot_revision,
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
    parser.add_argument("--kinds", help=f"comma-separated fault kinds (default all: {','.join(FAULT_KINDS)})")
    parser.add_argument("--strict-kinds", action="store_true",
                        help="fail instead of skipping kinds this nfs-ha cannot take yet (see kinds_skipped)")
    parser.add_argument("--release-bound", type=float, help="the agents' --release-bound (default: theirs)")
    parser.add_argument("--vip-vfs", type=int, default=0,
                        help="VIP-only VFS besides the NFS ones, all ARP-sampled for two MACs at once")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip()) if args.kinds else FAULT_KINDS
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    if args.strict_kinds:
        missing = unsupported_kinds(Path(sys.executable).parent, kinds)
        if missing:
            parser.error(f"this nfs-ha cannot take: {missing}")
    cfg = ChaosConfig(faults=args.faults, seed=args.seed, vfs=max(1, args.vfs), ttl=args.ttl,
                      spacing=(args.spacing[0], args.spacing[1]), recovery_timeout=args.recovery_timeout,
                      nfs_read_max=max(1, args.nfs_read_max), logdir=Path(args.logdir) if args.logdir else None,
                      kinds=kinds, release_bound=args.release_bound, vip_vfs=max(0, args.vip_vfs))
    report = run(cfg)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report.get("ok") else 1
