"""The trace of each failover of one VFS, as seen from one node.

- `vfs.takeover`: acquire and takeover steps. After an unplanned loss it starts at the
  estimated last sign of life of the previous owner (its lease expiry minus its TTL)
  and has a `detect_loss` child up to when this node saw the owner key vanish, and a
  `placement_wait` child up to the acquire (rank delay), so detection time is visible.
- `vfs.release`: the release steps; for a planned release it is the child of a
  `vfs.move` span whose traceparent travels in the final status through etcd, so the
  takeover on the next node joins the same trace. The releasing node ends `vfs.move`
  once the new owner's status says its takeover span has ended (`takeover_done`, written
  after it), or gives up after MOVE_WAIT seconds.
- `vfs.fence`: a self-fence, from the moment the VIP was dropped.
The flows also feed the metrics of controller/metrics.py: each step's duration, each takeover's
outcome and duration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from controller import metrics, tracing
from controller.ownership import Holding
from controller.spec import VfsSpec
from controller.view import ClusterView, Owner

MOVE_WAIT = 120.0


def cause_of(reason: str) -> str:
    """The `nfs_ha.cause` word for a release reason."""
    head = reason.split(":", 1)[0].strip()
    return {"intent": "intent", "spec_changed": "spec_changed", "agent stopping": "shutdown",
            "drain": "drain"}.get(head, "unhealthy")


class FailoverTracer:
    def __init__(self, vfs: str, node: str) -> None:
        self.vfs = vfs
        self.node = node
        self._previous: Owner | None = None
        self._previous_alive = True
        self._gone_ns: int | None = None
        self._move: tuple[Span, int, float] | None = None  # span, epoch released, give-up time
        self.restarted = False  # this agent cleared its own stale owner key at start-up

    def attrs(self, spec: VfsSpec, epoch: int, **extra: Any) -> dict[str, Any]:
        return {"nfs_ha.vfs": self.vfs, "nfs_ha.node": self.node, "nfs_ha.epoch": epoch,
                "nfs_ha.vip": spec.vip_cidr, **extra}

    def untraced(self) -> Flow:
        """A flow that records nothing (a stuck release or unmount retried every second)."""
        return Flow(None, self.vfs, self.node)

    # --- called on every reconcile pass ---------------------------------------------------------

    def observe(self, view: ClusterView) -> None:
        owner = view.owner(self.vfs)
        if owner is not None and owner.node != self.node:
            self._previous, self._gone_ns = owner, None
        elif owner is None and self._previous is not None and self._gone_ns is None:
            self._gone_ns = time.time_ns()
            self._previous_alive = self._previous.node in view.live_nodes()
        if self._move is not None:
            span, epoch, give_up = self._move
            status = view.status(self.vfs) or {}
            if status.get("takeover_done") and int(status.get("epoch") or 0) > epoch:
                span.set_attribute("nfs_ha.new_owner", str(status.get("node")))
                span.end()
                self._move = None
            elif time.monotonic() > give_up:
                tracing.fail(span, f"no other node took over within {MOVE_WAIT:.0f}s")
                span.end()
                self._move = None

    # --- takeover -------------------------------------------------------------------------------

    def start_takeover(self, spec: VfsSpec, status: dict[str, Any], cause: str, lost: str | None) -> TakeoverFlow:
        """Start `vfs.takeover`; the flow carries the cause recorded on it.

        `lost`: the owner this takeover replaces without it having let go, if any.
        """
        now = time.time_ns()
        parent = tracing.context_from(status.get("trace")) if status.get("phase") != "serving" else None
        start, previous = now, lost or status.get("previous")
        observed = self._gone_ns is not None and self._previous is not None and self._previous.node == lost
        if parent is not None:
            cause = cause_of(str(status.get("cause", "intent")))
        elif lost is not None:
            # Refined to node_lost by finish_takeover if the node's registration is gone too.
            cause = "lease_expired" if not observed or self._previous_alive else "node_lost"
            if observed and self._previous is not None and self._gone_ns is not None:
                ttl_ns = int(float(self._previous.value.get("ttl", 0)) * 1e9)
                start = min(self._gone_ns - ttl_ns, now)
        elif self.restarted:
            cause = "startup"
        root = tracing.tracer().start_span("vfs.takeover", context=parent, start_time=start, attributes={
            "nfs_ha.vfs": self.vfs, "nfs_ha.node": self.node, "nfs_ha.vip": spec.vip_cidr,
            "nfs_ha.cause": cause, "nfs_ha.previous_owner": str(previous or "")})
        if start < now and self._gone_ns is not None:
            self._gap(root, "detect_loss", start, self._gone_ns)
            self._gap(root, "placement_wait", self._gone_ns, now)
        self._previous, self._gone_ns, self.restarted = None, None, False
        return TakeoverFlow(root, self.vfs, self.node, cause)

    def _gap(self, root: Span, name: str, start: int, end: int) -> None:
        span = tracing.tracer().start_span(name, context=trace.set_span_in_context(root), start_time=start,
                                           attributes={"nfs_ha.vfs": self.vfs, "nfs_ha.node": self.node})
        span.end(end_time=max(start, end))

    # --- release and fence ----------------------------------------------------------------------

    def start_release(self, spec: VfsSpec, h: Holding, reason: str) -> ReleaseFlow:
        """Start `vfs.release` (under a new `vfs.move` when the VFS is meant to move on)."""
        cause = cause_of(reason)
        attrs = self.attrs(spec, h.epoch, **{"nfs_ha.cause": cause, "nfs_ha.reason": reason})
        move = None
        if cause in ("intent", "spec_changed", "shutdown", "drain"):
            move = tracing.tracer().start_span("vfs.move", attributes=attrs)
        parent = trace.set_span_in_context(move) if move is not None else None
        root = tracing.tracer().start_span("vfs.release", context=parent, attributes=attrs)
        return ReleaseFlow(root, self.vfs, self.node, move, self, h.epoch)

    def release_done(self, move: Span, epoch: int) -> None:
        """Keep `vfs.move` open until the VFS serves elsewhere (see observe)."""
        self._move = (move, epoch, time.monotonic() + MOVE_WAIT)

    def start_fence(self, spec: VfsSpec, h: Holding) -> Flow:
        root = tracing.tracer().start_span("vfs.fence", start_time=h.fenced_at_ns or None, attributes=self.attrs(
            spec, h.epoch, **{"nfs_ha.cause": "self_fence", "nfs_ha.reason": h.fence_reason}))
        if h.fenced_at_ns:
            self._gap(root, "vip_down", h.fenced_at_ns, h.dropped_at_ns or h.fenced_at_ns)
        return Flow(root, self.vfs, self.node)

    def close(self) -> None:
        if self._move is not None:
            self._move[0].end()
            self._move = None


@contextlib.contextmanager
def _timed(name: str, inner: AbstractContextManager[Any]) -> Iterator[Any]:
    started = time.monotonic()
    try:
        with inner as value:
            yield value
    finally:
        metrics.STEP_SECONDS.labels(name).observe(time.monotonic() - started)


class Flow:
    """One traced flow of a VFS on this node (a takeover, a release, a self-fence): the reconciler
    reports what happens, in domain terms, and this turns it into spans under the flow's root. A flow
    without a root records nothing (FailoverTracer.untraced)."""

    def __init__(self, root: Span | None, vfs: str, node: str) -> None:
        self.root, self._attrs = root, {"nfs_ha.vfs": vfs, "nfs_ha.node": node}
        self.vfs, self.started, self._failed = vfs, time.monotonic(), False

    def step(self, name: str) -> AbstractContextManager[Any]:
        """A named step of the flow (ownership.Observe, TakeoverContext.observe): a child span, and its
        duration in the step histogram (controller/metrics.py)."""
        if self.root is None:
            return contextlib.nullcontext()
        return _timed(name, tracing.child(self.root, name, self._attrs))

    def note(self, **attrs: Any) -> None:
        """Facts about the flow (epoch, outcome, the release-bound wait), as `nfs_ha.*` attributes."""
        if self.root is not None:
            for key, value in attrs.items():
                self.root.set_attribute(f"nfs_ha.{key}", value)

    def failed(self, error: BaseException | str) -> None:
        self._failed = True
        if self.root is not None:
            tracing.fail(self.root, error)

    def traceparent(self) -> str | None:
        """The flow's trace context for the next owner to join (None: not traced)."""
        return tracing.traceparent(self.root) if self.root is not None else None

    def end(self) -> None:
        if self.root is not None:
            self.root.end()

    def stuck(self) -> None:
        """The flow could not finish (a release whose disk is still mounted): end it as it is."""
        self.end()

    def released(self) -> None:
        """The flow let go of the VFS."""
        self.end()


class TakeoverFlow(Flow):
    def __init__(self, root: Span, vfs: str, node: str, cause: str) -> None:
        super().__init__(root, vfs, node)
        self.cause = cause
        self._owner = False  # the owner transaction was won

    def note(self, **attrs: Any) -> None:
        if "epoch" in attrs:
            self._owner = True
        super().note(**attrs)

    def fence_hook(self, target: str, started_ns: int, ok: bool, detail: str) -> None:
        """The fencing hook ran on the lost owner `target` from `started_ns` until now."""
        assert self.root is not None
        span = tracing.tracer().start_span("fence_hook", context=trace.set_span_in_context(self.root),
                                           start_time=started_ns, attributes={
                                               **self._attrs, "nfs_ha.fence.target": target, "nfs_ha.fence.ok": ok})
        if not ok:
            tracing.fail(span, detail)
        span.end()

    def finish(self, previous: str | None, view: ClusterView) -> None:
        """End the takeover. A node's own lease and its VFS lease expire within moments of each other,
        in either order: only now can `lease_expired` be told from `node_lost`."""
        cause = self.cause
        if cause == "lease_expired" and previous and previous not in view.live_nodes():
            cause = "node_lost"
            self.note(cause=cause)
        outcome = "failed" if self._failed else "served" if self._owner else "lost"
        metrics.takeover_finished(self.vfs, cause, outcome, time.monotonic() - self.started)
        self.end()


class ReleaseFlow(Flow):
    def __init__(self, root: Span, vfs: str, node: str, move: Span | None, tracer: FailoverTracer,
                 epoch: int) -> None:
        super().__init__(root, vfs, node)
        self._move, self._tracer, self._epoch = move, tracer, epoch

    def traceparent(self) -> str | None:
        return tracing.traceparent(self._move) if self._move is not None else super().traceparent()

    def stuck(self) -> None:
        """The release could not finish (the disk is still mounted): end its spans as they are."""
        self.end()
        if self._move is not None:
            self._move.end()

    def released(self) -> None:
        """Released; a move's span stays open until the VFS serves elsewhere."""
        self.end()
        if self._move is not None:
            self._tracer.release_done(self._move, self._epoch)
