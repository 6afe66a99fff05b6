"""The fence guard: a dead man's switch for the VFS this node holds.

The agent's self-fence rule (docs/protocol.md, "Hold") drops a VIP before its lease can expire,
but only while the agent process runs. If the agent is killed (SIGKILL, OOM) or frozen (SIGSTOP,
a hang), the kernel keeps answering ARP for the VIP and Ganesha keeps serving from the shared disk.
The guard is a small separate process, started by the agent (GuardClient below) in its own session,
that knows only what the agent told it over a pipe and acts on its own when the agent goes quiet.

    python -m node.guard --state-dir DIR --interface IFACE [--dry-run]

Messages: newline-delimited JSON objects on stdin, one per line (extra keys are ignored):

    {"op": "hold", "vfs": "home", "vip": "10.77.0.100/24", "deadline": 1234.5,
     "mountpoint": "/run/nfs-ha/node-a/mnt/home" | null, "nfs_pid": 1234 | null, "epoch": 42}
        (re)states a held VFS and its self-fence deadline, an absolute time.monotonic() of the agent
        (CLOCK_MONOTONIC is system-wide, so the guard compares it with its own clock). The agent
        sends it on every keepalive acknowledgement: it is also the heartbeat. The newest hold
        replaces the previous one as is (a new acquire may carry an earlier deadline). `epoch` is
        the holding's epoch (optional; see rule 7).
    {"op": "release", "vfs": "home", "epoch": 42}   the agent released the VFS itself: forget it.
    {"op": "ping"}                     the agent is alive; nothing held changes.
    {"op": "exit"}                     clean agent shutdown: forget everything, exit 0, fence nothing.

A message that does not validate (types, VFS name [a-z0-9][a-z0-9-]{0,62}, VIP an IPv4 interface,
mountpoint absolute) is logged and ignored; it changes nothing.

INVARIANTS (the guard's rules)

1. stdin at EOF or failing (the agent died: the pipe's write end is closed) -> fence EVERY held VFS
   at once, then exit.
2. Monotonic time past a held VFS's deadline with no newer hold for it -> fence that VFS (the agent
   hangs or is stopped). The guard keeps running (the agent may resume and will find its holding
   fenced on its own); a fenced VFS is forgotten until a new hold arrives for it.
3. Fencing a VFS, in this order: (a) remove the VIP from the interface (netlink, never a shell);
   (b) SIGKILL its NFS server, only if the pid is alive AND /proc/PID/cmdline is ganesha.nfsd
   (a reused pid is never killed), and wait (bounded, ~5 s) until it is gone; (c) unmount the
   mountpoint (`umount -- DIR`, retried ~5 s while busy, then `umount -l -- DIR`, recorded as lazy).
   Every action and every failure is recorded; a failure never stops the later steps and is never
   raised.
4. Every fence is appended as one JSON line to <state-dir>/guard-actions.jsonl and fsynced:
   {"time", "vfs", "vip", "mountpoint", "nfs_pid", "reason", "actions", "errors", "dry_run"}.
   read_actions() gives them back (the next agent start logs them and registers them in etcd).
5. Fencing is fast: VIPs come first and wait on nothing else. When several VFS are fenced together,
   all their VIPs are removed before any server is killed or disk unmounted; the slow steps (b, c)
   of a deadline fence run in a worker thread so the main loop keeps reading stdin and watching the
   other deadlines. A new hold for a VFS whose slow steps are still running stops them ("superseded"):
   the agent is alive again and owns that server and mount.
   The unmount's busy-retry loop asks the same question each round: a superseded fence never ends
   with a lazy unmount (that would leave the agent's NFS server on a detached filesystem and the
   mount point an empty directory that a restarted server would export).
6. SIGTERM (or SIGINT) to the guard: someone is tearing the node down -> fence everything held and
   exit, as for EOF (holds already waiting in the pipe are applied first). The guard runs in its own
   session, so terminal noise never reaches it. SIGHUP is ignored. (A SIGTERM in the first ~0.1 s,
   before Python has installed the handler, still kills it without fencing.)

7. Messages about an older holding change nothing: the agent sends holds from its keepalive thread
   and holds/releases from each VFS's thread, so a hold of a holding that just ended can arrive
   after the release of that holding or after the hold of the next one. Per VFS, a hold or release
   whose epoch is below the highest epoch seen, and a hold whose epoch was already released, are
   ignored (logged at debug level). Messages without an epoch (0) are always applied.

--dry-run performs no host action at all but records what it would do ("would remove VIP ..."),
for tests and for trying the guard out on a workstation.

What the guard cannot do: it runs on the same host, so a frozen kernel or a power loss stops it
too (then nothing answers ARP either). A late unmount (after the lease expired and another node
mounted the disk) is still possible if the server or the unmount hangs for longer than the margin;
the record says so, and the operator's fence command remains the remedy for that.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("nfs-ha-guard")

ACTIONS_FILE = "guard-actions.jsonl"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")  # same rule as controller/keyspace.check_name
MAX_LINE = 64 * 1024  # a longer line is garbage, not a message
IDLE_TICK = 1.0  # longest select() wait when nothing is due
KILL_WAIT = 5.0
UMOUNT_WAIT = 5.0
UMOUNT_CMD_TIMEOUT = 5.0
GANESHA = "ganesha.nfsd"
REASON_EXITED = "agent exited"


class BadMessage(ValueError):
    pass


# --- the pure core: what is held, and what is due -----------------------------------------------


@dataclass(frozen=True)
class Held:
    vfs: str
    vip: ipaddress.IPv4Interface
    deadline: float
    mountpoint: str | None
    nfs_pid: int | None
    epoch: int = 0  # the holding's epoch (owner key create_revision); 0: not given


@dataclass(frozen=True)
class Message:
    op: str
    vfs: str | None = None
    held: Held | None = None
    epoch: int = 0


def _number(value: Any, what: str) -> float:
    # bool is an int in Python; a deadline of `true` is a bug on the other side, not 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadMessage(f"{what} must be a finite number, not {value!r}")
    return float(value)


def _vfs_name(value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise BadMessage(f"invalid vfs name {value!r}")
    return value


def _epoch(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadMessage(f"epoch must be a non-negative integer, not {value!r}")
    return value


def validate(raw: Any) -> Message:
    """A decoded JSON value -> a Message, or BadMessage saying why not."""
    if not isinstance(raw, Mapping):
        raise BadMessage("a message must be a JSON object")
    op = raw.get("op")
    if op in ("ping", "exit"):
        return Message(op)
    if op == "release":
        return Message(op, vfs=_vfs_name(raw.get("vfs")), epoch=_epoch(raw.get("epoch")))
    if op != "hold":
        raise BadMessage(f"unknown op {op!r}")
    vfs = _vfs_name(raw.get("vfs"))
    vip_text = raw.get("vip")
    if not isinstance(vip_text, str):
        raise BadMessage(f"vip must be a string, not {vip_text!r}")
    try:
        vip = ipaddress.IPv4Interface(vip_text)
    except ValueError as exc:
        raise BadMessage(f"invalid vip {vip_text!r}: {exc}") from None
    deadline = _number(raw.get("deadline"), "deadline")
    mountpoint = raw.get("mountpoint")
    if mountpoint is not None and (not isinstance(mountpoint, str) or not os.path.isabs(mountpoint)
                                   or "\0" in mountpoint or "\n" in mountpoint):
        raise BadMessage(f"mountpoint must be an absolute path or null, not {mountpoint!r}")
    nfs_pid = raw.get("nfs_pid")
    if nfs_pid is not None and (isinstance(nfs_pid, bool) or not isinstance(nfs_pid, int) or nfs_pid <= 1):
        raise BadMessage(f"nfs_pid must be a pid > 1 or null, not {nfs_pid!r}")
    epoch = _epoch(raw.get("epoch"))
    return Message(op, vfs=vfs, held=Held(vfs, vip, deadline, mountpoint, nfs_pid, epoch), epoch=epoch)


def parse_line(line: bytes | str) -> Message:
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    return validate(raw)


class GuardState:
    """What the agent says it holds. No I/O, no clock of its own: `now` is always passed in."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._generation: dict[str, int] = {}  # bumped by every hold/release; lets a fence see it is stale
        self._newest: dict[str, int] = {}  # highest epoch seen per VFS (rule 7)
        self._released: dict[str, int] = {}  # highest epoch released per VFS
        self._lock = threading.Lock()  # the fence worker reads generations
        self.exit_requested = False
        self.last_heard: float | None = None

    def apply(self, message: Message | Mapping[str, Any], now: float) -> bool:
        """Apply one message (a Message or a decoded JSON object). BadMessage changes nothing;
        False: a stale message (rule 7), ignored."""
        msg = message if isinstance(message, Message) else validate(message)
        with self._lock:
            self.last_heard = now
            if msg.op == "hold":
                assert msg.held is not None
                if self._stale(msg.held.vfs, msg.epoch, hold=True):
                    return False
                self._held[msg.held.vfs] = msg.held
                self._generation[msg.held.vfs] = self._generation.get(msg.held.vfs, 0) + 1
            elif msg.op == "release":
                assert msg.vfs is not None
                if self._stale(msg.vfs, msg.epoch, hold=False):
                    return False
                self._held.pop(msg.vfs, None)
                self._generation[msg.vfs] = self._generation.get(msg.vfs, 0) + 1
            elif msg.op == "exit":
                self._held.clear()
                self.exit_requested = True
        return True

    def _stale(self, vfs: str, epoch: int, hold: bool) -> bool:
        """Rule 7 (called under the lock): a message about an older holding changes nothing."""
        if epoch == 0:
            return False  # a sender that gives no epoch: every message counts
        if epoch < self._newest.get(vfs, 0) or (hold and epoch <= self._released.get(vfs, 0)):
            return True
        self._newest[vfs] = epoch
        if not hold:
            self._released[vfs] = epoch
        return False

    def due(self, now: float) -> list[Held]:
        """Held VFS whose deadline has passed, earliest first (nothing is changed)."""
        with self._lock:
            return sorted((h for h in self._held.values() if now >= h.deadline), key=lambda h: h.deadline)

    def take_due(self, now: float) -> list[Held]:
        """Like due(), and forget them: a fenced VFS is re-armed only by a new hold."""
        with self._lock:
            due = sorted((h for h in self._held.values() if now >= h.deadline), key=lambda h: h.deadline)
            for h in due:
                del self._held[h.vfs]
            return due

    def all_held(self) -> list[Held]:
        with self._lock:
            return sorted(self._held.values(), key=lambda h: h.vfs)

    def take_all(self) -> list[Held]:
        with self._lock:
            held = sorted(self._held.values(), key=lambda h: h.vfs)
            self._held.clear()
            return held

    def next_deadline(self) -> float | None:
        with self._lock:
            return min((h.deadline for h in self._held.values()), default=None)

    def generation(self, vfs: str) -> int:
        with self._lock:
            return self._generation.get(vfs, 0)


# --- the actions layer --------------------------------------------------------------------------


@dataclass(frozen=True)
class Actions:
    """Host actions. Each returns what it did (for the record) and raises on failure."""

    remove_vip: Callable[[ipaddress.IPv4Interface], str]
    kill_server: Callable[[int], str]
    unmount: Callable[[str, Callable[[], bool]], str]  # (mountpoint, give up: a newer hold came)


@dataclass
class FenceJob:
    held: Held
    reason: str
    generation: int
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _attempt(job: FenceJob, what: str, fn: Callable[[], str]) -> None:
    try:
        job.actions.append(fn())
    except Exception as exc:  # a failure is recorded, never raised: the next step must still run
        job.errors.append(f"{what}: {exc}")


class Fencer:
    def __init__(self, actions: Actions, state_dir: Path, dry_run: bool = False) -> None:
        self.actions = actions
        self.path = Path(state_dir) / ACTIONS_FILE
        self.dry_run = dry_run
        self._write_lock = threading.Lock()

    def start(self, helds: Iterable[Held], reason: Callable[[Held], str],
              generation: Callable[[str], int] = lambda _vfs: 0) -> list[FenceJob]:
        """Step (a) for every VFS, before anything slow: clients stop reaching this node first."""
        jobs = [FenceJob(h, reason(h), generation(h.vfs)) for h in helds]
        for job in jobs:
            _attempt(job, "removing VIP", lambda job=job: self.actions.remove_vip(job.held.vip))
        return jobs

    def complete(self, job: FenceJob, superseded: Callable[[FenceJob], bool] = lambda _job: False) -> dict[str, Any]:
        """Steps (b) and (c), then the record."""
        h = job.held
        steps: list[tuple[str, Callable[[], str]]] = []
        if h.nfs_pid is not None:
            steps.append((f"stopping nfs server {h.nfs_pid}", lambda: self.actions.kill_server(h.nfs_pid)))
        if h.mountpoint is not None:
            mountpoint = h.mountpoint
            steps.append((f"unmounting {mountpoint}",
                          lambda: self.actions.unmount(mountpoint, lambda: superseded(job))))
        for what, fn in steps:
            if superseded(job):
                job.actions.append("superseded by a new hold: server and mount left to the agent")
                break
            _attempt(job, what, fn)
        return self.record(job)

    def fence(self, helds: Iterable[Held], reason: Callable[[Held], str],
              superseded: Callable[[FenceJob], bool] = lambda _job: False) -> list[dict[str, Any]]:
        """Fence now, synchronously: all VIPs first, then each VFS's server and mount in parallel."""
        jobs = self.start(helds, reason)
        return self.complete_all(jobs, superseded)

    def complete_all(self, jobs: list[FenceJob],
                     superseded: Callable[[FenceJob], bool] = lambda _job: False) -> list[dict[str, Any]]:
        if len(jobs) <= 1:
            return [self.complete(job, superseded) for job in jobs]
        # One thread per VFS: a hung unmount of one disk must not delay killing another's server.
        records: list[dict[str, Any] | None] = [None] * len(jobs)

        def run(i: int) -> None:
            records[i] = self.complete(jobs[i], superseded)

        threads = [threading.Thread(target=run, args=(i,), name=f"fence-{j.held.vfs}") for i, j in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in records if r is not None]

    def record(self, job: FenceJob) -> dict[str, Any]:
        h = job.held
        rec = {"time": wall_clock(), "vfs": h.vfs, "vip": h.vip.with_prefixlen, "mountpoint": h.mountpoint,
               "nfs_pid": h.nfs_pid, "reason": job.reason, "actions": job.actions, "errors": job.errors,
               "dry_run": self.dry_run}
        log.warning("fenced %s (%s): %s%s", h.vfs, job.reason, "; ".join(job.actions),
                    f"; errors: {'; '.join(job.errors)}" if job.errors else "")
        try:
            self._append(rec)
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc)
        return rec

    def _append(self, rec: dict[str, Any]) -> None:
        with self._write_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if new:  # the file's directory entry must survive a crash too
                dir_fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)


def read_actions(state_dir: Path | str) -> list[dict[str, Any]]:
    """Every fence record the guard wrote under state_dir, oldest first (a torn last line is skipped)."""
    try:
        lines = (Path(state_dir) / ACTIONS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def wall_clock() -> str:
    # Wall clock only for humans reading the record; no decision uses it.
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


# --- real and dry-run actions -------------------------------------------------------------------


def _gone(pid: int) -> bool:
    # A zombie has already closed its files, so it no longer keeps the mount busy.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_nfs_server(pid: int, wait: float = KILL_WAIT) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"nfs server {pid} already gone"
    if _gone(pid):
        return f"nfs server {pid} already gone"
    if GANESHA not in os.path.basename(argv[0].decode(errors="replace")):
        # The pid was reused by something else: never kill it.
        return f"pid {pid} is not {GANESHA} any more; not killed"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return f"nfs server {pid} already gone"
    end = time.monotonic() + wait
    while not _gone(pid):
        if time.monotonic() > end:
            raise RuntimeError(f"nfs server {pid} still there {wait:.0f}s after SIGKILL")
        time.sleep(0.01)
    return f"nfs server {pid} killed"


def _umount(argv: list[str]) -> str | None:
    """None on success, else the error text."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=UMOUNT_CMD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        return f"no answer after {UMOUNT_CMD_TIMEOUT:.0f}s"
    except OSError as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout).strip()[-300:]


def unmount_path(mountpoint: str, superseded: Callable[[], bool] = lambda: False, wait: float = UMOUNT_WAIT) -> str:
    """Unmount, retrying while busy; then lazily. Gives up as soon as ``superseded()``: the agent
    is alive again and uses this mount (a lazy unmount would leave its NFS server on the
    detached filesystem and the mount point empty)."""
    from node.storage import mounted_at

    target = Path(mountpoint)
    end = time.monotonic() + wait
    last = ""
    attempt = 0
    while True:
        if mounted_at(target) is None:
            return "unmounted" if attempt else "not mounted"
        err = _umount(["umount", "--", mountpoint])
        attempt += 1
        if err is None and mounted_at(target) is None:
            return "unmounted"
        last = err or "still mounted"
        if superseded():
            return f"superseded by a new hold while busy ({last}): mount left to the agent"
        if time.monotonic() > end:
            break
        time.sleep(min(0.1 * attempt, 0.5))  # "target is busy" clears once the server's files are closed
    if superseded():
        return f"superseded by a new hold while busy ({last}): mount left to the agent"
    err = _umount(["umount", "-l", "--", mountpoint])
    if err is None:
        return f"unmounted lazily (umount -l) after: {last}"
    raise RuntimeError(f"umount failed ({last}); umount -l failed too ({err})")


def host_actions(interface: str) -> Actions:
    from node.vip import VipInterface  # pyroute2 only where the host is really touched

    iface = VipInterface(interface)  # fails at start-up, not at fence time, if the interface is wrong

    def remove_vip(vip: ipaddress.IPv4Interface) -> str:
        present = iface.has(vip)
        iface.remove(vip)
        return f"vip {vip.with_prefixlen} removed from {interface}" if present else f"vip {vip.ip} not present"

    return Actions(remove_vip=remove_vip, kill_server=kill_nfs_server, unmount=unmount_path)


def dry_run_actions(interface: str) -> Actions:
    return Actions(remove_vip=lambda vip: f"would remove VIP {vip.with_prefixlen} from {interface}",
                   kill_server=lambda pid: f"would kill nfs server {pid}",
                   unmount=lambda mp, _superseded: f"would unmount {mp}")


# --- the process --------------------------------------------------------------------------------


class Guard:
    """The main loop: select() on stdin (and a signal wake-up pipe) with a timeout to the next deadline."""

    def __init__(self, state: GuardState, fencer: Fencer, stdin_fd: int,
                 clock: Callable[[], float] = time.monotonic, terminated: list[str] | None = None) -> None:
        self.state = state
        self.fencer = fencer
        self.fd = stdin_fd
        self.clock = clock
        self.terminated: list[str] = terminated if terminated is not None else []  # appended by signal handlers
        self._buf = b""
        self._workers: list[threading.Thread] = []

    def _superseded(self, job: FenceJob) -> bool:
        return self.state.generation(job.held.vfs) != job.generation

    def fence_due(self) -> None:
        now = self.clock()
        due = self.state.take_due(now)
        if not due:
            return
        jobs = self.fencer.start(due, lambda h: f"deadline passed by {now - h.deadline:.3f} s",
                                 self.state.generation)
        worker = threading.Thread(target=self.fencer.complete_all, args=(jobs, self._superseded),
                                  name="fence-worker", daemon=True)
        worker.start()
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]

    def fence_everything(self, reason: str) -> None:
        jobs = self.fencer.start(self.state.take_all(), lambda _h: reason)
        self.fencer.complete_all(jobs)
        self.join_workers()

    def join_workers(self) -> None:
        for w in self._workers:
            w.join()

    def feed(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            log.error("dropping %d bytes without a newline", len(self._buf))
            self._buf = b""
        for line in lines:
            if not line.strip():
                continue
            try:
                msg = parse_line(line)
                if not self.state.apply(msg, self.clock()):
                    log.debug("ignoring %s of %s epoch %d: about an older holding", msg.op, msg.vfs, msg.epoch)
            except BadMessage as exc:
                log.error("ignoring bad message %r: %s", line[:200], exc)
            if self.state.exit_requested:
                return

    def drain(self) -> None:
        """Apply whatever is already readable on stdin, without waiting."""
        with contextlib.suppress(OSError):
            while select.select([self.fd], [], [], 0)[0]:
                data = os.read(self.fd, 65536)
                if not data:
                    return
                self.feed(data)

    def run(self, wake_fd: int | None = None) -> int:
        while True:
            self.fence_due()
            nxt = self.state.next_deadline()
            timeout = IDLE_TICK if nxt is None else min(IDLE_TICK, max(0.0, nxt - self.clock()))
            fds = [self.fd] + ([wake_fd] if wake_fd is not None else [])
            try:
                readable, _, _ = select.select(fds, [], [], timeout)
            except OSError as exc:
                log.error("select on stdin failed: %s; treating the agent as dead", exc)
                readable = [self.fd]
                self._buf = b""
            if wake_fd is not None and wake_fd in readable:
                with contextlib.suppress(OSError):
                    os.read(wake_fd, 512)
            if self.terminated:
                self.drain()  # holds already in the pipe count: the agent sent them
                self.fence_everything(self.terminated[0])
                return 0
            if self.fd not in readable:
                continue
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.error("reading stdin failed: %s", exc)
                data = b""
            if not data:  # the agent is gone: nobody will ever renew these deadlines
                self.fence_everything(REASON_EXITED)
                return 0
            self.feed(data)
            if self.state.exit_requested:
                log.info("clean exit requested by the agent")
                self.join_workers()
                return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.guard", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--dry-run", action="store_true", help="record what would be done, touch nothing")
    args = parser.parse_args(argv)
    # Signals only set a flag; the wake-up pipe makes select() return so the loop fences at once.
    # Installed first thing, so a SIGTERM during start-up still fences what is already in the pipe.
    terminated: list[str] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)

    def on_signal(signum: int, _frame: object) -> None:
        terminated.append(f"guard stopped by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s nfs-ha-guard[%(process)d] %(levelname)s %(message)s")
    args.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        actions = dry_run_actions(args.interface) if args.dry_run else host_actions(args.interface)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 2
    guard = Guard(GuardState(), Fencer(actions, args.state_dir, args.dry_run), sys.stdin.fileno(),
                  terminated=terminated)

    log.info("guarding (state dir %s, interface %s%s)", args.state_dir, args.interface,
             ", dry run" if args.dry_run else "")
    return guard.run(wake_r)


# --- the agent's side ---------------------------------------------------------------------------


class GuardClient:
    """Starts the guard and talks to it. Writes never block the agent: the pipe is non-blocking,
    and a message that does not fit is dropped (the next hold restates everything) and makes
    alive() False until a write succeeds again. Safe to call from several threads."""

    def __init__(self, state_dir: Path | str, interface: str, dry_run: bool = False,
                 stderr: int | None = None, python: str = sys.executable) -> None:
        argv = [python, "-m", "node.guard", "--state-dir", str(state_dir), "--interface", interface]
        if dry_run:
            argv.append("--dry-run")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so `-m node.guard` imports this very tree
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # start_new_session: a SIGKILL of the agent's process group (or a terminal's ^C) must not
        # take the guard with it. The write end of the pipe is close-on-exec, so only the agent holds
        # it: when the agent dies, the guard sees EOF.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                     start_new_session=True, close_fds=True, env=env)
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._lock = threading.Lock()
        self._broken = False
        self._stalled = False

    def _send(self, msg: dict[str, Any], wait: float = 0.0) -> bool:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        end = time.monotonic() + wait
        with self._lock:
            if self._broken or self.proc.stdin is None or self.proc.stdin.closed:
                return False
            fd = self.proc.stdin.fileno()
            while True:
                try:
                    # Messages are far below PIPE_BUF: a write is all or nothing.
                    os.write(fd, data)
                    self._stalled = False
                    return True
                except BlockingIOError:
                    left = end - time.monotonic()
                    if left <= 0:
                        self._stalled = True
                        log.warning("fence guard is not reading its pipe; message dropped")
                        return False
                    select.select([], [fd], [], left)
                except OSError as exc:  # BrokenPipeError: the guard is gone
                    self._broken = True
                    log.error("fence guard pipe failed: %s", exc)
                    return False

    def hold(self, vfs: str, vip: str, deadline: float, mountpoint: str | None, nfs_pid: int | None,
             epoch: int = 0) -> bool:
        return self._send({"op": "hold", "vfs": vfs, "vip": vip, "deadline": deadline,
                           "mountpoint": mountpoint, "nfs_pid": nfs_pid, "epoch": epoch})

    def release(self, vfs: str, epoch: int = 0) -> bool:
        return self._send({"op": "release", "vfs": vfs, "epoch": epoch})

    def ping(self) -> bool:
        return self._send({"op": "ping"})

    def alive(self) -> bool:
        return self.proc.poll() is None and not self._broken and not self._stalled

    def close_clean(self, timeout: float = 5.0) -> int | None:
        """Clean shutdown: the guard forgets everything and exits without fencing. Returns its exit code."""
        self._send({"op": "exit"}, wait=timeout)
        with self._lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.error("fence guard (pid %d) did not exit; killing it", self.proc.pid)
            self.proc.kill()
            return self.proc.wait(timeout=timeout)


if __name__ == "__main__":
    sys.exit(main())
