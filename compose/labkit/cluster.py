"""Driving nfs-ha in the lab: agents on nodes, specs and intents in etcd, and what a
client sees on the wire. Shared by the tests, the benchmark and the demo.

Each LabCluster uses its own key prefix and its own VIPs, so several can run one after
another on one lab without seeing each other's leftovers.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import mountsampler, nfsclient, procs
from .errors import LabError
from .jsonl import read_json_lines
from .lab import Lab
from .topology import NODES

CLIENT_IP = "10.77.0.50"
COMPOSE_DIR = Path(__file__).resolve().parents[1]  # on PYTHONPATH for `python -m labkit.nfswriter`
LAB_SCRIPT = COMPOSE_DIR / "lab"
NODE_NAMES = tuple(NODES)
_vips = itertools.count(100)
_prefixes = itertools.count(1)


def many_vip(i: int) -> str:
    """The i-th of up to 1000 VIP-only addresses (/32s in 10.77.100.0/22: a lab /24 has too few
    free ones; a /32 fits any interface and answers ARP the same way)."""
    return f"10.77.{100 + i // 250}.{i % 250 + 1}"


def spread_candidates(i: int) -> list[str]:
    """First candidate by i mod 3; the second alternates between the other two (by i // 3), so a
    node's VFS are spread over both survivors when it dies, as an admin would set them up."""
    first = NODE_NAMES[i % 3]
    others = [n for n in NODE_NAMES if n != first]
    return [first, *(others if (i // 3) % 2 == 0 else others[::-1])]


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


class MountSampler:
    """The dual-mount sampler (labkit.mountsampler) in the root namespaces: which lab nodes mount
    or hold each lab disk, every ~20 ms. Our child; stopped by PID."""

    def __init__(self, lab: Lab, bindir: Path, path: Path, duration: float, interval: float = 0.02) -> None:
        self.path = path
        argv = [str(bindir / "python"), "-m", "labkit.mountsampler", "--state-dir", str(lab.state_dir),
                "--out", str(path), "--interval", str(interval), "--duration", str(duration)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(COMPOSE_DIR),
                                                                         os.environ.get("PYTHONPATH")]))}
        with open(path.with_suffix(".err"), "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env, cwd=COMPOSE_DIR)

    def records(self) -> list[dict[str, Any]]:
        return read_json_lines(self.path)

    def summary(self) -> dict[str, Any]:
        """samples, dual_mount_samples, blind_samples, first_dual, ... (labkit.mountsampler.summarize)."""
        return mountsampler.summarize(self.records())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict[str, Any]:
        """SIGTERM (it writes its last run and a stop record), then the summary."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.summary()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@functools.cache
def _help_text(program: str) -> str:
    try:
        proc = subprocess.run([program, "--help"], capture_output=True, text=True, timeout=60, check=False)
    except OSError:
        return ""
    return proc.stdout + proc.stderr


def agent_supports(bindir: Path, option: str) -> bool:
    """True if this nfs-ha-agent knows ``option`` (e.g. "--reset-command"); read from --help."""
    return option in _help_text(str(bindir / "nfs-ha-agent"))


def cli_supports(bindir: Path, command: str) -> bool:
    """True if this nfs-ha CLI has the sub-command ``command`` (e.g. "raise-epoch")."""
    return command in _help_text(str(bindir / "nfs-ha"))


class Writer:
    """A `labkit.nfswriter` loop running in the client namespace (started by start_writer)."""

    def __init__(self, lab: Lab, pid: int, log: Path, attempt_timeout: float) -> None:
        self.lab = lab
        self.pid = pid
        self.log = log
        self.attempt_timeout = attempt_timeout

    def records(self) -> list[dict[str, Any]]:
        """Log so far: acknowledged writes have "name", failed attempts "failed" (see nfswriter)."""
        return read_json_lines(self.log)

    def acked(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if "name" in r]

    def stop(self) -> list[dict[str, Any]]:
        """SIGTERM; it finishes the write in flight (logging its outcome) and exits. Returns
        every log record: filter on "name" (acknowledged) or "failed"."""
        if self.pid:
            self.lab.stop(self.pid, signal.SIGTERM, timeout=self.attempt_timeout + 5)
            self.pid = 0
        return self.records()

    def kill(self) -> None:
        if self.pid:
            self.lab.stop(self.pid, signal.SIGKILL, timeout=5)
            self.pid = 0


class LabCluster:
    """One run's view of the lab: its prefix, its agents, its VIPs, its samplers."""

    def __init__(self, lab: Lab, logdir: Path, bindir: Path | None = None) -> None:
        self.lab = lab
        self.logdir = logdir
        self.bindir = bindir or Path(sys.executable).parent
        self.prefix = f"/nfs-ha-lab/{os.getpid()}-{next(_prefixes)}"
        self.agents: dict[str, int] = {}
        self.agent_env: dict[str, str] = {}  # e.g. OTEL_EXPORTER_OTLP_ENDPOINT for every agent
        self.span_dir: Path | None = None  # agents append their spans to span_dir/spans-<node>.jsonl
        self.vips: list[str] = []
        self.samplers: list[Sampler] = []
        self.writers: list[Writer] = []
        self.disks: list[str] = []  # devices (from lab.create_disk) that cleanup destroys
        self.faketime = False  # True: every agent starts under libfaketime (see Lab.clock_jump)
        self.mount_samplers: list[MountSampler] = []
        # Give every agent `compose/lab reset NODE` as its --reset-command (the guard's last
        # escalation: power-cycle this node). None: whenever the agent has that option.
        self.reset_command: bool | None = None
        self.release_bound: float | None = None  # --release-bound for every agent (None: its default)
        self.agent_ttl: dict[str, int] = {}  # the TTL each node's agent was last started with
        # Another etcd than the lab's plain one (e.g. TLS with auth, tests/lab/test_etcd_security.py):
        # options the agent of a node gets (a --config file, --etcd), the CLI's etcd options, and
        # etcdctl's flags and endpoints for put/get/delete.
        self.agent_args: Callable[[str], list[str]] | None = None
        self.cli_etcd: list[str] = []
        self.etcdctl_flags: list[str] = []
        self.etcdctl_endpoints: list[str] | None = None

    # --- agents ---------------------------------------------------------------------------

    def new_vip(self) -> str:
        host = next(_vips)
        if host > 250:
            raise RuntimeError("out of lab VIPs")
        vip = f"10.77.0.{host}"
        self.vips.append(vip)
        return vip

    def start_agent(self, node: str, ttl: int = 2, extra: tuple[str, ...] = (), *,
                    faketime: bool | None = None) -> int:
        """Start nfs-ha-agent on ``node``. ``faketime`` (default: self.faketime) runs it under
        libfaketime, so lab.clock_jump(node, s) moves its wall clock."""
        argv = [str(self.bindir / "nfs-ha-agent"), "--name", node, "--etcd", self.lab.etcd_endpoints_arg,
                "--interface", "eth0", "--lease-ttl", str(ttl), "--prefix", self.prefix,
                "--state-dir", "/run/nfs-ha", "--rank-delay", "0.3", "--log-level", "DEBUG"]
        if self.uses_reset_command() and "--reset-command" not in extra:
            argv += ["--reset-command", json.dumps(self.reset_argv(node))]
        if self.release_bound is not None and "--release-bound" not in extra:
            argv += ["--release-bound", str(self.release_bound)]
        if self.agent_args is not None:
            argv += self.agent_args(node)
        argv += list(extra)
        # Never the default (/var/log/nfs-ha on the host, shared by every lab node): this run's directory,
        # unless the caller chose (e.g. --span-file=off).
        if not any(a == "--span-file" or a.startswith("--span-file=") for a in argv):
            span_dir = self.span_dir if self.span_dir is not None else self.logdir
            argv += ["--span-file", str(span_dir / f"spans-{node}.jsonl")]
        # All lab nodes share one kernel: a disk another node has taken over is "in use" to this node's
        # O_EXCL release check too (node/storage.py); never set on a real node.
        env = {"NFS_HA_LAB_SHARED_KERNEL": "1", **self.agent_env}
        if self.faketime if faketime is None else faketime:
            env.update(self.lab.faketime_env(node))
        pid = self.lab.spawn(node, argv, self.agent_log(node), env=env or None)
        self.agents[node] = pid
        self.agent_ttl[node] = ttl
        return pid

    def uses_reset_command(self) -> bool:
        if self.reset_command is None:
            return agent_supports(self.bindir, "--reset-command")
        return self.reset_command

    def reset_argv(self, node: str) -> list[str]:
        """`compose/lab --state-dir STATE reset NODE`, run from the root namespaces: the fence
        guard runs it inside the node (its network and mount namespace), where neither the
        lab's namespace pins nor the other nodes are visible, so it first enters the network and
        mount namespace of this process (which runs the lab, in the root namespaces)."""
        nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
        return [nsenter, "-t", str(os.getpid()), "-n", "-m", "--", str(self.bindir / "python"), str(LAB_SCRIPT),
                "--state-dir", str(self.lab.state_dir), "reset", node]

    def agent_alive(self, node: str) -> bool:
        """True while the agent we started on ``node`` runs (a reset or crash kills it)."""
        pid = self.agents.get(node)
        return pid is not None and procs.is_alive(pid)

    def ensure_agents(self, ttl: int | None = None, nodes: tuple[str, ...] = NODE_NAMES) -> list[str]:
        """Start the agent again on every node whose agent died (e.g. a reset by its fence guard),
        as a rebooted machine's init would; the nodes restarted. Nodes without an agent we
        started (never started, or stopped on purpose) are left alone unless listed in ``nodes``
        and ``ttl`` is given."""
        restarted = []
        for node in nodes:
            pid = self.agents.get(node)
            if pid is not None and procs.is_alive(pid):
                continue
            if pid is None and ttl is None:
                continue
            if pid is not None:
                self.agents.pop(node)
                with contextlib.suppress(LabError):
                    self.lab.stop(pid, signal.SIGKILL, timeout=5)  # reaps our child, forgets its record
            self.start_agent(node, ttl if ttl is not None else self.agent_ttl.get(node, 2))
            restarted.append(node)
        return restarted

    def agent_log(self, node: str) -> Path:
        return self.logdir / f"agent-{node}.log"

    def start_agents(self, ttl: int = 2, nodes: tuple[str, ...] = NODE_NAMES, extra: tuple[str, ...] = ()) -> None:
        """Start agents one by one, each registered before the next starts (a fixed order)."""
        for node in nodes:
            self.start_agent(node, ttl, extra)
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
        self.lab.etcdctl(*self.etcdctl_flags, "put", key, value, endpoints=self.etcdctl_endpoints)

    def put_spec(self, vfs: str, vip: str, candidates: tuple[str, ...] | list[str] = NODE_NAMES,
                 **extra: Any) -> None:
        self.put(self.key(vfs, "spec"), json.dumps({"vip": f"{vip}/24", "candidates": list(candidates), **extra}))

    def put_intent(self, vfs: str, node: str) -> None:
        self.put(self.key(vfs, "intent"), node)

    def delete(self, key: str) -> None:
        self.lab.etcdctl(*self.etcdctl_flags, "del", key, endpoints=self.etcdctl_endpoints)

    def get_json(self, key: str) -> dict[str, Any] | None:
        out = self.lab.etcdctl(*self.etcdctl_flags, "get", key, "--print-value-only",
                               endpoints=self.etcdctl_endpoints).stdout.strip()
        return json.loads(out) if out else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / "nfs-ha"), "--etcd", self.lab.etcd_endpoints_arg, *self.cli_etcd,
                "--prefix", self.prefix, *args]
        return subprocess.run(self.lab.client_cmd(argv), capture_output=True, text=True, timeout=30)

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        # 1 and 2 also say DEGRADED and FAILING, with the status on stdout; no output: it failed.
        if proc.returncode not in (0, 1, 2) or not proc.stdout.strip():
            raise RuntimeError(f"nfs-ha status failed ({proc.returncode}): {proc.stderr}")
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
            # A lost owner's status still says "serving" until the next owner writes: require
            # the owner key too.
            ok = row.get("phase") == "serving" and row.get("owner") is not None \
                and (node is None or row.get("owner") == node) \
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

    def mount_sampler(self, duration: float = 600, interval: float = 0.02) -> MountSampler:
        """Start the dual-mount sampler (every lab disk, every node, every ~20 ms)."""
        path = self.logdir / f"mounts-{len(self.mount_samplers)}.jsonl"
        sampler = MountSampler(self.lab, self.bindir, path, duration, interval)
        self.mount_samplers.append(sampler)
        return sampler

    # --- NFS as the client sees it (libnfs tools in the client namespace) --------------------

    def nfs_write(self, vip: str, pseudo: str, name: str, data: bytes,
                  timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Create ``name`` (must not exist) in the export ``pseudo`` with nfs-cp. Never raises
        on failure: check .returncode (0 = acknowledged, 124 = timed out) and .stderr (e.g.
        "NFS4ERR_GRACE" during grace). At most nfsclient.MAX_WRITE_BYTES bytes."""
        return nfsclient.write(self.lab.client_cmd([]), vip, pseudo, name, data, self.logdir, timeout)

    def nfs_read(self, vip: str, pseudo: str, name: str, timeout: float = 30) -> nfsclient.ReadResult:
        """nfs-cat: a ReadResult with .ok, .data (bytes, None on failure), .stderr, .t."""
        return nfsclient.read(self.lab.client_cmd([]), vip, pseudo, name, timeout)

    def nfs_ls(self, vip: str, pseudo: str, timeout: float = 30) -> list[str]:
        """Sorted names in the export's top directory; CommandError if nfs-ls fails."""
        return nfsclient.ls(self.lab.client_cmd([]), vip, pseudo, timeout)

    def wait_nfs_read(self, vip: str, pseudo: str, name: str, expect: bytes, timeout: float) -> float:
        """Retry nfs-cat until it returns exactly ``expect``; the monotonic time it did.
        AssertionError (with the last error) after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.nfs_read(vip, pseudo, name, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            if result.data == expect:
                return result.t
            if time.monotonic() >= deadline:
                got = f"{len(result.data)} other bytes" if result.data is not None else result.stderr.strip()[-300:]
                raise AssertionError(f"timed out after {timeout}s reading {name} via {vip}{pseudo}: {got}")
            time.sleep(0.05)

    def start_writer(self, vip: str, pseudo: str, duration: float = 600, interval: float = 0.05,
                     attempt_timeout: float = 5.0) -> Writer:
        """Start labkit.nfswriter in the client namespace; .stop() returns its log records."""
        log = self.logdir / f"writer-{vip}-{len(self.writers)}.jsonl"
        argv = [str(self.bindir / "python"), "-m", "labkit.nfswriter", "--vip", vip, "--pseudo", pseudo,
                "--log", str(log), "--duration", str(duration), "--interval", str(interval),
                "--attempt-timeout", str(attempt_timeout)]
        pid = self.lab.spawn("client", argv, self.logdir / f"writer-{vip}-{len(self.writers)}.out",
                             env={"PYTHONPATH": os.pathsep.join(filter(None, [str(COMPOSE_DIR),
                                                                               os.environ.get("PYTHONPATH")]))})
        writer = Writer(self.lab, pid, log, attempt_timeout)
        self.writers.append(writer)
        return writer

    def verify_writes(self, vip: str, pseudo: str, acked: list[dict[str, Any]], timeout: float = 30,
                      settle: float = 60.0) -> list[str]:
        """Read every acknowledged write back through the VIP; the names missing or with other
        content (sha256). Records without "sha256" (failed attempts, events) are skipped. Reads
        that fail for another reason than a missing file (e.g. grace) are retried for ``settle`` s."""
        return nfsclient.verify(self.lab.client_cmd([]), vip, pseudo, acked, timeout, settle=settle)

    # --- tear-down ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop what this run started (by PID), heal every fault, remove its VIPs and keys."""
        for s in self.samplers:
            s.kill()
        for m in self.mount_samplers:
            m.kill()
        for w in self.writers:
            w.kill()
        for node, pid in list(self.agents.items()):
            try:
                self.lab.stop(pid, signal.SIGKILL, timeout=10)
            except Exception as exc:  # keep cleaning up the rest
                print(f"stopping agent on {node} failed: {exc}", file=sys.stderr)
        self.agents.clear()
        for node in NODE_NAMES:
            # What the agents started (NFS servers) outlives a SIGKILLed agent; only this
            # run's processes live in the node namespaces, so stop them all, by PID.
            for pid in self.lab.pids(node):
                try:
                    self.lab.stop(pid, signal.SIGKILL, timeout=10)
                except Exception as exc:
                    print(f"stopping pid {pid} on {node} failed: {exc}", file=sys.stderr)
        self.lab.heal()
        for node in NODE_NAMES:
            self.lab.revive_node(node)
            for vip in self.vips:
                self.lab.run(node, ["ip", "addr", "del", f"{vip}/24", "dev", "eth0"], check=False)
        self.lab.etcdctl("del", "--prefix", self.prefix + "/", check=False)
        self._destroy_disks()
        for node in NODE_NAMES:
            # Local agent state (raised VIPs, server pid files, mount points) of this run.
            self.lab.run(node, ["rm", "-rf", f"/run/nfs-ha/{node}"], check=False)

    def _destroy_disks(self) -> None:
        names = {dev: name for name, dev in self.lab.disks().items()}
        for device in self.disks:
            if device in names:
                try:
                    note = self.lab.destroy_disk(names[device], force=True)
                except LabError as exc:  # keep cleaning up the rest
                    note = str(exc)
                if note:
                    print(f"cleanup: {note}", file=sys.stderr)
        self.disks.clear()
