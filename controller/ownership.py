"""Ownership of a VFS: the per-VFS etcd lease, its keepalive, and the self-fence rule.

Invariants (the safety argument is in docs/protocol.md):

1. One holder. A node owns a VFS only while `<prefix>/vfs/<vfs>/owner` exists, bound to
   that node's lease for the VFS. The key is only ever created by a transaction that
   compares `create_revision == 0`, so at most one node at a time can create it; its
   create_revision is the epoch (fencing token) of that ownership.
2. Self-fence before expiry. etcd expires a lease TTL seconds after it *received* the
   last keepalive. A keepalive *sent* at local monotonic time t is received after t, so
   the lease cannot expire before t + TTL. The holder keeps `deadline = t_ack + TTL -
   margin`, where t_ack is the send time of the newest acknowledged keepalive (or of the
   grant), and drops the VIP as soon as monotonic time passes the deadline. Therefore the
   VIP is gone strictly before the owner key can be deleted by expiry and before any other
   node can create it.
3. Fenced is final. Once fenced, a Holding never raises its VIP again; serving again
   needs a fresh acquire transaction (a new Holding with a new epoch).
4. Raising the VIP and fencing are serialised by one lock per Holding, and raising
   checks the deadline under that lock, so a fence can never be overtaken by a raise.
5. Only monotonic time is used here: a wall-clock jump can neither extend nor shorten
   a holding.
6. The fence guard (node/guard.py) acts for a holding at guard_deadline(): after the agent's own
   deadline (never racing its fence monitor), still before the lease can expire. No renewal reaches
   the guard after the holding's removal (LeaseKeeper._guard_lock): it would hold a released VFS again.
7. A fenced holding whose VIP could not be removed is never forgotten. fence() marks it fenced
   first (so it never serves again, invariant 3) and records the error in `drop_error`; the fence
   monitor retries the drop until it succeeds (20 ms after a failure, doubling up to
   FULL_SCAN_SECONDS, so many failing VIPs cannot crowd out a new fence), even after the holding
   was removed from the keeper (until a new holding of the same VFS is added: the VIP is then
   that one's), and
   keeps it in holdings() so the watchdog keeps protecting it. The first failure is escalated at
   once through `on_drop_failed` (the agent has the guard fence the VFS), on a thread of its own:
   the fence monitor and the answer reader never wait for the guard. `dropped_at_ns` is set
   only once the VIP is really down.
8. No holding can stop the others being kept alive or fenced: the keepalive loop and the fence
   monitor catch, log and count (controller.loops) any exception per holding, and per pass, and go
   on; they end only on stop().
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from controller import loops, metrics
from controller.coordination import Coordination, KeyStore
from controller.status import wall_clock
from controller.store import StoreError

log = logging.getLogger(__name__)

FENCE_CHECK_SECONDS = 0.02
FULL_SCAN_SECONDS = 0.25  # at the latest, the fence monitor looks at every holding (drops to retry)
RENEWAL_GATHER = 0.005  # renewals told to the guard together: one round's answers arrive within ms
KEEPALIVE_RETRY = 0.05  # after a keepalive got no answer (at most the interval, TTL/4)


class LeaseStreamLike(Protocol):
    """What the keeper needs of a store's lease_stream() (leasestream.H2LeaseStream, store.CallingLeaseStream)."""

    def send_many(self, lease_ids: Sequence[int], sending: Callable[[int], None]) -> None: ...

    def reset(self) -> None:
        """End the current generation; the stream tells its on_ended callback so."""

    def close(self) -> None: ...


class Fenced(RuntimeError):
    """The holding passed its self-fence deadline or lost its lease."""


def fence_margin(ttl: float) -> float:
    """How long before the earliest possible expiry the holder gives up.

    A quarter of the TTL, at least 0.3 s: enough for a missed keepalive to be noticed
    and the VIP to be deleted (a netlink call) with time to spare.
    """
    return max(0.3, ttl / 4)


def guard_deadline(h: Holding) -> float:
    """When the guard acts for this holding: half a fence margin after the agent's own deadline.

    The guard is the backstop for an agent that cannot act. At the very same moment as the agent's
    fence monitor it races it: a keepalive acknowledged just before the deadline can reach the
    guard just after it, and the guard would fence a holding the agent goes on serving (VIP
    removed, server killed). etcd cannot expire the lease before deadline + margin, so the guard
    still acts margin/2 (>= 0.15 s) before anyone else can own the VFS."""
    return h.deadline + fence_margin(h.ttl) / 2


@dataclass
class Holding:
    """One node's ownership of one VFS, from its acquire transaction to its end."""

    vfs: str
    lease_id: int
    ttl: int
    granted_at: float  # monotonic send time of the grant request
    drop: Callable[[], None]  # takes the VIP down at once; called by fence()
    epoch: int = 0
    on_fence: Callable[[Holding], None] | None = None
    # Told of the first failure to take the VIP down (LeaseKeeper.add sets it); None: log CRITICAL.
    on_drop_failed: Callable[[Holding, BaseException], None] | None = None
    fence_reason: str = ""
    fenced_at_ns: int = 0  # wall clock, only for the trace of the fence
    dropped_at_ns: int = 0  # wall clock; 0 until the VIP is really down (invariant 7)
    drop_error: str = ""  # the last failure to take the VIP down, kept after a retry succeeds
    drop_failures: int = 0
    drop_retry_at: float = 0.0  # monotonic; the fence monitor's next retry (backing off, invariant 7)
    _deadline: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _fenced: bool = False
    _retired: bool = False  # being released: the VIP is going down on purpose
    _drop_lock: threading.Lock = field(default_factory=threading.Lock)  # one drop attempt at a time
    # The VFS's shared disk may be mounted on this node: from acquire until an unmount succeeded.
    # The hardware watchdog covers a fenced holding until this is False (node/watchdog.py).
    holds_disk: bool = False
    last_ack: float = 0.0
    # What the fence guard needs to fence this holding on its own, fixed at acquire (the spec held):
    # the VIP with its prefix length, and the shared block device (None: a VIP-only VFS).
    vip: str = ""
    device: str | None = None
    epoch_base: int = 0  # the operator's epoch base as read by the claim (storage epoch = base + epoch)

    def __post_init__(self) -> None:
        self._deadline = self.granted_at + self.ttl - fence_margin(self.ttl)
        self.last_ack = self.granted_at

    @property
    def fenced(self) -> bool:
        return self._fenced

    @property
    def deadline(self) -> float:
        return self._deadline

    def acked(self, sent_at: float, ttl: int) -> None:
        """A keepalive sent at `sent_at` was acknowledged with a fresh TTL."""
        with self._lock:
            if self._fenced:
                return
            self.last_ack = max(self.last_ack, sent_at)
            self._deadline = max(self._deadline, sent_at + ttl - fence_margin(ttl))

    def guarded(self, action: Callable[[], None]) -> None:
        """Run `action` (raising the VIP) only while the holding is valid (invariant 4)."""
        with self._lock:
            if self._fenced or self._retired or time.monotonic() >= self._deadline:
                why = "fenced" if self._fenced else "being released" if self._retired else "past its deadline"
                raise Fenced(f"{self.vfs}: the holding is {why}; not raising the VIP")
            action()

    def retire(self) -> None:
        """A release starts: from now on nothing may raise or announce the VIP (the lease and the
        guard still cover the VFS until the release has finished)."""
        with self._lock:
            self._retired = True

    def fence(self, reason: str) -> bool:
        """Fence now: mark fenced, then take the VIP down. True if newly fenced. Never raises.

        The flag is set under the lock, so a raise in progress finishes first and is then
        undone by `drop`; a raise that has not started yet will refuse (invariant 4). If the
        drop fails the holding stays fenced, the failure is escalated and the drop is retried
        by the fence monitor (invariant 7).
        """
        with self._lock:
            if self._fenced:
                return False
            self._fenced = True
            self.fence_reason = reason
            self.fenced_at_ns = time.time_ns()
        log.warning("%s: self-fence: %s", self.vfs, reason)
        metrics.fenced(reason)
        self.retry_drop()
        if self.on_fence:
            with loops.guarded("on-fence", self.vfs, log):
                self.on_fence(self)
        return True

    @property
    def vip_pending(self) -> bool:
        """Fenced, but the VIP is not known to be down yet (invariant 7)."""
        return self._fenced and self.dropped_at_ns == 0

    def retry_drop(self) -> bool:
        """Take the VIP of a fenced holding down if that has not succeeded yet. True once it is down.
        Never raises; the first failure is escalated (invariant 7)."""
        with self._drop_lock:
            if not self.vip_pending:
                return self._fenced
            try:
                self.drop()
            except Exception as exc:
                self.drop_error = f"{type(exc).__name__}: {exc}"
                self.drop_failures += 1
                failed: BaseException | None = exc
                first = self.drop_failures == 1
            else:
                self.dropped_at_ns = time.time_ns()
                failed, first = None, False
            if failed is not None:  # the next retry: 20 ms after the first failure, doubling up to 0.25 s
                self.drop_retry_at = time.monotonic() + min(
                    FULL_SCAN_SECONDS, FENCE_CHECK_SECONDS * 2 ** min(self.drop_failures - 1, 8))
        if failed is not None:
            loops.record("vip-drop", failed, self.vfs, log)
            if first:
                self._escalate(failed)
            return False
        if self.drop_failures:
            log.warning("%s: VIP down after %d failed attempts", self.vfs, self.drop_failures)
        return True

    def _escalate(self, exc: BaseException) -> None:
        if self.on_drop_failed is None:
            log.critical("%s: fenced, but its VIP could not be removed (%s: %s); retrying",
                         self.vfs, type(exc).__name__, exc)
            return
        with loops.guarded("vip-drop-escalation", self.vfs, log):
            self.on_drop_failed(self, exc)

    def valid(self) -> bool:
        """Still allowed to claim the VIP: not fenced, not being released, before the deadline.

        Checked right before anything that announces the VIP, so a thread that was frozen
        (SIGSTOP) and resumes after the deadline stays quiet even before the fence
        monitor has run.
        """
        return not self._fenced and not self._retired and time.monotonic() < self._deadline

    def overdue(self, now: float) -> bool:
        return not self._fenced and now >= self._deadline


# --- the steps of an ownership: acquire and release (renewal and fencing are the keeper's) -------

Observe = Callable[[str], AbstractContextManager[Any]]  # a step's name -> a context around it (a span)


def _unobserved(_step: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def acquire(store: Coordination, vfs: str, node: str, ttl: int, status: dict[str, Any], status_revision: int,
            new_holding: Callable[[int, int, float], Holding], observe: Observe = _unobserved) -> Holding | None:
    """Grant a lease and claim the VFS with it (invariant 1): the new Holding, with its epoch; None if
    another node owns the VFS or its status changed since `status_revision` (nothing written).

    The holding's deadline counts from the grant's send time (invariant 2). The caller adds it to the
    keeper. A lease that did not become an owner's is revoked; StoreError is raised after that."""
    sent_at = time.monotonic()
    with observe("lease_grant"):
        lease_id, granted = store.grant(ttl)
    h = new_holding(lease_id, granted, sent_at)
    # The VIP and the device it is served with: while this key exists no other spec may claim either
    # (controller/view.py, the clash rules), whatever the specs say by then.
    owner = {"node": node, "since": wall_clock(), "lease": f"{lease_id:x}", "ttl": granted, "vip": h.vip,
             "device": h.device}
    try:
        with observe("owner_txn"):
            claim = store.claim(vfs, owner, lease_id, status, status_revision)
    except StoreError:
        revoke_quietly(store, vfs, lease_id)
        raise
    if claim is None:
        revoke_quietly(store, vfs, lease_id)  # somebody else won the race; fine
        return None
    h.epoch, h.epoch_base = claim.epoch, claim.epoch_base
    return h


def release(store: Coordination, vfs: str, epoch: int, lease_id: int, final_status: dict[str, Any],
            observe: Observe = _unobserved) -> None:
    """Delete the owner key, if it is still this epoch's, with a final status; then revoke the lease.
    Only after the VIP is down and the disk unmounted (the caller's part). Never raises: a failure
    leaves the key to the lease's expiry."""
    with observe("owner_release"):
        try:
            store.release(vfs, epoch, final_status)
        except StoreError as exc:
            log.warning("%s: could not delete owner key: %s", vfs, exc)
        if lease_id:
            revoke_quietly(store, vfs, lease_id)


def revoke_quietly(store: Coordination | KeyStore, vfs: str, lease_id: int) -> None:
    try:
        store.revoke(lease_id)
    except StoreError as exc:
        log.warning("%s: revoking lease %x failed (it will expire): %s", vfs, lease_id, exc)


class LeaseKeeper:
    """Keeps every lease of this agent alive and fences holdings whose deadline passes.

    Threads: the keepalive loop sends the keepalives that are due, in one batch, on one stream for all
    leases (controller/leasestream.py; it never waits for an answer, so one lease's slow answer delays
    no other lease's request); the stream's reader applies answers, each matched to the oldest
    unanswered request of its lease on the same stream generation (invariant 2: the deadline comes
    from that request's send time); the fence monitor, which never touches the network, so a hung
    etcd cannot delay a fence; and "guard-renewals", which tells the guard the renewed deadlines in
    batches. A stream that answers nothing for an interval (TTL/4) while a request waits is reset (to
    another endpoint when there is one); answers of a reset stream never count. None of them ends
    before stop(), whatever one holding raises (invariant 8).
    """

    def __init__(self, store: Coordination | KeyStore, on_deadline: Callable[[Holding], None] | None = None,
                 on_removed: Callable[[Holding], None] | None = None,
                 on_drop_failed: Callable[[Holding, BaseException], None] | None = None,
                 on_deadlines: Callable[[list[Holding]], None] | None = None) -> None:
        self._store = store
        # Told every new deadline of a holding, and when one ends (the fence guard listens). Renewals
        # are told in batches, RENEWAL_GATHER after the first answer, by a thread of their own
        # (on_deadlines, or on_deadline for each): the guard acts fence_margin/2 (>= 0.15 s) after a
        # deadline, so a renewal told a few ms late still comes in time.
        self._on_deadline = on_deadline or (lambda _h: None)
        self._on_deadlines = on_deadlines or self._each_deadline
        self._renewed: dict[int, Holding] = {}  # acknowledged since the last batch (under _ka_lock)
        self._renewal = threading.Event()
        # The fence monitor scans every holding only when one can be due: at the earliest deadline it
        # saw, after add(), while a VIP drop is to be retried, and every FULL_SCAN_SECONDS at the
        # latest (a holding fenced on another thread whose drop failed). Deadlines only grow.
        self._scan_from = 0.0
        self._drops_pending = False
        self._on_removed = on_removed or (lambda _h: None)
        # Told once per holding that its VIP could not be removed (the agent has the guard fence it).
        self._on_drop_failed = on_drop_failed or _drop_failed_critical
        self._holdings: dict[str, Holding] = {}
        # Removed from the keeper while fenced with the VIP still up: the drop is retried (invariant 7).
        self._undropped: dict[str, Holding] = {}
        self._extra: dict[int, tuple[int, Callable[[int], None]]] = {}
        self._lock = threading.Lock()
        self._guard_lock = threading.Lock()  # renewal batches to the guard vs. remove() (see there)
        # Held while retrying drops, and by add(): once add() of a new holding of a VFS returns, no
        # retry for an older holding of it can take the (same) VIP down any more.
        self._retry_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        # Keepalives: one stream for all leases (created on the keepalive thread), the requests it has
        # not answered yet per lease (generation, send time, owner) and failures in a row per lease.
        self._stream: LeaseStreamLike | None = None
        self._ka_lock = threading.Lock()  # never held while calling the stream (it calls back)
        self._inflight: dict[int, collections.deque[tuple[int, float, Holding | Callable[[int], None]]]] = {}
        self._failures: dict[int, int] = {}
        self._lost: set[int] = set()  # leases whose request went down with a stream: retry soon
        self._last_answer_at = time.monotonic()  # of any answer on the current stream (stuck or slow?)

    def _escalate_elsewhere(self, h: Holding, exc: BaseException) -> None:
        """on_drop_failed runs on a thread of its own: telling the guard may wait for pipe room (up to 1 s,
        GuardClient.fence_now), and the thread that found the failure is the fence monitor or the
        keepalive answer reader, neither of which may wait (another holding's fence, every answer)."""
        def escalate() -> None:
            with loops.guarded("vip-drop-escalation", h.vfs, log):
                self._on_drop_failed(h, exc)

        try:
            threading.Thread(target=escalate, name=f"escalate-{h.vfs}", daemon=True).start()
        except RuntimeError as err:  # "can't start new thread": say so loudly; the drop is still retried
            log.critical("%s: fenced, its VIP could not be removed (%s), and the fence guard could not be asked "
                         "(%s); retrying the drop", h.vfs, exc, err)

    def _each_deadline(self, holdings: list[Holding]) -> None:
        for h in holdings:
            with loops.guarded("guard-hold", h.vfs, log):
                self._on_deadline(h)

    def start(self) -> None:
        for target, name in ((self._keepalive_loop, "keepalive"), (self._fence_loop, "fence-monitor"),
                             (self._renewals_loop, "guard-renewals")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._renewal.set()
        for t in self._threads:
            t.join(timeout=5)

    def add(self, holding: Holding) -> None:
        if holding.on_drop_failed is None:
            holding.on_drop_failed = self._escalate_elsewhere
        with self._retry_lock, self._lock:
            old = self._undropped.pop(holding.vfs, None)
            self._holdings[holding.vfs] = holding
            self._scan_from = 0.0
        if old is not None and old is not holding:
            log.warning("%s: the new holding (epoch %d) takes over the VIP whose removal for epoch %d kept "
                        "failing (%s)", holding.vfs, holding.epoch, old.epoch, old.drop_error)
        with loops.guarded("guard-hold", holding.vfs, log):  # the next keepalive tells it again
            self._on_deadline(holding)
        self._wake.set()

    def tell_all(self) -> None:
        """Tell on_deadlines every holding kept now (a new guard starts with nothing), under _guard_lock
        like a renewal batch: a holding removed meanwhile is not held at the guard again. Fenced ones
        too, kept because their disk is still mounted or their VIP still up: their deadline has passed,
        so the new guard acts on them at once, as the old one was to (node/guard.py rule 2)."""
        with self._guard_lock:
            kept = self.holdings()
            if kept:
                with loops.guarded("guard-hold", f"{len(kept)} holdings", log):
                    self._on_deadlines(kept)

    def stream_endpoint(self) -> str:
        """host:port the keepalive stream uses now ("" before it connected, or for a store without one)."""
        where = getattr(self._stream, "where", None)
        return str(where()) if callable(where) else ""

    def holdings(self) -> list[Holding]:
        """Held VFSs, and fenced ones whose VIP is still up (the watchdog protects both)."""
        with self._lock:
            return [*self._holdings.values(), *(h for h in self._undropped.values() if h.vip_pending)]

    def remove(self, holding: Holding) -> None:
        """The holding has ended (released, or torn down after a loss): keep it alive no longer and tell
        on_removed (the guard forgets it). Called by the VFS's reconcile thread only, never by the fence
        monitor: it may wait for a renewal batch being sent to the guard (_guard_lock)."""
        with self._guard_lock:  # no renewal batch read before this can reach the guard after it
            with self._lock:
                removed = self._holdings.get(holding.vfs) is holding
                if removed:
                    del self._holdings[holding.vfs]
                    if holding.vip_pending:
                        self._undropped[holding.vfs] = holding
            if removed:
                if holding.vip_pending and holding.drop_error:
                    log.error("%s: removed while its VIP could not be taken down (%s); still retrying",
                              holding.vfs, holding.drop_error)
                elif holding.vip_pending:  # a fence on another thread is taking it down right now
                    log.debug("%s: removed while its fence is still taking the VIP down", holding.vfs)
                self._on_removed(holding)

    def add_plain(self, lease_id: int, ttl: int, on_lost: Callable[[int], None]) -> None:
        """Keep a lease alive that guards no VIP (the node registration)."""
        with self._lock:
            self._extra[lease_id] = (ttl, on_lost)
        self._wake.set()

    def remove_plain(self, lease_id: int) -> None:
        with self._lock:
            self._extra.pop(lease_id, None)

    def _fence_loop(self) -> None:
        while not self._stop.wait(FENCE_CHECK_SECONDS):
            try:
                self._fence_tick(time.monotonic())
            except Exception as exc:  # only a bug gets here: the loop must go on all the same
                loops.record("fence-monitor", exc, logger=log)

    def _fence_tick(self, now: float) -> None:
        with self._lock:
            if now < self._scan_from and not self._drops_pending:
                return
            held = list(self._holdings.values())
            self._scan_from = min(min((h.deadline for h in held if not h.fenced), default=now + FULL_SCAN_SECONDS),
                                  now + FULL_SCAN_SECONDS)
        # Fences first: a retried drop (a netlink call) must not delay another holding's fence.
        just_fenced: set[int] = set()
        for h in held:
            if h.overdue(now):
                just_fenced.add(id(h))  # its first drop attempt is now; the retry is next tick
                with loops.guarded("fence-monitor", h.vfs, log):
                    h.fence(f"no keepalive acknowledged in time (last acked send "
                            f"{now - h.last_ack:.2f}s ago, TTL {h.ttl}s)")
        # Then every VIP a fence could not take down (invariant 7). Under _retry_lock, so add() of a
        # new holding of the same VFS cannot slip in between choosing a holding and dropping its VIP.
        with self._retry_lock:
            with self._lock:
                for vfs, h in list(self._undropped.items()):
                    if not h.vip_pending:
                        del self._undropped[vfs]
                pending = [h for h in (*self._holdings.values(), *self._undropped.values())
                           if h.vip_pending and id(h) not in just_fenced and h.drop_retry_at <= now]
            for h in pending:
                with loops.guarded("fence-monitor", h.vfs, log):
                    if h.retry_drop():
                        with self._lock:
                            if self._undropped.get(h.vfs) is h:
                                del self._undropped[h.vfs]
            with self._lock:  # looked at on every tick while any is pending (each at its own backoff)
                self._drops_pending = any(h.vip_pending for h in (*self._holdings.values(), *self._undropped.values()))

    def _renewals_loop(self) -> None:
        """Tell the guard the renewed deadlines, in batches: its own thread, so a stalled guard pipe
        (GuardClient waits up to 1 s for a fence request) delays no fence and no keepalive."""
        while not self._stop.is_set():
            self._renewal.wait()
            self._stop.wait(RENEWAL_GATHER)  # the rest of a round's answers, which come together
            self._renewal.clear()
            with self._ka_lock:
                renewed, self._renewed = list(self._renewed.values()), {}
            # Only holdings still kept, checked and sent under _guard_lock: a holding removed meanwhile
            # has been released at the guard, and a renewal sent after that would hold it there again
            # (the guard would then fence a VFS this node no longer serves at its old deadline).
            with self._guard_lock:
                with self._lock:
                    live = [h for h in renewed if not h.fenced and self._holdings.get(h.vfs) is h]
                if live:
                    with loops.guarded("guard-hold", f"{len(live)} renewals", log):
                        self._on_deadlines(live)

    def _keepalive_loop(self) -> None:
        next_due: dict[int, float] = {}
        while not self._stop.is_set():
            try:
                self._keepalive_pass(next_due)
            except Exception as exc:  # only a bug gets here: the loop must go on all the same
                loops.record("keepalive", exc, logger=log)
                self._stop.wait(0.1)
                continue
            wait = min(next_due.values(), default=time.monotonic() + 1.0) - time.monotonic()
            self._wake.wait(max(0.01, wait))
            self._wake.clear()
        if self._stream is not None:
            self._stream.close()

    def _keepalive_pass(self, next_due: dict[int, float]) -> None:
        """Send the keepalives that are due, in one batch over the one stream (controller/leasestream.py).

        A lease due within half an interval goes with the batch (early is always safe: the deadline
        comes from the send time), so the leases fall into step and a round of 100 costs one write and
        one wake-up instead of 100. A stream that answers nothing for a lease's interval (TTL/4) while
        that lease's request waits is stuck: it is reset and every request left on it counts as lost.
        A lost or failed keepalive is retried soon, not an interval later (waiting timeout + interval
        would leave a single lost keepalive no second chance before the self-fence deadline, TTL -
        margin); further failures in a row back off, doubling up to the interval: etcd is down, not slow."""
        with self._lock:
            leases: dict[int, tuple[int, Holding | Callable[[int], None]]] = {
                h.lease_id: (h.ttl, h) for h in self._holdings.values() if not h.fenced}
            leases.update({lid: (ttl, cb) for lid, (ttl, cb) in self._extra.items()})
        now = time.monotonic()
        if self._stream is None:
            self._stream = self._new_stream()
        with self._ka_lock:
            lost, self._lost = self._lost, set()
        due: dict[int, tuple[float, Holding | Callable[[int], None]]] = {}
        for lease_id, (ttl, owner) in leases.items():
            interval = max(0.1, ttl / 4)
            if lease_id in lost:  # its request went down with a stream: retried soon, not an interval later
                next_due[lease_id] = min(next_due.get(lease_id, now), now + self._retry_after(lease_id, interval))
            due_at = next_due.get(lease_id, 0.0)
            if due_at <= now and self._oldest_unanswered(lease_id, now) >= interval \
                    and now - self._last_answer_at >= interval:
                # Nothing answered on the stream for an interval while this request waits: the stream
                # (or its endpoint) is stuck, not merely slow (a slow one still answers in order; giving
                # it up would lose every lease's answer in flight). Its end makes every request on it
                # lost (_stream_ended); they are retried on the next pass.
                log.debug("keepalive stream reset: no answer at all within %.2fs (lease %x waiting)",
                          interval, lease_id)
                self._stream.reset()
                self._wake.set()
                return
            # Early only while it is not failing: a retry keeps its backoff.
            if due_at <= now + (0.0 if self._failing(lease_id) else interval / 2):
                due[lease_id] = (interval, owner)
        if due:
            self._send(due, now, next_due)
        with self._ka_lock:
            for lease_id in list(next_due):
                if lease_id not in leases:
                    del next_due[lease_id]
                    self._failures.pop(lease_id, None)
                    self._inflight.pop(lease_id, None)

    def _send(self, due: dict[int, tuple[float, Holding | Callable[[int], None]]], now: float,
              next_due: dict[int, float]) -> None:
        """One batch of keepalives, all sent at `now`. If no stream could be opened, each counts as a
        failure of its lease and is retried soon; a stream that fails once they are queued tells
        _stream_ended (they are then lost, and retried soon too)."""
        assert self._stream is not None

        def sending(generation: int) -> None:
            with self._ka_lock:
                for lease_id, (_interval, owner) in due.items():
                    self._inflight.setdefault(lease_id, collections.deque()).append((generation, now, owner))

        sent = False
        with loops.guarded("keepalive", f"a batch of {len(due)}", log):
            try:
                self._stream.send_many(list(due), sending)
                sent = True
            except StoreError as exc:
                log.debug("keepalives of %d leases failed: %s", len(due), exc)
        if not sent:
            with self._ka_lock:
                for lease_id in due:
                    pending = self._inflight.get(lease_id)
                    if pending and pending[-1][1] == now:
                        pending.pop()
                    self._failures[lease_id] = self._failures.get(lease_id, 0) + 1
        for lease_id, (interval, _owner) in due.items():
            next_due[lease_id] = now + (interval if sent else self._retry_after(lease_id, interval))

    def _new_stream(self) -> LeaseStreamLike:
        return self._store.lease_stream(self._answered, self._stream_ended)  # type: ignore[no-any-return]

    def _oldest_unanswered(self, lease_id: int, now: float) -> float:
        """Seconds the oldest unanswered keepalive of a lease has waited (0: none)."""
        with self._ka_lock:
            pending = self._inflight.get(lease_id)
            return now - pending[0][1] if pending else 0.0

    def _failing(self, lease_id: int) -> bool:
        with self._ka_lock:
            return self._failures.get(lease_id, 0) > 0

    def _retry_after(self, lease_id: int, interval: float) -> float:
        with self._ka_lock:
            failures = self._failures.get(lease_id, 1)
        return min(interval, KEEPALIVE_RETRY * 2 ** min(failures - 1, 16))

    def _stream_ended(self, generation: int) -> None:
        """A stream generation ended (an error, or a reset): its unanswered requests never will be.
        Each counts as a failure of its lease, which is retried on the next pass (woken now)."""
        with self._ka_lock:
            self._last_answer_at = time.monotonic()  # the next stream gets a whole interval
            for lease_id, pending in self._inflight.items():
                kept = collections.deque(entry for entry in pending if entry[0] > generation)
                if len(kept) != len(pending):
                    self._inflight[lease_id] = kept
                    self._failures[lease_id] = self._failures.get(lease_id, 0) + 1
                    self._lost.add(lease_id)
        self._wake.set()

    def _answered(self, lease_id: int, ttl: int, generation: int) -> None:
        """etcd answered a keepalive (on the stream's thread): match it to its request, then act."""
        with self._ka_lock:
            pending = self._inflight.get(lease_id)
            while pending and pending[0][0] < generation:
                pending.popleft()  # left by an ended stream (normally gone already: _stream_ended)
            if not pending or pending[0][0] != generation:
                return  # a request given up on (stream reset): its send time is not known for sure
            _gen, sent_at, owner = pending.popleft()
            self._failures[lease_id] = 0
            self._last_answer_at = answered = time.monotonic()
        metrics.RENEW_SECONDS.observe(answered - sent_at)
        try:  # not loops.guarded: this runs 200 times a second at 100 leases, and an error is rare
            if isinstance(owner, Holding):
                if ttl > 0:
                    owner.acked(sent_at, ttl)  # before the guard can be told: it reads the new deadline
                    with self._ka_lock:
                        # by holding: an old holding's late answer must not hide a new one's
                        self._renewed[id(owner)] = owner
                    if not self._renewal.is_set():
                        self._renewal.set()
                else:
                    owner.fence("lease is gone in etcd (expired or revoked)")
            elif ttl <= 0:
                with self._lock:
                    self._extra.pop(lease_id, None)
                owner(lease_id)
        except Exception as exc:
            loops.record("keepalive", exc, owner.vfs if isinstance(owner, Holding) else f"lease {lease_id:x}", log)


def _drop_failed_critical(h: Holding, exc: BaseException) -> None:
    log.critical("%s: fenced, but its VIP could not be removed (%s: %s); retrying on every fence check",
                 h.vfs, type(exc).__name__, exc)
