"""Who may still have a VFS's disk mounted, as its status tells, and how long to wait for them: the pure
decisions behind the disk bound (the rule itself is stated in controller/vfs_actions.py's docstring and
docs/safety.md). Everything read here was published by other nodes: junk counts as the worst case."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controller.spec import MAX_LEASE_TTL
from controller.view import ClusterView


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


class ReleaseBoundClock:
    """One VFS's disk bound as counted on this node (the rule: controller/vfs_actions.py's docstring).

    The wait runs from when this node first saw the VFS without an owner key; an owner that came and
    went since (a status newer than that moment) restarts it. Monotonic time only, injectable."""

    def __init__(self, release_bound: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.release_bound, self._clock = release_bound, clock
        self._gone_since: float | None = None  # first seen without an owner key
        self._gone_rev = 0  # the view revision at that moment
        self._risk_seen: tuple[int, float] | None = None  # (status revision, first seen) for pending()

    def note_owner(self, owned: bool, revision: int) -> None:
        """Called on every pass with whether the VFS has an owner key in the view of `revision`."""
        if owned:
            self._gone_since = None
        elif self._gone_since is None:
            self._gone_since, self._gone_rev = self._clock(), revision

    def until(self, risk: DiskRisk, fence_note: dict[str, Any], status_rev: int) -> float:
        """Monotonic time before which a takeover mounts nothing (0: no wait)."""
        if not risk.at_risk:
            return 0.0
        if fence_note.get("ok") and not risk.unknown and risk.nodes == (fence_note.get("node"),):
            return 0.0  # the only node that may have the disk is confirmed off
        gone = self._gone_since
        if gone is None or status_rev > self._gone_rev:
            gone = self._clock()  # an owner came and went since we started counting
        return gone + max(self.release_bound, risk.release_bound)

    def pending(self, risk: DiskRisk, status_rev: int) -> bool:
        """The status says a node may still have the disk and its bound has not run out yet (counted
        from when this node first saw that status), so the status must be kept."""
        if not risk.at_risk:
            return False
        if self._risk_seen is None or self._risk_seen[0] != status_rev:
            self._risk_seen = (status_rev, self._clock())
        return self._clock() < self._risk_seen[1] + max(self.release_bound, risk.release_bound)
