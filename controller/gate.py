"""Pacing of one agent's takeovers: a backoff per VFS it failed to take over, and a gate that lets at
most a few takeovers run at once, first choices first (bench/scale: a hundred takeovers at once on two
cores starve the keepalives). Pure bookkeeping: no etcd, no host actions."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from controller.takeover import StepFailed

SLOT_RETRY_SECONDS = 1.0  # how often a takeover waiting for its slot back checks whether the agent stops
# A busy first candidate keeps a VFS from lower-ranked ones while it makes progress: BUSY_SECONDS and
# BACKLOG_SECONDS per VFS it has still to take over since its backlog last moved (~30 ms per takeover
# on a loaded 2-core node, bench/scale), at most MAX_BACKLOG_WAIT after the VFS became pending.
BACKLOG_SECONDS = 0.05
BUSY_SECONDS = 1.0
MAX_BACKLOG_WAIT = 15.0


@dataclass
class Backoff:
    """VFS this node failed to take over, and until when it stands back (monotonic)."""

    initial: float = 5.0
    maximum: float = 60.0
    entries: dict[str, tuple[float, float, str]] = field(default_factory=dict)  # until, length, reason
    on_change: Callable[[], None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail(self, vfs: str, reason: str) -> None:
        with self._lock:
            _, length, _ = self.entries.get(vfs, (0.0, self.initial / 2, ""))
            length = min(self.maximum, length * 2)
            self.entries[vfs] = (time.monotonic() + length, length, reason)
        self._changed()

    def succeed(self, vfs: str) -> None:
        with self._lock:
            changed = self.entries.pop(vfs, None) is not None
        if changed:
            self._changed()

    def remaining(self, vfs: str) -> float:
        with self._lock:
            entry = self.entries.get(vfs)
        if entry is None:
            return 0.0
        left = entry[0] - time.monotonic()
        return max(0.0, left)

    def published(self) -> dict[str, str]:
        """What other nodes see in this node's registration (expired entries included
        until the VFS is retried, so nobody hands the VFS back too early)."""
        with self._lock:
            return {vfs: reason for vfs, (_, _, reason) in self.entries.items()}

    def _changed(self) -> None:
        if self.on_change:
            self.on_change()


class TakeoverGate:
    """At most `limit` takeovers of one agent at a time, first choices first.

    A node that must take over a hundred VFS at once (a peer died, or all specs were written at
    once) would otherwise run a hundred takeovers in as many threads: they share two cores with the
    keepalives, which then come too late and fence what was just taken over. A takeover in which
    this node is a lower-ranked candidate waits while any first-choice takeover waits here, so it
    does not push a VFS away from a first candidate that is merely busy. Not guaranteed: any order
    among takeovers of the same rank."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._cond = threading.Condition()
        self._active = 0
        self._first_waiting = 0
        self._in_flight = 0  # takeovers between their first enter() and their finish(), waits included

    def busy(self) -> bool:
        """A takeover is waiting for a slot, running, or waiting outside its slot (tracing defers its
        exports while this is so: controller/tracing.py)."""
        return self._in_flight > 0

    def started(self) -> None:
        with self._cond:
            self._in_flight += 1

    def finished(self) -> None:
        with self._cond:
            self._in_flight -= 1

    def enter(self, rank: int, timeout: float) -> bool:
        """True once a slot is this caller's (leave() it); False after `timeout`."""
        with self._cond:
            if rank == 0:
                self._first_waiting += 1
            try:
                ok = self._cond.wait_for(
                    lambda: self._active < self.limit and (rank == 0 or self._first_waiting == 0), timeout)
            finally:
                if rank == 0:
                    self._first_waiting -= 1
                    self._cond.notify_all()  # lower-ranked ones may be free to go now
            if ok:
                self._active += 1
            return ok

    def leave(self, rank: int) -> None:
        del rank
        with self._cond:
            self._active -= 1
            self._cond.notify_all()


class GateSlot:
    """One takeover's use of the gate: entered once, left once, and left for the duration of a wait
    (a takeover sleeping T_release must not keep VIP-only and other takeovers waiting; fifty ARP
    probes of a node that lost a peer wait for answers together, not sixteen at a time). No gate:
    every call does nothing."""

    def __init__(self, gate: TakeoverGate | None, rank: int, cancelled: Callable[[], bool]) -> None:
        self.gate, self.rank, self.cancelled = gate, rank, cancelled
        self.held = False
        if gate is not None:
            gate.started()
        self._finished = gate is None

    def enter(self, timeout: float) -> bool:
        if self.gate is None:
            return True
        self.held = self.gate.enter(self.rank, timeout)
        return self.held

    def finish(self) -> None:
        """The takeover is over (or never started): leave the slot and stop counting as in flight."""
        self.leave()
        if not self._finished and self.gate is not None:
            self._finished = True
            self.gate.finished()

    def leave(self) -> None:
        if self.gate is not None and self.held:
            self.held = False
            self.gate.leave(self.rank)

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        """Without the slot while the body runs; back in it afterwards (StepFailed if the agent stops).
        A body that fails ends the takeover: it does not wait for a slot again."""
        self.leave()
        yield
        while self.gate is not None and not self.held:
            if self.cancelled():
                raise StepFailed("the agent is stopping; gave up waiting for a takeover slot")
            self.enter(SLOT_RETRY_SECONDS)


class PlacementWait:
    """When a candidate of one VFS may try to take it over (pure; the caller passes the time).

    A candidate of rank r waits r * rank_delay from when it first found the VFS to take over, so the
    better candidates get their chance first. A lower-ranked one also leaves the VFS to the node it
    waits for (`head`: ViewIndex.waiting_on, the first live candidate) while that node is busy with its
    backlog (ViewIndex.backlog, this VFS included): BUSY_SECONDS and BACKLOG_SECONDS per VFS left, after
    the backlog was last seen to move, at most MAX_BACKLOG_WAIT after the VFS became pending. A node
    taking over a hundred VFS at once is busy, not gone, and a VFS taken from it stays where it went (no
    failback); counted from the start instead, the last VFS of a node that needed 3 s for its hundred
    went to a second candidate (bench/scale). A stuck node stops moving its backlog and loses the VFS;
    a dead one leaves the live set within its TTL and is no longer the head."""

    def __init__(self) -> None:
        self.pending_since: float | None = None
        self._head_seen: tuple[str, int, float] | None = None  # (head, its backlog, when first seen so)

    def reset(self) -> None:
        """The VFS is no longer this node's to take (or a takeover starts): the next wait starts anew."""
        self.pending_since, self._head_seen = None, None

    def until(self, now: float, rank: int, rank_delay: float, head: str | None, backlog: int) -> float:
        """Monotonic time before which this candidate does not try (`head` None: no other node to wait for)."""
        if self.pending_since is None:
            self.pending_since = now
        start = self.pending_since + rank * rank_delay
        if rank == 0 or head is None:
            self._head_seen = None
            return start
        if self._head_seen is None or self._head_seen[:2] != (head, backlog):
            self._head_seen = (head, backlog, now)  # first look, or progress since the last one
        busy = min(self._head_seen[2] + BUSY_SECONDS + backlog * BACKLOG_SECONDS, self.pending_since + MAX_BACKLOG_WAIT)
        return max(start, busy)
