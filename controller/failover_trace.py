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
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span

from controller import tracing
from controller.ownership import Holding
from controller.spec import VfsSpec
from controller.view import ClusterView, Owner

MOVE_WAIT = 120.0


def cause_of(reason: str) -> str:
    """The `nfs_ha.cause` word for a release reason."""
    head = reason.split(":", 1)[0].strip()
    return {"intent": "intent", "spec_changed": "spec_changed", "agent stopping": "shutdown"}.get(head, "unhealthy")


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

    def start_takeover(self, spec: VfsSpec, status: dict[str, Any], cause: str,
                       lost: str | None) -> tuple[Span, str]:
        """Start `vfs.takeover`; returns it and the cause recorded on it.

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
        return root, cause

    def finish_takeover(self, root: Span, cause: str, previous: str | None, view: ClusterView) -> None:
        """A node's own lease and its VFS lease expire within moments of each other, in either
        order: only at the end of the takeover can `lease_expired` be told from `node_lost`."""
        if cause == "lease_expired" and previous and previous not in view.live_nodes():
            root.set_attribute("nfs_ha.cause", "node_lost")

    def _gap(self, root: Span, name: str, start: int, end: int) -> None:
        span = tracing.tracer().start_span(name, context=trace.set_span_in_context(root), start_time=start,
                                           attributes={"nfs_ha.vfs": self.vfs, "nfs_ha.node": self.node})
        span.end(end_time=max(start, end))

    # --- release and fence ----------------------------------------------------------------------

    def start_release(self, spec: VfsSpec, h: Holding, reason: str) -> tuple[Span, Span | None]:
        """Start `vfs.release` (under a new `vfs.move` when the VFS is meant to move on)."""
        cause = cause_of(reason)
        attrs = self.attrs(spec, h.epoch, **{"nfs_ha.cause": cause, "nfs_ha.reason": reason})
        move = None
        if cause in ("intent", "spec_changed", "shutdown"):
            move = tracing.tracer().start_span("vfs.move", attributes=attrs)
        parent = trace.set_span_in_context(move) if move is not None else None
        return tracing.tracer().start_span("vfs.release", context=parent, attributes=attrs), move

    def release_done(self, move: Span | None, epoch: int) -> None:
        """Keep `vfs.move` open until the VFS serves elsewhere (see observe)."""
        if move is not None:
            self._move = (move, epoch, time.monotonic() + MOVE_WAIT)

    def start_fence(self, spec: VfsSpec, h: Holding) -> Span:
        root = tracing.tracer().start_span("vfs.fence", start_time=h.fenced_at_ns or None, attributes=self.attrs(
            spec, h.epoch, **{"nfs_ha.cause": "self_fence", "nfs_ha.reason": h.fence_reason}))
        if h.fenced_at_ns:
            self._gap(root, "vip_down", h.fenced_at_ns, h.dropped_at_ns or h.fenced_at_ns)
        return root

    def close(self) -> None:
        if self._move is not None:
            self._move[0].end()
            self._move = None
