"""The fence guard: a dead man's switch for the VFS this node holds.

The agent's self-fence rule (docs/protocol.md, "Hold") drops a VIP before its lease can expire,
but only while the agent process runs. If the agent is killed (SIGKILL, OOM) or frozen (SIGSTOP,
a hang), the kernel keeps answering ARP for the VIP and Ganesha keeps serving from the shared disk.
The guard is a small separate process, started by the agent (GuardClient below) in its own session,
that knows only what the agent told it over a pipe and acts on its own when the agent goes quiet.

    python -m node.guard --state-dir DIR --interface IFACE [--dry-run] [--release-bound SECONDS]
        [--reset-command JSON_ARGV] [--nfs-workroot DIR] [--watchdog]

--release-bound T_release (default 10 s, 0 < T <= 3600): the disk bound, see rule 3.
--reset-command  a JSON list of strings, argv[0] absolute, run without a shell, with a timeout of
                 T_release/2, as the last escalation (e.g. a sysrq script; in the lab, `compose/lab
                 reset NODE`: every process of the node killed, its mounts gone).
--nfs-workroot   where the agent keeps per-VFS Ganesha work dirs, <DIR>/<vfs>/ganesha.conf
                 (default <state-dir>/nfs, as node/host.py).
--watchdog       the agent has a hardware watchdog armed: when the bound breaks, the watchdog is
                 expected to reset the node too (the reset command, if any, still runs).

Messages: newline-delimited JSON objects on stdin, one per line (extra keys are ignored):

    {"op": "hold", "vfs": "home", "vip": "10.77.0.100/24", "deadline": 1234.5,
     "mountpoint": "/run/nfs-ha/node-a/mnt/home" | null, "nfs_pid": 1234 | null, "epoch": 42,
     "device": "/dev/sdb" | null}
        (re)states a held VFS and its guard deadline, an absolute time.monotonic() of the agent
        (CLOCK_MONOTONIC is system-wide, so the guard compares it with its own clock). The agent
        sends it on every keepalive acknowledgement (it is also the heartbeat) and right after it
        started an NFS server (so the guard knows the new pid at once). The newest hold replaces the
        previous one as is (a new acquire may carry an earlier deadline). `epoch` is the holding's
        epoch (optional; rule 7); `device` the VFS's shared block device (optional; rule 3).
    {"op": "holds", "holds": [{...a hold without "op"...}, ...]}
        several holds at once (the agent's keepalive renewals, in batches, each line < PIPE_BUF). Each
        is checked and applied on its own: a bad one is logged and ignored, the others still count.
    {"op": "release", "vfs": "home", "epoch": 42}   the agent released the VFS itself: forget it.
    {"op": "fence", "vfs": "home", "epoch": 42, "reason": "..."}
        the agent could not fence this holding itself (e.g. the VIP would not go): fence it now.
        Applies only while a hold of that epoch is held (epoch 0 on either side: any); otherwise it
        is ignored (logged). A holding the agent asked to fence stays fenced: later holds of that
        epoch are ignored and cannot stop the fence (rule 5).
    {"op": "ping"}                     the agent is alive; nothing held changes.
    {"op": "exit"}                     clean agent shutdown: forget everything, exit 0, fence nothing
                                       (a fence already running is finished first, rule 8).

A message that does not validate (types, VFS name [a-z0-9][a-z0-9-]{0,62}, VIP an IPv4 interface,
mountpoint and device absolute) is logged and ignored; it changes nothing.

INVARIANTS (the guard's rules)

1. stdin at EOF or failing (the agent died: the pipe's write end is closed) -> fence EVERY held VFS
   at once, then exit once every fence is complete.
2. Monotonic time past a held VFS's deadline with no newer hold for it -> fence that VFS (the agent
   hangs or is stopped). What the agent has already written into the pipe is read first: a hold
   waiting there counts. The guard keeps running (the agent may resume and will find its holding
   fenced on its own); a fenced VFS is forgotten until a new hold arrives for it.
3. Fencing a VFS, in this order:
   (a) remove the VIP from the interface (netlink, never a shell). For all VFS fenced together, every
       VIP goes before anything slow starts. The fence's clock (t0) starts here.
   Then, per VFS in a worker thread:
   (b) SIGKILL the NFS server: the pid of the last hold, only while /proc/PID/cmdline is still
       ganesha.nfsd (a reused pid is never killed), AND every live ganesha.nfsd started with this
       VFS's config path (`-f <nfs-workroot>/<vfs>/ganesha.conf`, node.ganesha.stray_pids) in this
       node: a server whose pid the guard never learned. Waits at most ~1 s for each to go.
   (c) release the disk, in rounds: `umount -- DIR` of the mount point and of every other mount of
       the same filesystem in this mount namespace (deepest first); when that fails (busy), SIGKILL
       every process of this node that holds the filesystem, then the next round (every 0.1 s; right
       after the reset command, then backing off to 1 s). NEVER `umount -l`: a lazily detached
       superblock stays alive as long as anything uses it and is written back whenever, after the
       next owner mounted the disk. A `umount` that does not return is not waited for (it is left
       to a reaper thread, and no second one is started for that path).
   "The filesystem" is a set of device numbers: st_rdev of the hold's `device` (if it is a block
   device), plus st_dev of the mount point taken at the start of (c) if something is mounted there.
   Never the device of / or of the mount point's parent (a mount point that is a plain directory
   must not turn "the filesystem" into the root filesystem).
   "Holds the filesystem": an open fd (a file on it, or the block device itself), cwd, root or a
   memory mapping on it (scanning /proc/PID/{fd,cwd,root,maps}), or, for a process in another mount
   namespace, a mount of it in that namespace (/proc/PID/mountinfo). "A process of this node": one
   in the guard's mount namespace or in its network namespace (in the lab, nodes share one kernel and
   one /proc; another node's processes, which may legitimately use the same disk, are never touched).
   The guard never kills itself. It does kill the agent if the agent holds the filesystem: by then
   the holding is past its deadline (or the agent asked for the fence), the disk bound outranks the
   agent, and the guard then sees EOF and fences everything else too (with a watchdog, the agent's
   death resets the node anyway). But not in the first T_release/4 of the fence: the agent's own
   holds are momentary by construction (its release check opens the block device O_EXCL for an
   instant, its takeover writes the epoch file), and a fence that runs while the agent is releasing
   the same disk itself (the guard's deadline is only margin/2 after the agent's) would otherwise
   kill a healthy agent for an fd it closes a moment later, and with it every other holding of the
   node. The round counts the disk as not released and looks again; the escalation at T_release/2
   is unchanged, so the bound holds. "The agent" is the guard's parent at start-up, and only while it
   still is (once the agent died the guard is reparented, and the pid may be reused).
   Kills go through a pidfd opened before the holder is re-checked, so a pid reused in between is
   never signalled.
   DONE ("released") only when nothing is mounted at the mount point, no mount of the filesystem is
   left in this mount namespace AND no process of this node holds it (a detached superblock that
   something still uses is NOT released). Every action and every failure is recorded; a failure never
   stops the later steps and is never raised.
4. The disk bound. If the fence is not done by t0 + T_release/2 (monotonic; checked by the worker
   and by a separate timer thread, so a worker stuck in a system call cannot delay it):
   - with a reset command: record the fence so far (a reset that works ends this process too), then
     run it, bounded by T_release/2 (its process group is SIGKILLed at the timeout); record its exit
     status and the tail of its output. Escalations of several VFS run the command one at a time, and
     not at all for a VFS released meanwhile;
   - without one: log CRITICAL "disk release bound broken: <vfs> still mounted/open after Xs and no
     reset command" (adding that the hardware watchdog is expected to reset the node, with
     --watchdog) and record it.
   Either way the kill/unmount rounds go on (never given up silently) until the disk is released or
   the guard exits. So a fenced node has released the disk, or has had its reset command run (and
   returned or been killed), by t0 + T_release.
5. Which message stops a running fence ("superseded"), per VFS; arming a new hold is decided by
   rule 7 as for any hold:
   - a release: NEVER. The agent releases after a failed unmount too; the guard finishes the job.
   - a hold of the SAME epoch (or an epoch-less one) with a deadline still in the future: yes, unless
     the agent itself asked for this fence. The agent stops sending holds for a holding it fenced, so
     such a hold means its keepalive was acknowledged and the lease renewed, only late (a starved
     thread): nobody else can own the VFS before that new deadline, the guard is re-armed by this very
     hold and fences again if the agent goes quiet, so killing the server it serves with would only
     cause an outage. A same-epoch hold whose deadline has passed is ignored (not armed either): the
     agent has nothing newer, the fence goes on.
   - a hold of a NEWER epoch: the agent re-acquired the VFS. It stops the fence only if it
     demonstrably uses the same mount: same mount point (not null), same device string or either
     device unknown, and its deadline in the future. The agent's mount step is idempotent for the
     same device, so the new holding serves from this very mount and the guard must not pull it away
     (the new server would be found by its config path and as a holder). Otherwise the fence goes on.
   A superseded fence stops before its next step (a reset command already running is not undone),
   leaves server and mount to the agent, and is recorded as such.
6. Every fence is appended as one JSON line to <state-dir>/guard-actions.jsonl and fsynced:
   {"time", "vfs", "vip", "mountpoint", "device", "nfs_pid", "epoch", "reason", "actions", "errors",
    "killed": [{"pid", "comm"}], "released_after": seconds from t0 to "released" | null,
    "reset": null | {"command", "after", "exit", "output", "error", "watchdog"}, "superseded": text | null,
    "final": bool, "dry_run"}.
   A fence that escalates writes a record with "final": false before the reset step, and the final
   one when it ends. read_actions() gives them back (the next agent start logs and registers them).
7. Messages about an older holding change nothing: the agent sends holds from its keepalive thread
   and holds/releases from each VFS's thread, so a hold of a holding that just ended can arrive
   after the release of that holding or after the hold of the next one. Per VFS, a hold, release or
   fence whose epoch is below the highest epoch seen, a hold whose epoch was already released, and
   a hold whose epoch the agent asked to fence, are ignored (logged at debug level). Messages without
   an epoch (0) are always applied.
8. SIGTERM (or SIGINT) -> fence everything held and exit when done, as for EOF (holds already waiting
   in the pipe are applied first). SIGHUP is ignored. {"op": "exit"} waits up to T_release + 1 s for
   running fences to end, then exits 0 (an unfinished one is logged as an error).
9. Real time. At start-up the guard asks for SCHED_FIFO priority 10 (above every normal task),
   else nice -20, and locks its memory (mlockall(MCL_CURRENT|MCL_FUTURE)); it logs what it got and
   carries on without. It never busy-waits: it sleeps in select() until the next deadline or input.
   Its children (umount, the reset command) inherit the scheduling policy. Its working directory is
   /, so it never holds a filesystem itself.

Deadline margin. The agent's hold carries guard_deadline = D + margin/2 (controller/ownership.py),
D = t_ack + TTL - margin its own self-fence deadline, margin = max(0.3 s, TTL/4). etcd cannot expire
the lease before t_ack + TTL = D + margin, so the guard has margin/2 >= 0.15 s to take the VIP
down: the VIP removal is the ONLY step that must land before the expiry (it wakes from select() on
time: real-time priority, locked memory, no allocation-heavy work before it). The NFS server and the
disk are covered by T_release (rule 4): a new owner mounts no earlier than T_release after it saw the
old owner key go (docs/safety.md, "The disk bound").

--dry-run performs no host action at all but records what it would do ("would remove VIP ...").

What the guard cannot do (non-guarantees):
- It runs on the same host: a frozen kernel, a power loss or a SIGSTOP of the guard stops it too.
  Real-time priority does not help against other real-time tasks, RT throttling or a kernel stall;
  the hardware watchdog is the layer for that.
- A holder stuck in the kernel (D state: I/O on a dead disk, a frozen filesystem) survives SIGKILL,
  and a umount can hang: only the reset ends that. With no reset command (and no watchdog) the bound
  is broken; the guard says so (CRITICAL) and keeps trying. A reset command that returns without
  resetting the node, or takes longer than T_release/2, breaks it too.
- Processes in mount AND network namespaces of their own (containers) that hold the filesystem,
  and a mount namespace kept alive with no process in it (an nsfs bind mount), are not seen.
- Scanning /proc stats every open file of this node's processes: a file on a hung network
  filesystem can block the worker; the timer thread still escalates on time.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import ipaddress
import json
import logging
import math
import os
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("nfs-ha-guard")

ACTIONS_FILE = "guard-actions.jsonl"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")  # same rule as controller/keyspace.check_name
MAX_LINE = 64 * 1024  # a longer line is garbage, not a message
MAX_HOLDS = 1000  # in one "holds" message
HOLDS_BYTES = 3500  # GuardClient.hold_many: the holds of one message, so a line stays below PIPE_BUF (4096)
IDLE_TICK = 1.0  # longest select() wait when nothing is due
DEFAULT_RELEASE_BOUND = 10.0
MAX_RELEASE_BOUND = 3600.0
KILL_WAIT = 1.0  # how long a server kill waits for the process to go before the unmount rounds start
UMOUNT_CMD_TIMEOUT = 5.0
ROUND_PAUSE = 0.1  # between kill/unmount rounds before the escalation
AGENT_SPARE_SHARE = 0.25  # of T_release: how long a fence lets the agent close a momentary hold (rule 3)
SLOW_ROUND_PAUSE = 1.0  # after it, rounds back off to this
STILL_FAILING_LOG = 30.0  # how often a fence that outlived its escalation says so again
RESET_OUTPUT_TAIL = 2000
RT_PRIORITY = 10  # SCHED_FIFO: above every SCHED_OTHER task, far below the kernel's own RT threads
THREAD_STACK = 1 << 20  # with mlockall(MCL_FUTURE) every thread's stack is locked in full
GANESHA = "ganesha.nfsd"
REASON_EXITED = "agent exited"


class BadMessage(ValueError):
    pass


# --- options (shared by the CLI and GuardClient) --------------------------------------------------


def check_release_bound(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
            or not 0 < value <= MAX_RELEASE_BOUND:
        raise ValueError(f"release bound must be a number of seconds in (0, {MAX_RELEASE_BOUND:g}], not {value!r}")
    return float(value)


def check_reset_command(value: Any) -> tuple[str, ...]:
    """A JSON-decoded (or Python) argv: a list of non-empty strings, argv[0] an absolute path."""
    if isinstance(value, str) or not isinstance(value, Sequence) \
            or not all(isinstance(a, str) and a and "\0" not in a for a in value):
        raise ValueError(f"reset command must be a list of non-empty strings, not {value!r}")
    if value and not os.path.isabs(value[0]):
        raise ValueError(f"reset command must start with an absolute path (no shell, no PATH lookup): {value[0]!r}")
    return tuple(value)


# --- the pure core: what is held, and what is due -----------------------------------------------


@dataclass(frozen=True)
class Held:
    vfs: str
    vip: ipaddress.IPv4Interface
    deadline: float
    mountpoint: str | None
    nfs_pid: int | None
    epoch: int = 0  # the holding's epoch (owner key create_revision); 0: not given
    device: str | None = None  # the VFS's shared block device; None: not given


@dataclass(frozen=True)
class Message:
    op: str
    vfs: str | None = None
    held: Held | None = None
    epoch: int = 0
    reason: str = ""
    helds: tuple[Held, ...] = ()  # op holds: the ones that validated
    errors: tuple[str, ...] = ()  # op holds: why each of the others did not


@dataclass(eq=False)
class Ticket:
    """A running fence of one VFS, as GuardState sees it (rule 5)."""

    held: Held
    requested: bool = False  # the agent asked for it (op fence): its holds cannot stop it
    superseded_by: str | None = None


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


def _abs_path(value: Any, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not os.path.isabs(value)
                              or "\0" in value or "\n" in value):
        raise BadMessage(f"{what} must be an absolute path or null, not {value!r}")
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
    if op == "fence":
        reason = raw.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise BadMessage(f"reason must be a string or null, not {reason!r}")
        return Message(op, vfs=_vfs_name(raw.get("vfs")), epoch=_epoch(raw.get("epoch")),
                       reason=(reason or "").replace("\n", " ")[:300])
    if op == "holds":
        items = raw.get("holds")
        if not isinstance(items, list) or len(items) > MAX_HOLDS:
            raise BadMessage(f"holds must be a list of at most {MAX_HOLDS} holds")
        helds, errors = [], []
        for item in items:
            try:
                if not isinstance(item, Mapping):
                    raise BadMessage("a hold must be a JSON object")
                helds.append(_held(item))
            except BadMessage as exc:
                errors.append(f"{str(item)[:200]}: {exc}")
        return Message(op, helds=tuple(helds), errors=tuple(errors))
    if op != "hold":
        raise BadMessage(f"unknown op {op!r}")
    held = _held(raw)
    return Message(op, vfs=held.vfs, held=held, epoch=held.epoch)


@functools.lru_cache(maxsize=4096)
def _vip(text: str) -> ipaddress.IPv4Interface:
    # Cached: the same few VIPs come with every renewal (an IPv4Interface is immutable).
    try:
        return ipaddress.IPv4Interface(text)
    except ValueError as exc:
        raise BadMessage(f"invalid vip {text!r}: {exc}") from None


def _held(raw: Mapping[str, Any]) -> Held:
    vfs = _vfs_name(raw.get("vfs"))
    vip_text = raw.get("vip")
    if not isinstance(vip_text, str):
        raise BadMessage(f"vip must be a string, not {vip_text!r}")
    vip = _vip(vip_text)
    deadline = _number(raw.get("deadline"), "deadline")
    mountpoint = _abs_path(raw.get("mountpoint"), "mountpoint")
    device = _abs_path(raw.get("device"), "device")
    nfs_pid = raw.get("nfs_pid")
    if nfs_pid is not None and (isinstance(nfs_pid, bool) or not isinstance(nfs_pid, int) or nfs_pid <= 1):
        raise BadMessage(f"nfs_pid must be a pid > 1 or null, not {nfs_pid!r}")
    return Held(vfs, vip, deadline, mountpoint, nfs_pid, _epoch(raw.get("epoch")), device)


def parse_line(line: bytes | str) -> Message:
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    return validate(raw)


def _same_holding(a: int, b: int) -> bool:
    return a == 0 or b == 0 or a == b


class GuardState:
    """What the agent says it holds, and which fences are running. No I/O, no clock of its own:
    `now` is always passed in. The main loop applies messages; fence workers read tickets."""

    def __init__(self) -> None:
        self._held: dict[str, Held] = {}
        self._newest: dict[str, int] = {}  # highest epoch seen per VFS (rule 7)
        self._released: dict[str, int] = {}  # highest epoch released per VFS
        self._fence_asked: dict[str, int] = {}  # highest epoch the agent asked to fence per VFS
        self._requests: list[tuple[Held, str]] = []  # fence ops not yet started
        self._running: dict[str, list[Ticket]] = {}  # fences whose slow steps are running (rule 5)
        self._lock = threading.Lock()
        self.exit_requested = False
        self.last_heard: float | None = None

    def apply(self, message: Message | Mapping[str, Any], now: float) -> bool:
        """Apply one message (a Message or a decoded JSON object). BadMessage changes nothing;
        False: ignored (about an older holding, rule 7, or a fence op for nothing held)."""
        msg = message if isinstance(message, Message) else validate(message)
        with self._lock:
            self.last_heard = now
            if msg.op == "hold":
                assert msg.held is not None
                return self._hold(msg.held, now)
            if msg.op == "holds":
                armed = [self._hold(held, now) for held in msg.helds]
                return any(armed) or not armed
            if msg.op == "release":
                assert msg.vfs is not None
                if self._stale(msg.vfs, msg.epoch, hold=False):
                    return False
                self._held.pop(msg.vfs, None)  # a running fence goes on (rule 5)
            elif msg.op == "fence":
                assert msg.vfs is not None
                return self._fence(msg.vfs, msg.epoch, msg.reason)
            elif msg.op == "exit":
                self._held.clear()
                self.exit_requested = True
        return True

    def _hold(self, held: Held, now: float) -> bool:
        vfs = held.vfs
        if held.epoch and held.epoch <= self._fence_asked.get(vfs, 0):
            return False  # the agent asked to fence this holding: it stays fenced
        if self._stale(vfs, held.epoch, hold=True):
            return False
        arm = True
        for ticket in self._running.get(vfs, []):
            if ticket.superseded_by is not None:
                continue
            old = ticket.held
            if _same_holding(old.epoch, held.epoch):
                if ticket.requested or held.deadline <= now:
                    arm = False  # the holding being fenced, with nothing newer: the fence goes on
                else:
                    ticket.superseded_by = (f"a hold of the same holding (epoch {held.epoch}) with a later deadline "
                                            "came: the agent is alive and its lease was renewed")
            elif held.epoch > old.epoch and held.deadline > now and held.mountpoint is not None \
                    and held.mountpoint == old.mountpoint \
                    and (held.device is None or old.device is None or held.device == old.device):
                ticket.superseded_by = f"a newer holding (epoch {held.epoch}) of the same mount came"
        if arm:
            self._held[vfs] = held
        return arm

    def _fence(self, vfs: str, epoch: int, reason: str) -> bool:
        if epoch and epoch < self._newest.get(vfs, 0):
            return False
        if epoch:
            self._fence_asked[vfs] = max(self._fence_asked.get(vfs, 0), epoch)
        held = self._held.get(vfs)
        if held is not None and _same_holding(held.epoch, epoch):
            del self._held[vfs]
            self._requests.append((held, reason))
            return True
        found = False
        for ticket in self._running.get(vfs, []):
            if ticket.superseded_by is None and _same_holding(ticket.held.epoch, epoch):
                ticket.requested = True  # already being fenced: now no hold of it may stop that
                found = True
        return found

    def _stale(self, vfs: str, epoch: int, hold: bool) -> bool:
        """Rule 7 (called under the lock): a message about an older holding changes nothing."""
        if epoch == 0:
            return False  # a sender that gives no epoch: every message counts
        if epoch < self._newest.get(vfs, 0) or (hold and epoch <= self._released.get(vfs, 0)):
            return True
        self._newest[vfs] = epoch
        if not hold:
            self._released[vfs] = max(self._released.get(vfs, 0), epoch)
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

    def take_requests(self) -> list[tuple[Held, str]]:
        """Fence ops applied since the last call: (what was held, the agent's reason)."""
        with self._lock:
            out, self._requests = self._requests, []
            return out

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

    def begin(self, held: Held, requested: bool = False) -> Ticket:
        """A fence of `held` starts its slow steps: holds are now judged against it (rule 5)."""
        ticket = Ticket(held, requested)
        with self._lock:
            self._running.setdefault(held.vfs, []).append(ticket)
        return ticket

    def end(self, ticket: Ticket) -> None:
        with self._lock:
            tickets = self._running.get(ticket.held.vfs, [])
            if ticket in tickets:
                tickets.remove(ticket)
            if not tickets:
                self._running.pop(ticket.held.vfs, None)

    def running(self) -> list[str]:
        with self._lock:
            return sorted(self._running)


# --- the actions layer --------------------------------------------------------------------------


Devices = frozenset[int]


@dataclass(frozen=True)
class Actions:
    """Host actions and observations. Actions return what they did (for the record) and may raise."""

    remove_vip: Callable[[ipaddress.IPv4Interface], str]
    kill_server: Callable[[int], str]  # SIGKILL a ganesha.nfsd by pid (cmdline checked), wait ~1 s
    find_servers: Callable[[str], list[int]]  # pids of ganesha.nfsd of this node started with -f CONF
    fs_devices: Callable[[str | None, str | None], Devices]  # (mountpoint, device) -> the filesystem's st_dev set
    mounted: Callable[[str | None, Devices], list[str]]  # what is left to unmount, deepest first
    umount: Callable[[str, float], str | None]  # one `umount -- DIR` within timeout: None, or the error
    find_holders: Callable[[Devices], list[tuple[int, str]]]  # (pid, comm) of this node's processes using it
    kill_holder: Callable[[int, Devices], bool]  # SIGKILL it if it still holds the filesystem
    reset: Callable[[Sequence[str], float], dict[str, Any]]  # run the reset command: {"exit","output","error"}


@dataclass(eq=False)
class FenceJob:
    held: Held
    reason: str
    started: float  # monotonic t0: when the VIP removal began
    ticket: Ticket | None = None
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    killed: list[dict[str, Any]] = field(default_factory=list)
    devices: Devices = frozenset()
    released_after: float | None = None
    reset: dict[str, Any] | None = None
    superseded: str | None = None
    escalated: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def superseded_by(self) -> str | None:
        return self.ticket.superseded_by if self.ticket is not None else None


def _attempt(job: FenceJob, what: str, fn: Callable[[], str]) -> None:
    try:
        job.actions.append(fn())
    except Exception as exc:  # a failure is recorded, never raised: the next step must still run
        job.errors.append(f"{what}: {exc}")


class Fencer:
    """Runs fences (rules 3, 4, 6). `clock` and `sleep` are injectable so that tests can run the
    escalation without waiting."""

    def __init__(self, actions: Actions, state_dir: Path, dry_run: bool = False,
                 release_bound: float = DEFAULT_RELEASE_BOUND, reset_command: Sequence[str] = (),
                 watchdog: bool = False, nfs_workroot: Path | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 agent_pid: int | None = None) -> None:
        self.actions = actions
        self.agent_pid = agent_pid
        # The agent is our parent: once it died we are reparented, and its pid may be anyone's.
        self.agent_alive: Callable[[], bool] = lambda: agent_pid is not None and os.getppid() == agent_pid
        self.path = Path(state_dir) / ACTIONS_FILE
        self.dry_run = dry_run
        self.release_bound = check_release_bound(release_bound)
        self.reset_command = check_reset_command(reset_command)
        self.watchdog = watchdog
        self.nfs_workroot = Path(nfs_workroot) if nfs_workroot is not None else Path(state_dir) / "nfs"
        self.clock = clock
        self.sleep = sleep
        self._write_lock = threading.Lock()
        self._reset_lock = threading.Lock()  # one reset command at a time

    # --- (a) ---------------------------------------------------------------------------------

    def start(self, helds: Iterable[Held], reason: Callable[[Held], str],
              ticket: Callable[[Held], Ticket | None] = lambda _h: None) -> list[FenceJob]:
        """Step (a) for every VFS, before anything slow: clients stop reaching this node first."""
        t0 = self.clock()
        jobs = [FenceJob(h, reason(h), t0, ticket(h)) for h in helds]
        for job in jobs:
            _attempt(job, "removing VIP", lambda job=job: self.actions.remove_vip(job.held.vip))
        return jobs

    # --- (b), (c), escalation ------------------------------------------------------------------

    def escalate_at(self, job: FenceJob) -> float:
        return job.started + self.release_bound / 2

    def complete(self, job: FenceJob) -> dict[str, Any]:
        """Steps (b) and (c) until released or superseded, escalating on time; then the final record."""
        try:
            if not self._check_superseded(job):
                self._stop_servers(job)
            if not self._check_superseded(job) and (job.held.mountpoint is not None or job.held.device is not None):
                self._release_disk(job)
        except Exception as exc:  # a bug here must still leave a record
            log.exception("fence of %s failed", job.held.vfs)
            job.errors.append(f"fence worker: {exc!r}")
        finally:
            job.done.set()
        return self.record(job, final=True)

    def _check_superseded(self, job: FenceJob) -> bool:
        why = job.superseded_by()
        if why is not None and job.superseded is None:
            job.superseded = why
            job.actions.append(f"superseded: {why}; server and mount left to the agent")
        return why is not None

    def _stop_servers(self, job: FenceJob) -> None:
        h = job.held
        if h.nfs_pid is not None:
            _attempt(job, f"stopping nfs server {h.nfs_pid}", lambda: self.actions.kill_server(h.nfs_pid))
        conf = str(self.nfs_workroot / h.vfs / "ganesha.conf")
        try:
            strays = [p for p in self.actions.find_servers(conf) if p != h.nfs_pid]
        except Exception as exc:
            job.errors.append(f"looking for servers started with {conf}: {exc}")
            strays = []
        for pid in strays:
            _attempt(job, f"stopping nfs server {pid} (found by {conf})",
                     lambda pid=pid: self.actions.kill_server(pid) + f" (found by its config {conf})")

    def _release_disk(self, job: FenceJob) -> None:
        h = job.held
        try:
            job.devices = self.actions.fs_devices(h.mountpoint, h.device)
        except Exception as exc:
            job.errors.append(f"finding the filesystem of {h.mountpoint or h.device}: {exc}")
        failing: dict[str, str] = {}  # mount point -> first umount error (recorded once)
        tries = 0
        last_note = self.clock()
        pause = ROUND_PAUSE
        while True:
            if self._check_superseded(job):
                return
            tries += 1
            if self._release_round(job, failing):
                job.released_after = round(self.clock() - job.started, 3)
                return
            now = self.clock()
            if now < self.escalate_at(job):
                self.sleep(min(ROUND_PAUSE, max(0.0, self.escalate_at(job) - now)))
                continue
            if self.escalate(job):
                continue  # the reset may have freed the disk just now: look again at once
            if now - last_note >= STILL_FAILING_LOG:
                last_note = now
                log.error("fence of %s: disk still not released after %.0f s (%d rounds): %s", h.vfs,
                          now - job.started, tries, "; ".join(f"{k}: {v}" for k, v in failing.items()))
            self.sleep(pause)
            pause = min(SLOW_ROUND_PAUSE, pause * 2)  # keep trying, without hogging a CPU at real-time priority

    def _release_round(self, job: FenceJob, failing: dict[str, str]) -> bool:
        """One round of (c); True once released (rule 3)."""
        h, devs = job.held, job.devices
        targets = self.actions.mounted(h.mountpoint, devs)
        for target in targets:
            left = self.escalate_at(job) - self.clock()
            timeout = UMOUNT_CMD_TIMEOUT if left <= 0 else max(0.2, min(UMOUNT_CMD_TIMEOUT, left))
            try:
                err = self.actions.umount(target, timeout)
            except Exception as exc:
                err = str(exc)
            if err is None:
                job.actions.append(f"{'would unmount' if self.dry_run else 'unmounted'} {target}"
                                   + (f" (after: {failing.pop(target)})" if target in failing else ""))
            elif target not in failing:
                failing[target] = err
                job.errors.append(f"umount {target}: {err} (killing holders, retrying)")
        if targets:
            targets = self.actions.mounted(h.mountpoint, devs)
        holders = self.actions.find_holders(devs) if devs else []
        if not targets and not holders:
            return True
        known = {k["pid"] for k in job.killed}
        for pid, comm in holders:
            if self._spare(job, pid):
                continue
            try:
                signalled = self.actions.kill_holder(pid, devs)
            except Exception as exc:
                job.errors.append(f"killing holder {pid} ({comm}): {exc}")
                continue
            if signalled and pid not in known:  # a holder in D state is signalled every round, recorded once
                job.killed.append({"pid": pid, "comm": comm})
                job.actions.append(f"{'would SIGKILL' if self.dry_run else 'SIGKILLed'} holder {pid} ({comm})")
        return False

    def _spare(self, job: FenceJob, pid: int) -> bool:
        """Rule 3: the agent is given T_release/4 to close a momentary hold before it is killed."""
        window = self.release_bound * AGENT_SPARE_SHARE
        if pid != self.agent_pid or self.clock() - job.started >= window or not self.agent_alive():
            return False
        note = f"the agent ({pid}) holds the filesystem: not killed in the first {window:g}s"
        if note not in job.actions:
            job.actions.append(note)
        return True

    def escalate(self, job: FenceJob) -> bool:
        """Rule 4: the disk is not released by t0 + T_release/2. Idempotent; called by the worker
        and by the timer thread, whichever sees the time first. True if this call escalated."""
        if job.held.mountpoint is None and job.held.device is None:
            return False  # no disk, no bound to enforce: a slow fence of a VIP-only VFS resets nothing
        with job.lock:
            if job.escalated or job.done.is_set() or job.superseded_by() is not None:
                return False
            job.escalated = True
        h = job.held
        after = round(self.clock() - job.started, 3)
        what = f"{h.mountpoint or h.device}"
        if not self.reset_command:
            msg = (f"disk release bound broken: {h.vfs} still mounted/open after {after:.1f}s and no reset command"
                   + ("; the hardware watchdog is expected to reset the node" if self.watchdog else ""))
            log.critical("%s", msg)
            job.errors.append(msg)
            job.reset = {"command": None, "after": after, "exit": None, "output": "", "error": msg,
                         "watchdog": self.watchdog}
            self.record(job, final=False)
            return True
        msg = (f"disk {what} of {h.vfs} not released {after:.1f}s after the fence started "
               f"(bound {self.release_bound / 2:g}s): running the reset command")
        log.critical("%s %s", msg, list(self.reset_command))
        job.errors.append(msg)
        job.reset = {"command": list(self.reset_command), "after": after, "exit": None, "output": "",
                     "error": None, "watchdog": self.watchdog}
        self.record(job, final=False)  # a reset that works ends this process: write first
        with self._reset_lock:
            if job.done.is_set() or job.released_after is not None:
                job.reset["error"] = "not run: the disk was released while another reset ran"
                return True
            try:
                result = self.actions.reset(self.reset_command, self.release_bound / 2)
            except Exception as exc:
                result = {"exit": None, "output": "", "error": str(exc)}
        job.reset.update(result)
        verb = "would run" if self.dry_run else "ran"
        job.actions.append(f"{verb} reset command {list(self.reset_command)}: exit {result.get('exit')}"
                           + (f", {result['error']}" if result.get("error") else ""))
        log.critical("reset command for %s: exit %s %s; output: %s", h.vfs, result.get("exit"),
                     result.get("error") or "", (result.get("output") or "")[-300:])
        return True

    def backstop(self, job: FenceJob) -> None:
        """Timer thread: escalates on time even while the worker is stuck in a system call."""
        at = self.escalate_at(job)
        while not job.done.wait(max(0.0, min(IDLE_TICK, at - self.clock()))):
            if self.clock() >= at:
                self.escalate(job)
                return

    def fence(self, helds: Iterable[Held], reason: Callable[[Held], str]) -> list[dict[str, Any]]:
        """Fence now, synchronously: all VIPs first, then each VFS's server and disk in parallel."""
        return self.complete_all(self.start(helds, reason))

    def complete_all(self, jobs: list[FenceJob],
                     on_done: Callable[[FenceJob], None] = lambda _job: None) -> list[dict[str, Any]]:
        # One thread per VFS: a hung unmount of one disk must not delay killing another's server.
        records: list[dict[str, Any] | None] = [None] * len(jobs)

        def run(i: int) -> None:
            try:
                records[i] = self.complete(jobs[i])
            finally:
                on_done(jobs[i])

        threads = []
        for i, job in enumerate(jobs):
            threads.append(threading.Thread(target=run, args=(i,), name=f"fence-{job.held.vfs}"))
            if job.held.mountpoint is not None or job.held.device is not None:  # the disk bound's timer
                threading.Thread(target=self.backstop, args=(job,), name=f"bound-{job.held.vfs}",
                                 daemon=True).start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in records if r is not None]

    # --- the record ---------------------------------------------------------------------------

    def record(self, job: FenceJob, final: bool) -> dict[str, Any]:
        h = job.held
        rec = {"time": wall_clock(), "vfs": h.vfs, "vip": h.vip.with_prefixlen, "mountpoint": h.mountpoint,
               "device": h.device, "nfs_pid": h.nfs_pid, "epoch": h.epoch, "reason": job.reason,
               "actions": list(job.actions), "errors": list(job.errors), "killed": list(job.killed),
               "released_after": job.released_after, "reset": dict(job.reset) if job.reset else None,
               "superseded": job.superseded, "final": final, "dry_run": self.dry_run}
        if final:
            disk = "" if job.released_after is None else f"; disk released after {job.released_after:.3f} s"
            log.warning("fenced %s (%s): %s%s%s", h.vfs, job.reason, "; ".join(job.actions), disk,
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


# --- real host actions ----------------------------------------------------------------------------


PROC = Path("/proc")


def _gone(pid: int, proc_root: Path = PROC) -> bool:
    # A zombie has already closed its files, so it no longer keeps the mount busy.
    try:
        return (proc_root / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _comm(pid: int, proc_root: Path = PROC) -> str:
    try:
        return (proc_root / str(pid) / "comm").read_text().strip()
    except OSError:
        return "?"


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
            # Stuck in the kernel (D state): the unmount rounds find it as a holder and retry.
            return f"nfs server {pid} SIGKILLed, still there after {wait:g}s"
        time.sleep(0.01)
    return f"nfs server {pid} killed"


def _ns(pid: int | str, kind: str, proc_root: Path) -> int | None:
    try:
        return os.stat(proc_root / str(pid) / "ns" / kind).st_ino
    except OSError:
        return None


def node_pids(proc_root: Path = PROC, me: int | None = None) -> list[tuple[int, bool]]:
    """(pid, in another mount namespace) of every live process of this node (rule 3): in the
    guard's mount namespace or in its network namespace; never the guard itself."""
    me = os.getpid() if me is None else me
    my_mnt, my_net = _ns("self", "mnt", proc_root), _ns("self", "net", proc_root)
    out = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        mnt, net = _ns(pid, "mnt", proc_root), _ns(pid, "net", proc_root)
        if mnt is None or (mnt != my_mnt and net != my_net) or _gone(pid, proc_root):
            continue
        out.append((pid, mnt != my_mnt))
    return sorted(out)


def mountinfo_devices(path: Path) -> list[tuple[str, int]]:
    """(mount point, st_dev) of every mount in a mountinfo file (newest last)."""
    out = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split(" - ", 1)[0].split()
            if len(fields) > 4:
                major, _, minor = fields[2].partition(":")
                with contextlib.suppress(ValueError):
                    out.append((fields[4].encode().decode("unicode_escape"), os.makedev(int(major), int(minor))))
    return out


def holds(pid: int, devs: Devices, other_ns: bool, proc_root: Path = PROC) -> bool:
    """Whether process `pid` uses the filesystem (rule 3): cwd, root, an open fd (a file on it or the
    block device itself), a memory mapping, or, in another mount namespace, a mount of it."""
    base = proc_root / str(pid)
    for link in ("cwd", "root"):
        with contextlib.suppress(OSError):
            if os.stat(base / link).st_dev in devs:
                return True
    with contextlib.suppress(OSError):
        for fd in os.listdir(base / "fd"):
            try:
                st = os.stat(base / "fd" / fd)
            except OSError:
                continue
            if st.st_dev in devs or (stat.S_ISBLK(st.st_mode) and st.st_rdev in devs):
                return True
    with contextlib.suppress(OSError):
        for line in (base / "maps").read_text().splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) >= 5 and parts[4] != "0":  # an inode: a file mapping
                major, _, minor = parts[3].partition(":")
                with contextlib.suppress(ValueError):
                    if os.makedev(int(major, 16), int(minor, 16)) in devs:
                        return True
    return other_ns and any(dev in devs for _p, dev in mountinfo_devices(base / "mountinfo"))


def find_holders(devs: Devices, proc_root: Path = PROC, me: int | None = None) -> list[tuple[int, str]]:
    """(pid, comm) of every process of this node that holds the filesystem."""
    if not devs:
        return []
    return [(pid, _comm(pid, proc_root)) for pid, other in node_pids(proc_root, me)
            if holds(pid, devs, other, proc_root)]


def kill_holder(pid: int, devs: Devices, proc_root: Path = PROC) -> bool:
    """SIGKILL `pid` through a pidfd opened BEFORE re-checking that it holds the filesystem: a pid
    reused in between is re-checked (and spared), and the signal can only reach the process checked."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # gone
    try:
        if _gone(pid, proc_root):
            return False
        mnt = _ns(pid, "mnt", proc_root)
        if not holds(pid, devs, mnt != _ns("self", "mnt", proc_root), proc_root):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def fs_devices(mountpoint: str | None, device: str | None) -> Devices:
    """The filesystem's device numbers (rule 3): st_rdev of `device` if it is a block device, and
    st_dev of whatever is mounted at `mountpoint`. Never the device of / or of the mount point's parent."""
    from node.storage import mounted_at

    devs: set[int] = set()
    exclude = {os.stat("/").st_dev}
    if device is not None:
        with contextlib.suppress(OSError):
            st = os.stat(device)
            if stat.S_ISBLK(st.st_mode):
                devs.add(st.st_rdev)
    if mountpoint is not None:
        with contextlib.suppress(OSError):
            exclude.add(os.stat(os.path.dirname(mountpoint.rstrip("/")) or "/").st_dev)
        if mounted_at(Path(mountpoint)) is not None:
            with contextlib.suppress(OSError):
                devs.add(os.stat(mountpoint).st_dev)
    return frozenset(devs - exclude)


def still_mounted(mountpoint: str | None, devs: Devices, mountinfo: Path = PROC / "self" / "mountinfo") -> list[str]:
    """The mount point if anything is mounted there, and every mount of the filesystem in this mount
    namespace; deepest first (a mount inside another goes first)."""
    entries = mountinfo_devices(mountinfo)
    points = {p for p, dev in entries if dev in devs}
    if mountpoint is not None:
        mountpoint = os.path.normpath(mountpoint)
        if any(p == mountpoint for p, _dev in entries):
            points.add(mountpoint)
    return sorted(points, key=lambda p: (-p.rstrip("/").count("/"), p))


_umounts: dict[str, tuple[subprocess.Popen[str], float]] = {}  # path -> a umount that has not returned
_umounts_lock = threading.Lock()


def run_umount(path: str, timeout: float) -> str | None:
    """One `umount -- PATH` (never -l); None on success, else the error. A umount stuck in the kernel
    is not waited for (that would stall the fence): it is left running, reaped by a thread, and
    reported until it returns."""
    with _umounts_lock:
        if path in _umounts:
            _proc, since = _umounts[path]
            return f"an earlier umount of {path} has not returned for {time.monotonic() - since:.1f}s"
    try:
        proc = subprocess.Popen(["umount", "--", path], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, close_fds=True)
    except OSError as exc:
        return str(exc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with _umounts_lock:
            _umounts[path] = (proc, time.monotonic())

        def reap() -> None:
            proc.communicate()
            with _umounts_lock:
                _umounts.pop(path, None)

        threading.Thread(target=reap, name="umount-reaper", daemon=True).start()
        return f"umount did not return within {timeout:.1f}s"
    return None if proc.returncode == 0 else (out or f"exit {proc.returncode}").strip()[-300:]


def run_reset(argv: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run the reset command (no shell, own process group, stdin closed), at most `timeout` s."""
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
    except OSError as exc:
        return {"exit": None, "output": "", "error": f"cannot run it: {exc}"}
    error = None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        error = f"no exit within {timeout:g}s; its process group was SIGKILLed"
        try:
            out, _ = proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            out = b""
    text = (out or b"").decode(errors="replace")[-RESET_OUTPUT_TAIL:]
    return {"exit": proc.returncode, "output": text, "error": error}


def find_nfs_servers(conf: str, proc_root: Path = PROC) -> list[int]:
    """ganesha.nfsd processes of this node started with `-f CONF` (node.ganesha.stray_pids). In the
    lab all nodes share one /proc: a server of the same VFS on another node is not ours."""
    from node.ganesha import stray_pids

    mine = {pid for pid, _other in node_pids(proc_root)}
    return [pid for pid in stray_pids(Path(conf), proc_root) if pid in mine]


def host_actions(interface: str) -> Actions:
    from node.vip import VipInterface  # pyroute2 only where the host is really touched

    iface = VipInterface(interface)  # fails at start-up, not at fence time, if the interface is wrong

    def remove_vip(vip: ipaddress.IPv4Interface) -> str:
        present = iface.has(vip)
        iface.remove(vip)
        return f"vip {vip.with_prefixlen} removed from {interface}" if present else f"vip {vip.ip} not present"

    return Actions(remove_vip=remove_vip, kill_server=kill_nfs_server, find_servers=find_nfs_servers,
                   fs_devices=fs_devices, mounted=still_mounted, umount=run_umount, find_holders=find_holders,
                   kill_holder=kill_holder, reset=run_reset)


def dry_run_actions(interface: str) -> Actions:
    unmounted: set[str] = set()

    def mounted(mountpoint: str | None, _devs: Devices) -> list[str]:
        return [mountpoint] if mountpoint is not None and mountpoint not in unmounted else []

    def umount(path: str, _timeout: float) -> None:
        unmounted.add(path)

    return Actions(remove_vip=lambda vip: f"would remove VIP {vip.with_prefixlen} from {interface}",
                   kill_server=lambda pid: f"would kill nfs server {pid}",
                   find_servers=lambda _conf: [], fs_devices=lambda _mp, _dev: frozenset(),
                   mounted=mounted, umount=umount, find_holders=lambda _devs: [],
                   kill_holder=lambda _pid, _devs: False,
                   reset=lambda argv, _timeout: {"exit": None, "output": "", "error": None})


# --- real time (rule 9) ---------------------------------------------------------------------------


MCL_CURRENT, MCL_FUTURE = 1, 2
M_ARENA_MAX = -8  # glibc mallopt parameter


def make_realtime(priority: int = RT_PRIORITY) -> list[str]:
    """SCHED_FIFO at `priority`, else nice -20; then mlockall. Returns what it got, for the log;
    never raises. Call before any thread starts: threads inherit policy and nice value."""
    got = []
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        got.append(f"SCHED_FIFO priority {priority}")
    except (OSError, AttributeError) as exc:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -20)
            got.append(f"nice -20 (no SCHED_FIFO: {exc})")
        except OSError as exc2:
            got.append(f"normal priority (no SCHED_FIFO: {exc}; no nice -20: {exc2})")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        # One malloc arena: glibc maps 64 MiB per thread arena, and MCL_FUTURE would lock them all.
        with contextlib.suppress(AttributeError):
            libc.mallopt(M_ARENA_MAX, 1)
        if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:
            got.append("memory locked")
        else:
            got.append(f"memory not locked ({os.strerror(ctypes.get_errno())})")
    except (OSError, AttributeError) as exc:
        got.append(f"memory not locked ({exc})")
    return got


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
        self._eof = False
        self._workers: list[threading.Thread] = []

    def fence_due(self) -> None:
        """Start the fences that are due (rule 2) or asked for (op fence), VIPs first."""
        nxt = self.state.next_deadline()
        if nxt is not None and nxt <= self.clock():
            self.drain()  # a hold already in the pipe counts: the agent sent it before we judge it late
        now = self.clock()
        due = [(h, f"deadline passed by {now - h.deadline:.3f} s", False) for h in self.state.take_due(now)]
        asked = [(h, f"agent asked: {why}" if why else "agent asked", True) for h, why in self.state.take_requests()]
        if not due and not asked:
            return
        reasons = {id(h): why for h, why, _ in due + asked}
        tickets = {id(h): self.state.begin(h, requested) for h, _, requested in due + asked}
        jobs = self.fencer.start([h for h, _, _ in due + asked], lambda h: reasons[id(h)], lambda h: tickets[id(h)])
        worker = threading.Thread(target=self.fencer.complete_all, args=(jobs, self._end),
                                  name="fence-worker", daemon=True)
        worker.start()
        self._workers = [w for w in self._workers if w.is_alive()] + [worker]

    def _end(self, job: FenceJob) -> None:
        if job.ticket is not None:
            self.state.end(job.ticket)

    def fence_everything(self, reason: str) -> None:
        helds = self.state.take_all() + [h for h, _ in self.state.take_requests()]
        self.fencer.complete_all(self.fencer.start(helds, lambda _h: reason))
        self.join_workers()

    def join_workers(self, timeout: float | None = None) -> bool:
        """True when every fence worker has ended (within `timeout`, if given)."""
        end = None if timeout is None else time.monotonic() + timeout
        for w in self._workers:
            w.join(None if end is None else max(0.0, end - time.monotonic()))
        return not any(w.is_alive() for w in self._workers)

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
                for error in msg.errors:
                    log.error("ignoring a bad hold: %s", error)
                if not self.state.apply(msg, self.clock()):
                    log.debug("ignoring %s of %s epoch %d (an older or fenced holding, or nothing held)",
                              msg.op, msg.vfs, msg.epoch)
                    if msg.op == "fence":
                        log.warning("ignoring the agent's fence of %s epoch %d: no such holding held", msg.vfs,
                                    msg.epoch)
            except BadMessage as exc:
                log.error("ignoring bad message %r: %s", line[:200], exc)
            if self.state.exit_requested:
                return

    def drain(self) -> None:
        """Apply whatever is already readable on stdin, without waiting; notes EOF."""
        with contextlib.suppress(OSError, ValueError):  # ValueError: no stdin at all (tests)
            while not self._eof and not self.state.exit_requested and select.select([self.fd], [], [], 0)[0]:
                data = os.read(self.fd, 65536)
                if not data:
                    self._eof = True
                    return
                self.feed(data)

    def _clean_exit(self) -> int:
        log.info("clean exit requested by the agent")
        if not self.join_workers(self.fencer.release_bound + 1.0):
            log.error("exiting on the agent's request while the fence of %s is not complete",
                      ", ".join(self.state.running()) or "a VFS")
        return 0

    def run(self, wake_fd: int | None = None) -> int:
        while True:
            self.fence_due()
            if self._eof:  # seen while draining
                self.fence_everything(REASON_EXITED)
                return 0
            if self.state.exit_requested:
                return self._clean_exit()
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
                return self._clean_exit()


def _reset_command_arg(text: str) -> tuple[str, ...]:
    try:
        return check_reset_command(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise argparse.ArgumentTypeError(f"--reset-command must be a JSON list of strings: {exc}") from None


def _release_bound_arg(text: str) -> float:
    try:
        return check_release_bound(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.guard", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--interface", required=True)
    parser.add_argument("--dry-run", action="store_true", help="record what would be done, touch nothing")
    parser.add_argument("--release-bound", type=_release_bound_arg, default=DEFAULT_RELEASE_BOUND,
                        help="T_release in seconds: escalate at T/2, reset command bounded by T/2")
    parser.add_argument("--reset-command", type=_reset_command_arg, default=(),
                        help='JSON argv of the last escalation, e.g. ["/usr/local/sbin/reset-node"]')
    parser.add_argument("--nfs-workroot", type=Path, default=None,
                        help="per-VFS Ganesha work dirs (default STATE_DIR/nfs)")
    parser.add_argument("--watchdog", action="store_true", help="the agent has a hardware watchdog armed")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                        help="the agent's log_level at its start (default INFO)")
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
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
    from node import logsetup

    logsetup.configure(logging.getLevelName(args.log_level), args.log_format, "nfs-ha-guard",
                       "%(asctime)s nfs-ha-guard[%(process)d] %(levelname)s %(message)s")
    os.chdir("/")  # never hold a filesystem through our own cwd
    args.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        actions = dry_run_actions(args.interface) if args.dry_run else host_actions(args.interface)
    except Exception as exc:
        log.error("cannot start: %s", exc)
        return 2
    threading.stack_size(THREAD_STACK)
    realtime = make_realtime()  # after the imports, before any thread
    fencer = Fencer(actions, args.state_dir, args.dry_run, args.release_bound, args.reset_command, args.watchdog,
                    args.nfs_workroot, agent_pid=os.getppid())
    guard = Guard(GuardState(), fencer, sys.stdin.fileno(), terminated=terminated)
    log.info("guarding (state dir %s, interface %s, release bound %gs, reset command %s%s%s); %s",
             args.state_dir, args.interface, args.release_bound, list(args.reset_command) or "none",
             ", watchdog" if args.watchdog else "", ", dry run" if args.dry_run else "", ", ".join(realtime))
    return guard.run(wake_r)


# --- the agent's side ---------------------------------------------------------------------------


class GuardClient:
    """Starts the guard and talks to it. Writes never block the agent (except fence_now, up to 1 s):
    the pipe is non-blocking, and a message that does not fit is dropped (the next hold restates
    everything) and makes alive() False until a write succeeds again. Safe to call from several
    threads. ValueError at once for a bad release_bound or reset_command."""

    def __init__(self, state_dir: Path | str, interface: str, dry_run: bool = False,
                 stderr: int | None = None, python: str = sys.executable,
                 release_bound: float = DEFAULT_RELEASE_BOUND, reset_command: Sequence[str] = (),
                 watchdog: bool = False, nfs_workroot: Path | str | None = None, log_level: str = "INFO",
                 log_format: str = "text") -> None:
        self.release_bound = check_release_bound(release_bound)
        reset = check_reset_command(reset_command)
        argv = [python, "-m", "node.guard", "--state-dir", str(state_dir), "--interface", interface,
                "--release-bound", repr(self.release_bound), "--log-level", log_level.upper(),
                "--log-format", log_format]
        if reset:
            argv += ["--reset-command", json.dumps(list(reset))]
        if nfs_workroot is not None:
            argv += ["--nfs-workroot", str(nfs_workroot)]
        if watchdog:
            argv.append("--watchdog")
        if dry_run:
            argv.append("--dry-run")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])  # so `-m node.guard` imports this very tree
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # start_new_session: a SIGKILL of the agent's process group (or a terminal's ^C) must not
        # take the guard with it. The write end of the pipe is close-on-exec, so only the agent holds
        # it: when the agent dies, the guard sees EOF.
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                     start_new_session=True, close_fds=True, env=env, cwd="/")
        assert self.proc.stdin is not None
        os.set_blocking(self.proc.stdin.fileno(), False)
        self._lock = threading.Lock()
        self._broken = False
        self._stalled = False

    def _send(self, msg: dict[str, Any], wait: float = 0.0) -> bool:
        return self._write((json.dumps(msg, separators=(",", ":")) + "\n").encode(), wait)

    def _write(self, data: bytes, wait: float = 0.0) -> bool:
        """One message line; False if it could not be written (see the class docstring)."""
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
             epoch: int = 0, device: str | None = None) -> bool:
        return self._send({"op": "hold", "vfs": vfs, "vip": vip, "deadline": deadline,
                           "mountpoint": mountpoint, "nfs_pid": nfs_pid, "epoch": epoch, "device": device})

    def hold_many(self, holds: Sequence[dict[str, Any]]) -> bool:
        """Several holds (dicts with the keys of hold()'s message), in as few "holds" lines as fit
        PIPE_BUF (so each write is still all or nothing); each hold is encoded once."""
        ok, batch, size = True, [], 0
        for item in holds:
            text = json.dumps(item, separators=(",", ":"))
            if batch and size + len(text) > HOLDS_BYTES:
                ok = self._write_holds(batch) and ok
                batch, size = [], 0
            batch.append(text)
            size += len(text) + 1
        if batch:
            ok = self._write_holds(batch) and ok
        return ok

    def _write_holds(self, texts: list[str]) -> bool:
        return self._write(('{"op":"holds","holds":[' + ",".join(texts) + "]}\n").encode())

    def release(self, vfs: str, epoch: int = 0) -> bool:
        return self._send({"op": "release", "vfs": vfs, "epoch": epoch})

    def fence_now(self, vfs: str, epoch: int, reason: str) -> bool:
        """Ask the guard to fence this holding at once (the agent could not); waits up to 1 s for pipe room."""
        return self._send({"op": "fence", "vfs": vfs, "epoch": epoch, "reason": reason}, wait=1.0)

    def ping(self) -> bool:
        return self._send({"op": "ping"})

    def alive(self) -> bool:
        return self.proc.poll() is None and not self._broken and not self._stalled

    def close_clean(self, timeout: float | None = None) -> int | None:
        """Clean shutdown: the guard forgets everything and exits without fencing (a fence already
        running is finished first, up to release_bound + 1 s). Returns its exit code."""
        wait = self.release_bound + 2.0 if timeout is None else timeout
        self._send({"op": "exit"}, wait=min(wait, 5.0))
        with self._lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                with contextlib.suppress(OSError):
                    self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            log.error("fence guard (pid %d) did not exit; killing it", self.proc.pid)
            self.proc.kill()
            return self.proc.wait(timeout=5.0)


if __name__ == "__main__":
    sys.exit(main())
