"""The reconcile loop of one VFS on one node: level-triggered, one thread per VFS.

Every run looks at the newest cluster view and this agent's own holding, and moves one
step towards what placement asks for: acquire, release, clear a stale owner key, or
write status. A slow step of one VFS never delays another VFS.

Rules kept here (the ownership invariants themselves are in ownership.py):
- Only a successful owner transaction starts a Holding; a Holding that was fenced or
  whose owner key is gone is torn down and never reused.
- Every status write is guarded by the owner's epoch (0 = "no owner"), so a node that
  lost a VFS cannot overwrite the new owner's status.
- Release takes the VIP down before the owner key is deleted and the lease revoked.
- A VFS whose disk could not be unmounted stays owned (lease renewed, VIP down, status
  error) and the release is retried: deleting the owner key would let another node
  mount the same disk.
- A lost or fenced holding whose disk could not be unmounted is not let go either: it stays
  with the lease keeper (so the hardware watchdog stays armed, docs/safety.md) and the fence
  guard keeps its last hold, and the unmount is retried; only a released disk ends it.
- The disk bound (deny by default): a takeover mounts nothing before T_release has passed
  since this node saw the VFS without an owner key, unless the status shows the previous
  owner let go cleanly. Only the final status an owner writes in the same transaction that
  deletes its key after its unmount succeeded has `node: null`; any status naming a node,
  an unreadable status, or one carrying `lost_owner`/`disk_at_risk` means a node may still
  have the disk. That risk is carried forward by every status written without an owner
  (unowned status, stale-key cleanup, failed takeovers), so a chain of failures keeps it.
  T_release is the largest of this node's and the ones the lost owners published. The
  fencing hook's success skips the wait only when exactly one node is at risk and it is the
  one fenced. The old node has unmounted or been reset by then (its guard's and watchdog's
  rule). The gone-time is "now" when the status changed after this node first saw no owner
  key (an owner came and went between two passes).
  A VIP-only takeover (it mounts nothing) skips the wait only when the lost owner's own status
  said `"disk": false` (owners publish whether their disk may be mounted) and no risk is carried.
- A dead NFS server of a held VFS is restarted a few times; after that the VFS is
  released with an error, so another candidate can serve it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from controller import loops, tracing
from controller.coordination import Coordination
from controller.failover_trace import FailoverTracer
from controller.keyspace import Keyspace
from controller.ownership import Holding, LeaseKeeper
from controller.placement import Action, decide, preference
from controller.spec import MAX_LEASE_TTL, VfsSpec
from controller.status import encode, make_status, same, wall_clock
from controller.store import StoreError
from controller.takeover import Step, StepFailed, TakeoverContext, bring_down, bring_up
from controller.view import ClusterView, VfsConfig

log = logging.getLogger(__name__)

RESYNC_SECONDS = 5.0
RETRY_SECONDS = 1.0
HEALTH_SECONDS = 1.0  # how often a held VFS's NFS server is checked
RESTARTS_ALLOWED = 3  # NFS server restarts per RESTART_WINDOW before the VFS is released
RESTART_WINDOW = 60.0
# A busy first candidate gets this long per VFS it has still to take over (~16 at once, ~0.8 s each
# on a loaded 2-core node, bench/scale), at most MAX_BACKLOG_WAIT, before a lower-ranked one steps in.
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

    def enter(self, timeout: float) -> bool:
        if self.gate is None:
            return True
        self.held = self.gate.enter(self.rank, timeout)
        return self.held

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
            self.enter(RETRY_SECONDS)


@dataclass
class AgentContext:
    """What every VFS reconciler of one agent shares."""

    me: str
    keyspace: Keyspace
    store: Coordination
    keeper: LeaseKeeper
    steps: list[Step]
    view: Callable[[], ClusterView]
    default_ttl: int
    rank_delay: float
    backoff: Backoff
    vip_down: Callable[[Any], None]
    fence: Callable[[str], Any] | None = None  # the fencing hook: node -> result with .ok, .describe()
    fence_required: bool = False
    min_ttl: int = 1  # shorter spec TTLs are raised to this (a hardware watchdog needs 2 s)
    release_bound: float = 10.0  # T_release, seconds (node/config.py validates it)
    hold_off: Callable[[], float] = lambda: 0.0  # seconds no takeover may start (after an etcd restore)
    takeovers: TakeoverGate | None = None  # how many takeovers run at once (None: no limit)


class VfsReconciler:
    def __init__(self, vfs: str, ctx: AgentContext) -> None:
        self.vfs = vfs
        self.ctx = ctx
        self.holding: Holding | None = None
        self.held_spec: VfsSpec | None = None
        self._pending_since: float | None = None
        self._lost_owner_txn = False  # the last acquire's owner transaction failed its compare
        self._last_decision: object = None
        self._must_release: str | None = None  # a held VFS that has to be let go (unhealthy, stuck)
        self._restarts: list[float] = []
        self._timings: dict[str, float] = {}
        self._status_doc: dict[str, Any] | None = None
        self._owner_gone_since: float | None = None  # monotonic: first seen without an owner key
        self._owner_gone_rev = 0  # the view revision at that moment
        self._risk_seen: tuple[int, float] | None = None  # (status revision, monotonic) for _risk_pending
        self._disk_stuck: str | None = None  # a lost holding's unmount failed; retried every pass
        self.trace = FailoverTracer(vfs, ctx.me)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vfs-{vfs}", daemon=True)

    # --- thread plumbing ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    _release_on_stop = False  # set by stop(release=True), never unset: the loop ends at once

    def stop(self, release: bool, timeout: float = 30.0) -> bool:
        """Stop the loop; True once it has ended and nothing is held.

        With `release` (SIGTERM) the loop ends after its current pass and the VFS is handed
        over here. Without (a deleted VFS, agent._on_view), the loop ends at the first pass
        that leaves nothing held: a thread holding a VFS is never stopped, it goes on (and
        releases a VFS whose spec is gone) until it holds nothing. Safe to call again.
        """
        if release:
            self._release_on_stop = True  # before _stop: _run reads it once _stop is set
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=timeout)
        ended = not self._thread.is_alive()
        # Released only here once the loop has ended: a pass still running (a slow mount, a long
        # release-bound wait) must not race a release from another thread, which could report the
        # disk free while that pass's mount completes. Still held: the caller leaves it to the guard.
        if release and ended and self.holding is not None:
            self._release(self.holding, "agent stopping")
        if release or ended:
            self.trace.close()
        return ended and self.holding is None

    def _run(self) -> None:
        while not (self._stop.is_set() and (self._release_on_stop or self.holding is None)):
            self._wake.clear()
            try:
                delay = self.reconcile()
            except StoreError as exc:
                log.warning("%s: etcd unavailable: %s", self.vfs, exc)
                delay = RETRY_SECONDS
            except Exception as exc:
                loops.record("reconcile", exc, self.vfs, log)
                delay = RETRY_SECONDS
            self._wake.wait(RESYNC_SECONDS if delay is None else delay)

    # --- one reconcile pass --------------------------------------------------------------

    def reconcile(self) -> float | None:
        """Move one step; return how soon to look again (None: on the next event)."""
        view = self.ctx.view()
        config = view.config(self.vfs)
        owner = view.owner(self.vfs)
        h = self.holding
        self.trace.observe(view)
        self._note_owner(owner, view.revision)
        if h is not None and (h.fenced or self._lost(h, view)):
            self._teardown_after_loss(h)
            return 0.0 if self.holding is None else RETRY_SECONDS
        if h is not None and self._must_release:
            self._release(h, self._must_release, error=self._must_release)
            return RETRY_SECONDS if self.holding is not None else None
        if h is not None and not self._check_health(h):
            return 0.0
        if h is not None and owner is None:
            # Our own owner key may not have reached this view yet.
            return self._write_holder_status(h, config, view)
        held_vip = self.held_spec.vip_cidr if (h and self.held_spec) else None
        decision = decide(self.ctx.me, config, owner, view.live_nodes(), held_vip)
        if decision != self._last_decision:
            log.debug("%s: %s (rev %d, owner %s, live %s)", self.vfs, decision, view.revision,
                      owner.node if owner else None, sorted(view.live_nodes()))
            self._last_decision = decision
        if decision.action is not Action.ACQUIRE:
            self._pending_since = None
        if decision.action is Action.CLEAR_STALE and owner is not None:
            self._clear_stale(owner.epoch, owner.lease)
            return None  # the owner key's deletion wakes us
        if decision.action is Action.RELEASE and h is not None:
            self._release(h, decision.reason)
            return RETRY_SECONDS if self.holding is not None else None
        if decision.action is Action.ACQUIRE and config.spec is not None:
            return self._maybe_acquire(config, decision.rank, decision.reason)
        if h is not None:
            self._write_holder_status(h, config, view)
            # Only an NFS server needs checking; a VIP-only VFS waits for events (and the resync).
            return HEALTH_SECONDS if self.held_spec and self.held_spec.storage is not None else None
        if owner is None:
            self._write_unowned_status(config, view)
        return None

    def _check_health(self, h: Holding) -> bool:
        """Restart a dead NFS server of a held VFS; give the VFS up if that keeps failing."""
        spec = self.held_spec
        assert spec is not None
        if not h.valid():
            # Past its deadline (e.g. this process was frozen and the guard fenced it, or the fence
            # monitor has not run yet): the fence monitor acts, nothing is restarted.
            return True
        tctx = TakeoverContext(spec, h)
        for step in self.ctx.steps:
            healthy = getattr(step, "healthy", None)
            if healthy is None or healthy(tctx):
                continue
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
            if len(self._restarts) > RESTARTS_ALLOWED:
                self._must_release = f"{step.name} died {len(self._restarts)} times in {RESTART_WINDOW:.0f}s"
                self.ctx.backoff.fail(self.vfs, self._must_release)
                return False
            log.warning("%s: %s is not running; restarting it", self.vfs, step.name)
            try:
                step.down(tctx)
                step.up(tctx)
            except Exception as exc:
                self._must_release = f"{step.name} died and could not be restarted: {exc}"
                self.ctx.backoff.fail(self.vfs, self._must_release)
                return False
        return True

    def _note_owner(self, owner: object, revision: int) -> None:
        if owner is not None:
            self._owner_gone_since = None
        elif self._owner_gone_since is None:
            self._owner_gone_since, self._owner_gone_rev = time.monotonic(), revision

    def _release_bound_until(self, risk: DiskRisk, fence_note: dict[str, Any], status_rev: int) -> float:
        """Monotonic time before which nothing may be mounted (0: no wait)."""
        if not risk.at_risk:
            return 0.0
        if fence_note.get("ok") and not risk.unknown and risk.nodes == (fence_note.get("node"),):
            return 0.0  # the only node that may have the disk is confirmed off
        gone = self._owner_gone_since
        if gone is None or status_rev > self._owner_gone_rev:
            gone = time.monotonic()  # an owner came and went since we started counting
        return gone + max(self.ctx.release_bound, risk.release_bound)

    def _risk_pending(self, view: ClusterView) -> bool:
        """The status says a node may still have the disk and its release bound has not run out yet
        (counted like a takeover's wait, from when this node first saw no owner key)."""
        risk = self._risk(view)
        if not risk.at_risk:
            return False
        rec = view.keys.get(self.ctx.keyspace.status(self.vfs))
        rev = rec.mod_revision if rec else 0
        if self._risk_seen is None or self._risk_seen[0] != rev:
            self._risk_seen = (rev, time.monotonic())  # counted from when we first saw this status
        return time.monotonic() < self._risk_seen[1] + max(self.ctx.release_bound, risk.release_bound)

    def _lost(self, h: Holding, view: ClusterView) -> bool:
        owner = view.owner(self.vfs)
        if owner is not None:
            return owner.epoch != h.epoch
        return view.revision >= h.epoch  # created, then deleted since

    # --- acquire ---------------------------------------------------------------------------

    def _maybe_acquire(self, config: VfsConfig, rank: int, cause: str) -> float | None:
        assert config.spec is not None
        wait = max(self.ctx.backoff.remaining(self.vfs), self.ctx.hold_off())
        if wait > 0:
            return wait
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        wait = self._pending_since + rank * self.ctx.rank_delay + self._backlog_wait(rank) - now
        if wait > 0:
            return wait  # lower-ranked: give the better candidates their chance first
        slot = GateSlot(self.ctx.takeovers, rank, self._stop.is_set)
        if not slot.enter(RETRY_SECONDS):
            return 0.0  # every slot busy: decide again (another node may have taken it meanwhile)
        try:
            spec = self._still_to_acquire()  # the wait for the slot may have changed the picture
            if spec is None:
                return 0.0
            self._pending_since = None
            acquired = self._acquire(spec, cause if rank == 0 else "placement", slot)
        finally:
            slot.leave()
        if acquired:
            return 0.0
        return None  # the owner transaction's compare failed: what changed wakes us (never a tight loop)

    def _backlog_wait(self, rank: int) -> float:
        """A lower-ranked candidate also gives the node this VFS waits for time for what that node has
        still to take over (ViewIndex.backlog, this VFS included): a node taking over a hundred VFS
        at once is busy, not gone, and a VFS taken from it stays where it went (no failback). A dead
        node leaves the live set within its TTL and stops counting."""
        if rank == 0:
            return 0.0
        view = self.ctx.view()
        head = view.index.waiting_on.get(self.vfs)
        if head is None or head == self.ctx.me:
            return 0.0
        backlog = view.index.backlog.get(head, 0)
        # A VFS leaves the backlog when its takeover starts (the owner key), not when it ends: a node
        # with others still to do gets one takeover's time more for the slot and the takeover itself.
        busy = BUSY_SECONDS if backlog > 1 else 0.0
        return min(MAX_BACKLOG_WAIT, backlog * BACKLOG_SECONDS + busy)

    def _still_to_acquire(self) -> VfsSpec | None:
        """The spec to acquire with, if the newest view still says this node should (else None)."""
        if self._stop.is_set():
            return None
        view = self.ctx.view()
        config = view.config(self.vfs)
        decision = decide(self.ctx.me, config, view.owner(self.vfs), view.live_nodes(), None)
        return config.spec if decision.action is Action.ACQUIRE else None

    def _risk(self, view: ClusterView) -> DiskRisk:
        rec = view.keys.get(self.ctx.keyspace.status(self.vfs))
        return disk_risk(rec is not None, view.status(self.vfs), self.ctx.me)

    def _acquire(self, spec: VfsSpec, cause: str, slot: GateSlot | None = None) -> bool:
        """One takeover attempt; False if the owner transaction's compare failed (nothing was done)."""
        self._lost_owner_txn = False
        view = self.ctx.view()
        status_now = view.status(self.vfs) or {}
        risk = self._risk(view)
        status_rec = view.keys.get(self.ctx.keyspace.status(self.vfs))
        lost = risk.nodes[0] if risk.nodes else None
        root, cause = self.trace.start_takeover(spec, status_now, cause, lost)
        previous = lost or status_now.get("node") or status_now.get("previous")
        serving: dict[str, Any] | None = None
        try:
            serving = self._acquire_traced(spec, cause, previous, root, risk,
                                           status_rec.mod_revision if status_rec else 0, slot)
        except BaseException as exc:
            tracing.fail(root, exc)
            raise
        finally:
            self.trace.finish_takeover(root, cause, previous, self.ctx.view())
            root.end()
        if serving is not None and status_now.get("trace"):
            # Tell the releasing node that this part of its move trace has ended, so its
            # `vfs.move` span ends after it (it learns that only through etcd).
            self._put_status(serving["epoch"], {**serving, "takeover_done": True}, quiet=True)
        return serving is not None or not self._lost_owner_txn

    def _acquire_traced(self, spec: VfsSpec, cause: str, previous: str | None,
                        root: Any, risk: DiskRisk, status_rev: int, slot: GateSlot | None = None,
                        ) -> dict[str, Any] | None:
        """Acquire and bring up; returns the serving status written, None if not serving."""
        ks, store, me = self.ctx.keyspace, self.ctx.store, self.ctx.me
        span_attrs = {"nfs_ha.vfs": self.vfs, "nfs_ha.node": me}
        ttl = max(spec.lease_ttl or self.ctx.default_ttl, self.ctx.min_ttl)
        sent_at = time.monotonic()
        with tracing.child(root, "lease_grant", span_attrs):
            lease_id, granted = store.grant(ttl)
        h = Holding(vfs=self.vfs, lease_id=lease_id, ttl=granted, granted_at=sent_at,
                    drop=lambda: self.ctx.vip_down(spec.vip), on_fence=lambda _h: self.wake(),
                    holds_disk=spec.storage is not None, vip=spec.vip_cidr,
                    device=spec.storage.device if spec.storage is not None else None)
        owner_doc = {"node": me, "since": wall_clock(), "lease": f"{lease_id:x}", "ttl": granted,
                     "vip": spec.vip_cidr}
        lost = risk.nodes[0] if risk.nodes else None
        status = make_status("acquiring", me, 0, "", vip=spec.vip_cidr, cause=cause, previous=previous,
                             release_bound=self.ctx.release_bound, disk=spec.storage is not None, **risk.carried())
        try:
            with tracing.child(root, "owner_txn", span_attrs):
                # Only if the status is still the one the risk and the wait were read from: a lost
                # owner that wrote its risk meanwhile must not be overwritten unseen.
                created = store.create_owner(ks.owner(self.vfs), json.dumps(owner_doc), lease_id,
                                             {ks.status(self.vfs): encode(status)}, read=ks.epoch_base,
                                             unchanged={ks.status(self.vfs): status_rev})
        except StoreError:
            self._revoke_quietly(lease_id)
            raise
        self._lost_owner_txn = created is None
        if created is None:
            root.set_attribute("nfs_ha.outcome", "another node won the owner transaction, or the status changed")
            self._revoke_quietly(lease_id)  # somebody else won the race; fine
            return None
        epoch = created.epoch
        root.set_attribute("nfs_ha.epoch", epoch)
        h.epoch = epoch
        self.holding, self.held_spec = h, spec
        self.ctx.keeper.add(h)
        self._restarts = []
        log.info("%s: owner with epoch %d (lease %x, cause %s)", self.vfs, epoch, lease_id, cause)
        # The base as of the owner transaction's own revision: base + revision then only grows.
        tctx = TakeoverContext(spec, h, span=root, node=me, epoch_base=parse_epoch_base(created.read),
                               cancelled=self._stop.is_set,
                               waiting=slot.outside if slot is not None else contextlib.nullcontext)
        fence_note: dict[str, Any] = {}
        try:
            try:
                if lost is not None and self.ctx.fence is not None:
                    fence_note = self._fence_lost_owner(lost, root)
                # The bound is the disk's. It is skipped only when neither side has one: this takeover
                # mounts nothing and the lost owner said it held no disk (a holder of a spec that just
                # lost its storage may still have it mounted); its VIP was gone before its lease could
                # expire (ownership.py, invariant 2). Otherwise the risk would leave the status unwaited.
                if spec.storage is not None or not risk.diskless:
                    tctx.not_before = self._release_bound_until(risk, fence_note, status_rev)
            except StepFailed:
                raise
            except Exception as exc:  # e.g. a fence command that could not even start
                raise StepFailed(f"takeover failed before its first step: {exc}") from exc
            if tctx.not_before:
                root.set_attribute("nfs_ha.release_bound_wait", round(max(0.0, tctx.not_before - time.monotonic()), 3))
            bring_up(self.ctx.steps, tctx)
        except StepFailed as exc:
            log.warning("%s: takeover failed: %s", self.vfs, exc)
            tracing.fail(root, exc)
            self.ctx.backoff.fail(self.vfs, str(exc))
            if exc.critical:
                self._must_release = f"takeover failed and its undo left the disk mounted: {exc}"
                self._put_status(epoch, make_status("error", me, epoch, self._must_release,
                                                    vip=spec.vip_cidr), quiet=True)
                return None
            # Nothing of ours is mounted (the undo succeeded), but the lost owner's risk stays on
            # the status for the next candidate, whether or not our fence of it succeeded.
            self._end_holding(h, make_status("error", None, epoch, str(exc), vip=spec.vip_cidr,
                                             fence=fence_note or None, previous=me, **risk.carried()), root)
            return None
        self.ctx.backoff.succeed(self.vfs)
        self._timings = tctx.timings
        log.info("%s: serving (steps %s)", self.vfs, tctx.timings)
        serving = make_status("serving", me, epoch, "", vip=spec.vip_cidr, cause=cause, previous=previous,
                              steps=tctx.timings, release_bound=self.ctx.release_bound, disk=h.holds_disk)
        if fence_note:
            serving["fence"] = fence_note
        with tracing.child(root, "status_write", span_attrs):
            self._put_status(h.epoch, serving)
        return serving

    def _fence_lost_owner(self, lost: str, root: Any) -> dict[str, Any]:
        """Run the fencing hook on a lost previous owner; StepFailed if it fails and is required."""
        assert self.ctx.fence is not None
        with tracing.child(root, "fence_hook", {"nfs_ha.vfs": self.vfs, "nfs_ha.node": self.ctx.me,
                                                "nfs_ha.fence.target": lost}) as span:
            result = self.ctx.fence(lost)
            span.set_attribute("nfs_ha.fence.ok", bool(result.ok))
            if not result.ok:
                tracing.fail(span, result.describe())
        note = {"node": lost, "ok": bool(result.ok), "detail": result.describe()}
        if result.ok:
            log.info("%s: fenced lost owner %s: %s", self.vfs, lost, result.describe())
        elif self.ctx.fence_required:
            raise StepFailed(f"fencing lost owner {lost} failed, takeover blocked: {result.describe()}")
        else:
            log.warning("%s: fencing lost owner %s failed (not required, going on): %s", self.vfs, lost,
                        result.describe())
        return note

    # --- release ---------------------------------------------------------------------------

    def _release(self, h: Holding, reason: str, error: str = "") -> None:
        """VIP down, NFS server stopped, disk unmounted; only then the owner key goes."""
        spec = self.held_spec
        assert spec is not None
        log.info("%s: releasing: %s", self.vfs, reason)
        h.retire()  # before the VIP goes down: no announcement or defence of it from now on
        retry = self._must_release is not None  # a stuck release retried every second: no new trace
        root, move = (None, None) if retry else self.trace.start_release(spec, h, reason)
        self._put_status(h.epoch, make_status("releasing", self.ctx.me, h.epoch, error, vip=spec.vip_cidr,
                                              cause=reason, disk=h.holds_disk), quiet=True)
        tctx = TakeoverContext(spec, h, span=root, node=self.ctx.me)
        result = bring_down(self.ctx.steps, tctx)
        if root is not None and result.errors:
            tracing.fail(root, "; ".join(result.errors))
        if result.critical:
            # The disk is still mounted here: keep the lease so nobody else mounts it.
            self._must_release = reason
            msg = f"release stuck, VFS kept owned: {'; '.join(result.errors)}"
            log.error("%s: %s", self.vfs, msg)
            self._put_status(h.epoch, make_status("error", self.ctx.me, h.epoch, msg, vip=spec.vip_cidr,
                                                  cause=reason), quiet=True)
            for span in (root, move):
                if span is not None:
                    span.end()
            return
        self._must_release = None
        h.holds_disk = False  # unmounted: the watchdog need not cover this holding any more
        log.info("%s: released (steps %s)", self.vfs, tctx.timings)
        errors = "; ".join([e for e in (error, *result.errors) if e])
        final = make_status("error" if error else "unplaced", None, 0, errors, vip=spec.vip_cidr,
                            previous=self.ctx.me, cause=reason, steps=tctx.timings)
        if move or root:
            final["trace"] = tracing.traceparent(move or root)  # the next owner joins this trace
        self._end_holding(h, final, root)
        if root is not None:
            root.end()
        self.trace.release_done(move, h.epoch)

    def _teardown_after_loss(self, h: Holding) -> None:
        spec = self.held_spec
        assert spec is not None
        h.fence(h.fence_reason or "owner key is gone or belongs to a newer epoch")
        # Stays with the keeper (and so the guard) until the steps are down: _end_holding removes it.
        retry = self._disk_stuck is not None
        root = None if retry else self.trace.start_fence(spec, h)
        result = bring_down(self.ctx.steps, TakeoverContext(spec, h, span=root, node=self.ctx.me))
        if result.errors:
            log.error("%s: after self-fence: %s", self.vfs, "; ".join(result.errors))
            if root is not None:
                tracing.fail(root, "; ".join(result.errors))
        if result.critical:
            # The disk is still mounted here. Letting go of the holding would disarm the watchdog
            # and tell the guard the VFS is released; keep both on it and retry the unmount.
            self._disk_stuck = "; ".join(result.errors)
            msg = f"self-fenced but the disk is still mounted here (retrying): {self._disk_stuck}"
            self._put_status(h.epoch, make_status("error", self.ctx.me, h.epoch, msg, vip=spec.vip_cidr),
                             quiet=True)
            if root is not None:
                root.end()
            return
        self._disk_stuck = None
        h.holds_disk = False
        self._must_release = None
        if root is None:
            root = self.trace.start_fence(spec, h)  # the trace of the fence ends with the disk released
        self._end_holding(h, make_status("fenced", None, 0, f"{self.ctx.me} self-fenced: {h.fence_reason}",
                                         vip=spec.vip_cidr, previous=self.ctx.me), root)
        root.end()

    def _end_holding(self, h: Holding, final_status: dict[str, Any], span: Any = None) -> None:
        """Delete our owner key (if still ours) with a final status, then revoke the lease."""
        self.ctx.keeper.remove(h)
        self.holding, self.held_spec = None, None
        ks = self.ctx.keyspace
        with (tracing.child(span, "owner_release", {"nfs_ha.vfs": self.vfs, "nfs_ha.node": self.ctx.me})
              if span is not None else contextlib.nullcontext()):
            try:
                self.ctx.store.put_if_epoch(ks.owner(self.vfs), h.epoch,
                                            {ks.status(self.vfs): encode(final_status)}, delete_owner=True)
            except StoreError as exc:
                log.warning("%s: could not delete owner key: %s", self.vfs, exc)
            self._revoke_quietly(h.lease_id)

    def _clear_stale(self, epoch: int, lease_id: int) -> None:
        log.info("%s: removing owner key left by an earlier run (epoch %d)", self.vfs, epoch)
        self.trace.restarted = True
        ks = self.ctx.keyspace
        carried = self._risk(self.ctx.view()).carried(also_me=self.ctx.me, my_bound=self.ctx.release_bound)
        self.ctx.store.put_if_epoch(ks.owner(self.vfs), epoch, {ks.status(self.vfs): encode(
            make_status("unplaced", None, 0, "", previous=self.ctx.me, cause="agent restarted", **carried))},
            delete_owner=True)
        if lease_id:
            self._revoke_quietly(lease_id)

    def _revoke_quietly(self, lease_id: int) -> None:
        try:
            self.ctx.store.revoke(lease_id)
        except StoreError as exc:
            log.warning("%s: revoking lease %x failed (it will expire): %s", self.vfs, lease_id, exc)

    # --- status ------------------------------------------------------------------------------

    def _put_status(self, epoch: int, doc: dict[str, Any], quiet: bool = False) -> bool:
        ks = self.ctx.keyspace
        try:
            ok = self.ctx.store.put_if_epoch(ks.owner(self.vfs), epoch, {ks.status(self.vfs): encode(doc)})
        except StoreError:
            if not quiet:
                raise
            return False
        if ok and self.holding is not None and epoch == self.holding.epoch:
            self._status_doc = doc  # what we last said as owner: the base of later rewrites
        return ok

    def _write_holder_status(self, h: Holding, config: VfsConfig, view: ClusterView) -> float | None:
        spec = self.held_spec
        assert spec is not None
        error = config.error
        if config.spec is None and error:
            error += f" (still serving the last valid spec: VIP {spec.vip_cidr})"
        current = view.status(self.vfs) or {}
        # Built from our own last write, not from the view, which may not show it yet: a rewrite
        # from a lagging view would drop what that write added (fence outcome, takeover_done).
        base = self._status_doc if self._status_doc and self._status_doc.get("epoch") == h.epoch else current
        wanted = {**base, "phase": "serving", "node": self.ctx.me, "epoch": h.epoch, "error": error,
                  "vip": spec.vip_cidr, "steps": self._timings, "disk": h.holds_disk}
        # Only once our owner key is visible do we rewrite status; before that, the
        # acquire path's own write is authoritative.
        if view.owner(self.vfs) is not None and not same(current, wanted):
            self._put_status(h.epoch, wanted)
        return None

    def _write_unowned_status(self, config: VfsConfig, view: ClusterView) -> None:
        """Status of a VFS nobody owns; written by one node only (the lowest-named live one).

        A VFS whose spec key is gone gets its status removed instead (by that node too, and
        only while etcd shows neither an owner key nor a spec key), so a deleted VFS leaves
        nothing that keeps reconcilers running; an operator's intent key is left alone.
        """
        live = view.live_nodes()
        if not live or min(live) != self.ctx.me:
            return
        ks = self.ctx.keyspace
        if ks.spec(self.vfs) not in view.keys:
            if self._risk_pending(view):
                return  # the status is the only record that a node may still have the disk: keep it
            if ks.status(self.vfs) in view.keys and self.ctx.store.delete_if_no_owner(
                    ks.owner(self.vfs), [ks.status(self.vfs)], absent=[ks.spec(self.vfs)]):
                log.info("%s: spec deleted and nobody owns it: status removed", self.vfs)
            return
        if config.spec is None:
            wanted = make_status("error", None, 0, config.error)
        elif not preference(config, live):
            wanted = make_status("unplaced", None, 0, _join(config.error, "no live candidate among "
                                 f"{list(config.spec.candidates)}"), vip=config.spec.vip_cidr)
        else:
            return  # a candidate will acquire it and write status then
        current = view.status(self.vfs)
        keep = {k: current[k] for k in ("previous",) if current and k in current}
        wanted.update(keep)
        wanted.update(self._risk(view).carried())  # a lost owner's risk outlives this status
        if not same(current, wanted):
            self._put_status(0, wanted)


@dataclass(frozen=True)
class DiskRisk:
    """Who may still have the VFS's disk mounted, as far as its status tells (pure data)."""

    nodes: tuple[str, ...] = ()  # named nodes that may have it, most recent first
    unknown: bool = False  # a status that cannot be read, or risk recorded without a node name
    release_bound: float = 0.0  # the largest T_release those nodes published
    # The only node at risk is the last owner, and its own status said it held no disk (`"disk": false`,
    # written by a holder whose disk is not mounted): a VIP-only takeover need not wait for it.
    diskless: bool = False

    @property
    def at_risk(self) -> bool:
        return bool(self.nodes) or self.unknown

    def carried(self, also_me: str | None = None, my_bound: float = 0.0) -> dict[str, Any]:
        """Status fields that pass the risk on (`also_me`: this node's own stale holding counts too,
        with its own T_release `my_bound`)."""
        nodes = self.nodes + ((also_me,) if also_me and also_me not in self.nodes else ())
        if not nodes and not self.unknown:
            return {}
        bound = max(self.release_bound, my_bound if also_me else 0.0)
        out: dict[str, Any] = {"disk_at_risk": True, "lost_release_bound": bound}
        if nodes:
            out["lost_owner"] = nodes[0]
            out["lost_owners"] = list(nodes[:MAX_LOST_OWNERS])
        return out


MAX_LOST_OWNERS = 8
MAX_RELEASE_BOUND = 600.0  # node/config.py's limit; a published bound above it is junk


def _published(value: Any, limit: float) -> float:
    """A number another node published (a TTL, a release bound): junk counts as `limit` (deny by default)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= limit
    return float(value) if ok else float(limit)


def published_bound(value: Any) -> float:
    """A release bound another node published; absent: 0."""
    return 0.0 if value is None else _published(value, MAX_RELEASE_BOUND)


def restore_hold(view: ClusterView, my_ttl: int, my_bound: float) -> float:
    """Seconds without takeovers after etcd went back: the longest lease any holder may still be
    running on (TTLs of specs, owner keys, and the lease_ttl, min_ttl and max_held_ttl nodes publish
    in their registrations) plus the longest release bound any node published (registrations,
    statuses), never less than this node's own. Junk values count as the maximum
    (deny by default); rare (once per restore), so parsing every spec here is fine."""
    ttls = [float(my_ttl)]
    bounds = [my_bound]
    for name in view.vfs_names():
        spec = view.config(name).spec
        if spec is not None and spec.lease_ttl:
            ttls.append(float(spec.lease_ttl))
        owner = view.owner(name)
        if owner is not None and "ttl" in owner.value:
            ttls.append(_published(owner.value["ttl"], MAX_LEASE_TTL))
        status = view.status(name) or {}
        bounds += [published_bound(status[k]) for k in ("release_bound", "lost_release_bound") if k in status]
    for reg in view.live_nodes().values():
        if "release_bound" in reg:
            bounds.append(published_bound(reg["release_bound"]))
        ttls += [_published(reg[k], MAX_LEASE_TTL) for k in ("lease_ttl", "min_ttl", "max_held_ttl") if k in reg]
    return max(ttls) + max(bounds)


def disk_risk(present: bool, status: dict[str, Any] | None, me: str) -> DiskRisk:
    """Deny by default: only a status with `node: null` and no carried risk is a clean end.

    `present`: a status key exists (`status` None with a key present = unreadable junk). A VFS
    that never had a status (new) is clean. This node's own name is not a risk: its own earlier
    holdings were unmounted at start-up (Host.remove_leftovers) or are still held."""
    if not present:
        return DiskRisk()
    if status is None:
        return DiskRisk(unknown=True, release_bound=MAX_RELEASE_BOUND)
    names: list[str] = []
    bound = published_bound(status.get("lost_release_bound"))
    node = status.get("node")
    if node is not None:
        if isinstance(node, str) and node != me:
            names.append(node)
            bound = max(bound, published_bound(status.get("release_bound")) if "release_bound" in status else 0.0)
        elif not isinstance(node, str):
            return DiskRisk(unknown=True, release_bound=MAX_RELEASE_BOUND)
    lost = status.get("lost_owners")
    for name in ([status.get("lost_owner")] + (lost if isinstance(lost, list) else [])):
        if isinstance(name, str) and name and name != me and name not in names:
            names.append(name)
    unknown = bool(status.get("disk_at_risk")) and not names
    carried = any(k in status for k in ("lost_owner", "lost_owners", "disk_at_risk"))
    diskless = status.get("disk") is False and names == [node] and not carried and not unknown
    return DiskRisk(tuple(names[:MAX_LOST_OWNERS]), unknown, bound, diskless)


def parse_epoch_base(value: bytes | None) -> int:
    """The epoch base as read in the owner transaction (0 when unset or junk, see view.epoch_base)."""
    text = value.decode(errors="replace").strip() if value else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
