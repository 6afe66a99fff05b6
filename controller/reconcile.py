"""The reconcile loop of one VFS on one node: level-triggered, one thread per VFS.

Every pass reads as the failover story: observe (the newest cluster view and this node's own
holding) -> decide (controller/placement.py) -> act (one step, carried out by the VFS's
controller/vfs_actions.py: acquire, release, tear down after a loss, clear a stale owner key, or
write status) -> requeue (the pass returns how soon to look again; events wake it sooner).
A slow step of one VFS never delays another VFS.

Rules kept here (the acting rules are in vfs_actions.py, the ownership invariants in ownership.py):
- A holding that was fenced, or whose owner key is gone or belongs to a newer epoch, is torn
  down before anything else is decided; a held VFS that must be let go (a dead NFS server, a
  stuck release) is released before anything else is done with it.
- A takeover is decided twice: before its slot in the TakeoverGate and again inside it, from
  the newest view (the wait may have changed the picture), and never while stopping.
- Lower-ranked candidates wait first (PlacementWait, controller/gate.py): the better
  candidates get their chance, longer while the first candidate's backlog keeps moving.
- No takeover starts during a failure back-off or the hold-off after an etcd restore, nor of a
  spec this node's policy refuses (controller/policy.py); a held one it refuses is released.
- A thread holding a VFS is never stopped without a release: stop(release=False) ends the
  loop only at a pass that leaves nothing held.
"""

from __future__ import annotations

import logging
import threading
import time

from controller import loops
from controller.gate import BUSY_SECONDS, GateSlot, PlacementWait
from controller.ownership import Holding
from controller.placement import Action, decide
from controller.spec import VfsSpec
from controller.store import StoreError
from controller.vfs_actions import AgentContext, VfsActions
from controller.view import ClusterView, VfsConfig

__all__ = ["AgentContext", "VfsReconciler"]

log = logging.getLogger(__name__)

RESYNC_SECONDS = 5.0
RETRY_SECONDS = 1.0
HEALTH_SECONDS = 1.0  # how often a held VFS's NFS server is checked


class VfsReconciler:
    def __init__(self, vfs: str, ctx: AgentContext) -> None:
        self.vfs = vfs
        self.ctx = ctx
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.act = VfsActions(vfs, ctx, wake=self.wake, cancelled=self._stop.is_set)
        self._placement = PlacementWait()
        self._last_decision: object = None
        self._thread = threading.Thread(target=self._run, name=f"vfs-{vfs}", daemon=True)

    @property
    def holding(self) -> Holding | None:
        return self.act.holding

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
            self.act.release(self.holding, "agent stopping")
        if release or ended:
            self.act.trace.close()
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
        # Observe.
        act, view = self.act, self.ctx.view()
        config, owner, h = view.config(self.vfs), view.owner(self.vfs), act.holding
        act.trace.observe(view)
        act.bound.note_owner(owner is not None, view.revision)
        # What must happen to a holding whatever placement says.
        if h is not None and (h.fenced or self._lost(h, view)):
            act.teardown_after_loss(h)
            return 0.0 if act.holding is None else RETRY_SECONDS
        if h is not None and act.must_release:
            act.release(h, act.must_release, error=act.must_release)
            return RETRY_SECONDS if act.holding is not None else None
        if h is not None and not act.check_health(h):
            return 0.0
        if h is not None and owner is None:
            act.write_holder_status(h, config, view)  # our own owner key may not have reached this view yet
            return None
        # Decide.
        held_vip = act.held_spec.vip_cidr if (h and act.held_spec) else None
        refused = self._refused(config)
        self.ctx.note_refusal(self.vfs, refused)
        decision = decide(self.ctx.me, config, owner, view.live_nodes(), held_vip, refused)
        if decision != self._last_decision:
            log.debug("%s: %s (rev %d, owner %s, live %s)", self.vfs, decision, view.revision,
                      owner.node if owner else None, sorted(view.live_nodes()))
            self._last_decision = decision
        if decision.action is not Action.ACQUIRE:
            self._placement.reset()
        # Act, and requeue.
        if decision.action is Action.CLEAR_STALE and owner is not None:
            act.clear_stale(owner.epoch, owner.lease)
            return None  # the owner key's deletion wakes us
        if decision.action is Action.RELEASE and h is not None:
            act.release(h, decision.reason)
            return RETRY_SECONDS if act.holding is not None else None
        if decision.action is Action.ACQUIRE and config.spec is not None:
            return self._maybe_acquire(config, decision.rank, decision.reason)
        if h is not None:
            act.write_holder_status(h, config, view)
            # Only an NFS server needs checking; a VIP-only VFS waits for events (and the resync).
            return HEALTH_SECONDS if act.held_spec and act.held_spec.storage is not None else None
        if owner is None:
            act.write_unowned_status(config, view)
        return None

    def _refused(self, config: VfsConfig) -> str | None:
        """Why this node's policy refuses the spec; only asked of a candidate (what it publishes stays small)."""
        spec = config.spec
        return self.ctx.refuses(spec) if spec is not None and self.ctx.me in spec.candidates else None

    def _lost(self, h: Holding, view: ClusterView) -> bool:
        owner = view.owner(self.vfs)
        if owner is not None:
            return owner.epoch != h.epoch
        return view.revision >= h.epoch  # created, then deleted since

    def _maybe_acquire(self, config: VfsConfig, rank: int, cause: str) -> float | None:
        """Wait for the back-off, the better candidates and a gate slot; then take over."""
        assert config.spec is not None
        wait = max(self.ctx.backoff.remaining(self.vfs), self.ctx.hold_off())
        if wait > 0:
            return wait
        now, index = time.monotonic(), self.ctx.view().index
        head = index.waiting_on.get(self.vfs)
        head = None if head == self.ctx.me else head
        wait = self._placement.until(now, rank, self.ctx.rank_delay, head, index.backlog.get(head or "", 0)) - now
        if wait > 0:
            # Lower-ranked: give the better candidates their chance first. Looked at again at least every
            # BUSY_SECONDS: the head's progress meanwhile extends the wait.
            return min(wait, BUSY_SECONDS)
        slot = GateSlot(self.ctx.takeovers, rank, self._stop.is_set)
        if not slot.enter(RETRY_SECONDS):
            slot.finish()
            return 0.0  # every slot busy: decide again (another node may have taken it meanwhile)
        try:
            spec = self._still_to_acquire()  # the wait for the slot may have changed the picture
            if spec is None:
                return 0.0
            self._placement.reset()
            acquired = self.act.acquire(spec, cause if rank == 0 else "placement", slot)
        finally:
            slot.finish()
        if acquired:
            return 0.0
        return None  # the owner transaction's compare failed: what changed wakes us (never a tight loop)

    def _still_to_acquire(self) -> VfsSpec | None:
        """The spec to acquire with, if the newest view still says this node should (else None)."""
        if self._stop.is_set():
            return None
        view = self.ctx.view()
        config = view.config(self.vfs)
        decision = decide(self.ctx.me, config, view.owner(self.vfs), view.live_nodes(), None, self._refused(config))
        return config.spec if decision.action is Action.ACQUIRE else None
