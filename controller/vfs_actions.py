"""The act part of a VFS's reconcile pass: take over, serve, release, tear down, clear, report.

controller/reconcile.py observes and decides; the VfsActions of the same VFS carries the
decision out and owns what only acting changes: the Holding, the spec it was taken with, and
what this node last wrote as status. The acquire and release transactions themselves are
controller/ownership.py's, the steps on the host controller/takeover.py's, the disk-bound
decisions controller/diskrisk.py's. Tracing observes: each flow reports to a failover_trace.Flow.

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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller import ownership
from controller.coordination import Coordination
from controller.diskrisk import DiskRisk, ReleaseBoundClock, disk_risk
from controller.failover_trace import FailoverTracer, Flow, TakeoverFlow
from controller.gate import Backoff, GateSlot, TakeoverGate
from controller.ownership import Holding, LeaseKeeper
from controller.placement import preference, refusals
from controller.spec import VfsSpec
from controller.status import make_status, same
from controller.store import StoreError
from controller.takeover import RestartBudget, Step, StepFailed, TakeoverContext, bring_down, bring_up, restart_dead
from controller.view import ClusterView, VfsConfig

log = logging.getLogger(__name__)


@dataclass
class AgentContext:
    """What every VFS reconciler of one agent shares."""

    me: str
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
    refuses: Callable[[VfsSpec], str | None] = lambda _spec: None  # this node's policy (controller/policy.py)
    note_refusal: Callable[[str, str | None], None] = lambda _vfs, _why: None  # published in the registration


class VfsActions:
    """Carries out one VFS's decisions on this node (called from its reconciler's thread only)."""

    def __init__(self, vfs: str, ctx: AgentContext, wake: Callable[[], None],
                 cancelled: Callable[[], bool]) -> None:
        self.vfs = vfs
        self.ctx = ctx
        self.holding: Holding | None = None
        self.held_spec: VfsSpec | None = None
        self.must_release: str | None = None  # a held VFS that has to be let go (unhealthy, stuck)
        self.bound = ReleaseBoundClock(ctx.release_bound)
        self.trace = FailoverTracer(vfs, ctx.me)
        self._wake = wake
        self._cancelled = cancelled
        self._restarts = RestartBudget()
        self._timings: dict[str, float] = {}
        self._status_doc: dict[str, Any] | None = None
        self._disk_stuck: str | None = None  # a lost holding's unmount failed; retried every pass
        # For metrics and health (read from other threads, written here only):
        self.serving_since: float | None = None  # monotonic; the held VFS serves since
        self.last_takeover: float | None = None  # seconds the last takeover here took
        self.last_steps: dict[str, float] = {}

    def risk(self, view: ClusterView) -> DiskRisk:
        return disk_risk(view.status_revision(self.vfs) != 0, view.status(self.vfs), self.ctx.me)

    # --- serve -----------------------------------------------------------------------------

    def check_health(self, h: Holding) -> bool:
        """Restart a dead NFS server of a held VFS; False (and must_release set) if that keeps failing."""
        assert self.held_spec is not None
        if not h.valid():
            # Past its deadline (e.g. this process was frozen and the guard fenced it, or the fence
            # monitor has not run yet): the fence monitor acts, nothing is restarted.
            return True
        reason = restart_dead(self.ctx.steps, TakeoverContext(self.held_spec, h), self._restarts)
        if reason is None:
            return True
        self.must_release = reason
        self.ctx.backoff.fail(self.vfs, reason)
        return False

    # --- take over -------------------------------------------------------------------------

    def acquire(self, spec: VfsSpec, cause: str, slot: GateSlot | None = None) -> bool:
        """One takeover attempt; False if the owner transaction's compare failed (nothing was done)."""
        view = self.ctx.view()
        status_now = view.status(self.vfs) or {}
        risk = self.risk(view)
        lost = risk.nodes[0] if risk.nodes else None
        flow = self.trace.start_takeover(spec, status_now, cause, lost)
        started = time.monotonic()
        previous = lost or status_now.get("node") or status_now.get("previous")
        try:
            serving, lost_txn = self._take_over(spec, previous, flow, risk, view.status_revision(self.vfs), slot)
        except BaseException as exc:
            flow.failed(exc)
            raise
        finally:
            flow.finish(previous, self.ctx.view())
        if serving is not None:
            self.serving_since = time.monotonic()
            self.last_takeover, self.last_steps = self.serving_since - started, dict(self._timings)
        if serving is not None and status_now.get("trace"):
            # Tell the releasing node that this part of its move trace has ended, so its
            # `vfs.move` span ends after it (it learns that only through etcd).
            self._put_status(serving["epoch"], {**serving, "takeover_done": True}, quiet=True)
        return not lost_txn

    def _take_over(self, spec: VfsSpec, previous: str | None, flow: TakeoverFlow, risk: DiskRisk,
                   status_rev: int, slot: GateSlot | None) -> tuple[dict[str, Any] | None, bool]:
        """Acquire and bring up: (the serving status written or None, whether the owner transaction lost)."""
        me, cause = self.ctx.me, flow.cause
        ttl = max(spec.lease_ttl or self.ctx.default_ttl, self.ctx.min_ttl)

        def new_holding(lease_id: int, granted: int, sent_at: float) -> Holding:
            return Holding(vfs=self.vfs, lease_id=lease_id, ttl=granted, granted_at=sent_at,
                           drop=lambda: self.ctx.vip_down(spec.vip), on_fence=lambda _h: self._wake(),
                           holds_disk=spec.storage is not None, vip=spec.vip_cidr,
                           device=spec.storage.device if spec.storage is not None else None)

        lost = risk.nodes[0] if risk.nodes else None
        status = make_status("acquiring", me, 0, "", vip=spec.vip_cidr, cause=cause, previous=previous,
                             release_bound=self.ctx.release_bound, disk=spec.storage is not None, **risk.carried())
        # Only if the status is still the one the risk and the wait were read from: a lost owner that
        # wrote its risk meanwhile must not be overwritten unseen.
        h = ownership.acquire(self.ctx.store, self.vfs, me, ttl, status, status_rev, new_holding, flow.step)
        if h is None:
            flow.note(outcome="another node won the owner transaction, or the status changed")
            return None, True
        epoch = h.epoch
        flow.note(epoch=epoch)
        self.holding, self.held_spec = h, spec
        self.ctx.keeper.add(h)
        self._restarts = RestartBudget()
        log.info("%s: owner with epoch %d (lease %x, cause %s)", self.vfs, epoch, h.lease_id, cause)
        # The base as of the owner transaction's own revision: base + revision then only grows.
        tctx = TakeoverContext(spec, h, observe=flow.step, epoch_base=h.epoch_base, cancelled=self._cancelled,
                               waiting=slot.outside if slot is not None else contextlib.nullcontext)
        fence_note: dict[str, Any] = {}
        try:
            try:
                if lost is not None and self.ctx.fence is not None:
                    fence_note = self._fence_lost_owner(lost, flow)
                # The bound is the disk's. It is skipped only when neither side has one: this takeover
                # mounts nothing and the lost owner said it held no disk (a holder of a spec that just
                # lost its storage may still have it mounted); its VIP was gone before its lease could
                # expire (ownership.py, invariant 2). Otherwise the risk would leave the status unwaited.
                if spec.storage is not None or not risk.diskless:
                    tctx.not_before = self.bound.until(risk, fence_note, status_rev)
            except StepFailed:
                raise
            except Exception as exc:  # e.g. a fence command that could not even start
                raise StepFailed(f"takeover failed before its first step: {exc}") from exc
            if tctx.not_before:
                flow.note(release_bound_wait=round(max(0.0, tctx.not_before - time.monotonic()), 3))
            bring_up(self.ctx.steps, tctx)
        except StepFailed as exc:
            self._takeover_failed(h, spec, exc, flow, risk, fence_note)
            return None, False
        self.ctx.backoff.succeed(self.vfs)
        self._timings = tctx.timings
        log.info("%s: serving (steps %s)", self.vfs, tctx.timings)
        serving = make_status("serving", me, epoch, "", vip=spec.vip_cidr, cause=cause, previous=previous,
                              steps=tctx.timings, release_bound=self.ctx.release_bound, disk=h.holds_disk)
        if fence_note:
            serving["fence"] = fence_note
        with flow.step("status_write"):
            self._put_status(h.epoch, serving)
        return serving, False

    def _takeover_failed(self, h: Holding, spec: VfsSpec, exc: StepFailed, flow: TakeoverFlow, risk: DiskRisk,
                         fence_note: dict[str, Any]) -> None:
        log.warning("%s: takeover failed: %s", self.vfs, exc)
        flow.failed(exc)
        self.ctx.backoff.fail(self.vfs, str(exc))
        if exc.critical:
            self.must_release = f"takeover failed and its undo left the disk mounted: {exc}"
            self._put_status(h.epoch, make_status("error", self.ctx.me, h.epoch, self.must_release,
                                                  vip=spec.vip_cidr), quiet=True)
            return
        # Nothing of ours is mounted (the undo succeeded), but the lost owner's risk stays on
        # the status for the next candidate, whether or not our fence of it succeeded.
        self._end_holding(h, make_status("error", None, h.epoch, str(exc), vip=spec.vip_cidr,
                                         fence=fence_note or None, previous=self.ctx.me, **risk.carried()), flow)

    def _fence_lost_owner(self, lost: str, flow: TakeoverFlow) -> dict[str, Any]:
        """Run the fencing hook on a lost previous owner; StepFailed if it fails and is required."""
        assert self.ctx.fence is not None
        started_ns = time.time_ns()
        try:
            result = self.ctx.fence(lost)
        except Exception as exc:  # e.g. a command that could not start: the span says so, the takeover fails
            flow.fence_hook(lost, started_ns, False, f"{type(exc).__name__}: {exc}")
            raise
        flow.fence_hook(lost, started_ns, bool(result.ok), result.describe())
        note = {"node": lost, "ok": bool(result.ok), "detail": result.describe()}
        if result.ok:
            log.info("%s: fenced lost owner %s: %s", self.vfs, lost, result.describe())
        elif self.ctx.fence_required:
            raise StepFailed(f"fencing lost owner {lost} failed, takeover blocked: {result.describe()}")
        else:
            log.warning("%s: fencing lost owner %s failed (not required, going on): %s", self.vfs, lost,
                        result.describe())
        return note

    # --- let go ----------------------------------------------------------------------------

    def release(self, h: Holding, reason: str, error: str = "") -> None:
        """VIP down, NFS server stopped, disk unmounted; only then the owner key goes."""
        spec = self.held_spec
        assert spec is not None
        log.info("%s: releasing: %s", self.vfs, reason)
        h.retire()  # before the VIP goes down: no announcement or defence of it from now on
        retry = self.must_release is not None  # a stuck release retried every second: no new trace
        flow = self.trace.untraced() if retry else self.trace.start_release(spec, h, reason)
        self._put_status(h.epoch, make_status("releasing", self.ctx.me, h.epoch, error, vip=spec.vip_cidr,
                                              cause=reason, disk=h.holds_disk), quiet=True)
        tctx = TakeoverContext(spec, h, observe=flow.step)
        result = bring_down(self.ctx.steps, tctx)
        if result.errors:
            flow.failed("; ".join(result.errors))
        if result.critical:
            # The disk is still mounted here: keep the lease so nobody else mounts it.
            self.must_release = reason
            msg = f"release stuck, VFS kept owned: {'; '.join(result.errors)}"
            log.error("%s: %s", self.vfs, msg)
            self._put_status(h.epoch, make_status("error", self.ctx.me, h.epoch, msg, vip=spec.vip_cidr,
                                                  cause=reason), quiet=True)
            flow.stuck()
            return
        self.must_release = None
        h.holds_disk = False  # unmounted: the watchdog need not cover this holding any more
        log.info("%s: released (steps %s)", self.vfs, tctx.timings)
        errors = "; ".join([e for e in (error, *result.errors) if e])
        final = make_status("error" if error else "unplaced", None, 0, errors, vip=spec.vip_cidr,
                            previous=self.ctx.me, cause=reason, steps=tctx.timings)
        if flow.traceparent():
            final["trace"] = flow.traceparent()  # the next owner joins this trace
        self._end_holding(h, final, flow)
        flow.released()

    def teardown_after_loss(self, h: Holding) -> None:
        spec = self.held_spec
        assert spec is not None
        h.fence(h.fence_reason or "owner key is gone or belongs to a newer epoch")
        # Stays with the keeper (and so the guard) until the steps are down: _end_holding removes it.
        retry = self._disk_stuck is not None
        flow = self.trace.untraced() if retry else self.trace.start_fence(spec, h)
        result = bring_down(self.ctx.steps, TakeoverContext(spec, h, observe=flow.step))
        if result.errors:
            log.error("%s: after self-fence: %s", self.vfs, "; ".join(result.errors))
            flow.failed("; ".join(result.errors))
        if result.critical:
            # The disk is still mounted here. Letting go of the holding would disarm the watchdog
            # and tell the guard the VFS is released; keep both on it and retry the unmount.
            self._disk_stuck = "; ".join(result.errors)
            msg = f"self-fenced but the disk is still mounted here (retrying): {self._disk_stuck}"
            self._put_status(h.epoch, make_status("error", self.ctx.me, h.epoch, msg, vip=spec.vip_cidr),
                             quiet=True)
            flow.end()
            return
        self._disk_stuck = None
        h.holds_disk = False
        self.must_release = None
        if retry:
            flow = self.trace.start_fence(spec, h)  # the trace of the fence ends with the disk released
        self._end_holding(h, make_status("fenced", None, 0, f"{self.ctx.me} self-fenced: {h.fence_reason}",
                                         vip=spec.vip_cidr, previous=self.ctx.me), flow)
        flow.end()

    def _end_holding(self, h: Holding, final_status: dict[str, Any], flow: Flow) -> None:
        """Let go of the holding: the keeper stops renewing it, the owner key goes (if still ours)."""
        self.ctx.keeper.remove(h)
        self.holding, self.held_spec, self.serving_since = None, None, None
        ownership.release(self.ctx.store, self.vfs, h.epoch, h.lease_id, final_status, flow.step)

    def clear_stale(self, epoch: int, lease_id: int) -> None:
        log.info("%s: removing owner key left by an earlier run (epoch %d)", self.vfs, epoch)
        self.trace.restarted = True
        carried = self.risk(self.ctx.view()).carried(also_me=self.ctx.me, my_bound=self.ctx.release_bound)
        self.ctx.store.release(self.vfs, epoch, make_status("unplaced", None, 0, "", previous=self.ctx.me,
                                                            cause="agent restarted", **carried))
        if lease_id:
            ownership.revoke_quietly(self.ctx.store, self.vfs, lease_id)

    # --- status ----------------------------------------------------------------------------

    def _put_status(self, epoch: int, doc: dict[str, Any], quiet: bool = False) -> bool:
        try:
            ok = self.ctx.store.write_status(self.vfs, epoch, doc)
        except StoreError:
            if not quiet:
                raise
            return False
        if ok and self.holding is not None and epoch == self.holding.epoch:
            self._status_doc = doc  # what we last said as owner: the base of later rewrites
        return ok

    def write_holder_status(self, h: Holding, config: VfsConfig, view: ClusterView) -> None:
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

    def write_unowned_status(self, config: VfsConfig, view: ClusterView) -> None:
        """Status of a VFS nobody owns; written by one node only (the lowest-named live one).

        A VFS whose spec key is gone gets its status removed instead (by that node too, and
        only while etcd shows neither an owner key nor a spec key), so a deleted VFS leaves
        nothing that keeps reconcilers running; an operator's intent key is left alone.
        """
        live = view.live_nodes()
        if not live or min(live) != self.ctx.me:
            return
        if not view.has_spec(self.vfs):
            if self.bound.pending(self.risk(view), view.status_revision(self.vfs)):
                return  # the status is the only record that a node may still have the disk: keep it
            if view.status_revision(self.vfs) and self.ctx.store.remove_status(self.vfs):
                log.info("%s: spec deleted and nobody owns it: status removed", self.vfs)
            return
        if config.spec is None:
            wanted = make_status("error", None, 0, config.error)
        elif config.paused:  # e.g. its holder stopped or died meanwhile: nobody takes it until resumed
            wanted = make_status("unplaced", None, 0, _join(config.error, "paused: not placed until "
                                 "`nfs-ha resume`"), vip=config.spec.vip_cidr)
        elif not preference(config, live):
            refused = "; ".join(f"{n} refuses: {why}" for n, why in sorted(refusals(config, live).items()))
            wanted = make_status("unplaced", None, 0, _join(config.error, "no live candidate among "
                                 f"{list(config.spec.candidates)}", refused), vip=config.spec.vip_cidr)
        else:
            return  # a candidate will acquire it and write status then
        current = view.status(self.vfs)
        keep = {k: current[k] for k in ("previous",) if current and k in current}
        wanted.update(keep)
        wanted.update(self.risk(view).carried())  # a lost owner's risk outlives this status
        if not same(current, wanted):
            self._put_status(0, wanted)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
