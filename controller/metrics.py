"""The agent's Prometheus metrics (prometheus_client), in one registry served by node/observe.py.

Two kinds:
- Counted when something happens: takeovers (by VFS, cause and outcome) and their duration, the
  duration of each step of a takeover, release or fence, self-fences by reason, keepalive round
  trips, failed etcd calls. Fed by the failover flows (controller/failover_trace.py, the observer of
  every failover), the lease keeper and the store: one call at each event, nothing woven further.
- Read at each scrape from the agent's state (AgentCollector): per VFS held (0/1), phase, epoch,
  last takeover and its steps, NFS grace remaining; per node the time to the earliest self-fence
  deadline, the guard, the etcd endpoints in use, loop errors. Nothing is kept between scrapes;
  a scrape costs O(VFS).
Label values are bounded: VFS names, causes, outcomes and fence reasons from fixed lists, step names
from controller/takeover.py.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.status import PHASES

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # CPU seconds, RSS, open fds of the agent

_DURATIONS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
TAKEOVERS = Counter("nfsha_takeovers", "Takeovers this node attempted, by VFS, cause and outcome "
                    "(served, failed, lost: another node won the owner transaction)",
                    ["vfs", "cause", "outcome"], registry=REGISTRY)
TAKEOVER_SECONDS = Histogram("nfsha_takeover_duration_seconds", "Time from the start of a takeover on this "
                             "node to serving (or failing), by cause", ["cause"], buckets=_DURATIONS,
                             registry=REGISTRY)
STEP_SECONDS = Histogram("nfsha_step_duration_seconds", "Duration of each step of a takeover, release or "
                         "self-fence (steps as in the traces)", ["step"],
                         buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
                         registry=REGISTRY)
FENCES = Counter("nfsha_fences", "Self-fences of this node's holdings, by reason", ["reason"], registry=REGISTRY)
RENEW_SECONDS = Histogram("nfsha_lease_renew_latency_seconds", "Keepalive round trip: send to etcd's answer",
                          buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
                          registry=REGISTRY)
ETCD_ERRORS = Counter("nfsha_etcd_errors", "etcd calls that failed, by call", ["call"], registry=REGISTRY)

FENCE_REASONS = ("keepalive_timeout", "lease_gone", "owner_lost", "guard", "other")
OUTCOMES = ("served", "failed", "lost")


def fence_reason(text: str) -> str:
    """A Holding's fence reason (free text) as one of FENCE_REASONS."""
    if text.startswith("no keepalive acknowledged"):
        return "keepalive_timeout"
    if text.startswith("lease is gone"):
        return "lease_gone"
    if text.startswith("owner key is gone"):
        return "owner_lost"
    if "guard" in text:
        return "guard"
    return "other"


def fenced(reason: str) -> None:
    FENCES.labels(fence_reason(reason)).inc()


_takeover_labels: set[tuple[str, str, str]] = set()
_labels_lock = threading.Lock()


def takeover_finished(vfs: str, cause: str, outcome: str, seconds: float) -> None:
    with _labels_lock:
        _takeover_labels.add((vfs, cause, outcome))
    TAKEOVERS.labels(vfs, cause, outcome).inc()
    if outcome != "lost":
        TAKEOVER_SECONDS.labels(cause).observe(seconds)


def forget(vfs: str) -> None:
    """A deleted VFS: its series go (a counter reset is how Prometheus sees a label set come back)."""
    with _labels_lock:
        gone = {key for key in _takeover_labels if key[0] == vfs}
        _takeover_labels.difference_update(gone)
    for key in gone:
        TAKEOVERS.remove(*key)


@dataclass
class VfsState:
    name: str
    held: bool
    phase: str  # the cluster's status phase
    epoch: int | None = None  # of this node's holding
    grace_remaining: float | None = None  # NFS VFS held here: seconds of the grace period left (at most)
    last_takeover: float | None = None  # seconds, the last takeover of it on this node
    last_steps: dict[str, float] = field(default_factory=dict)


@dataclass
class NodeState:
    vfs: list[VfsState]
    deadline_margin: float | None  # seconds to the earliest self-fence deadline of a holding
    guard_alive: bool
    endpoints: dict[str, str]  # channel ("grpc", "keepalive") -> host:port in use
    loop_errors: dict[str, int]
    refused: int


class AgentCollector(Collector):
    """The gauges read from the agent's state at each scrape (`state` builds a NodeState)."""

    def __init__(self, state: Callable[[], NodeState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        s = self._state()
        held = GaugeMetricFamily("nfsha_vfs_held", "1 if this node holds the VFS", labels=["vfs"])
        phase = GaugeMetricFamily("nfsha_vfs_phase", "The VFS's phase in its status (1 for the current one)",
                                  labels=["vfs", "phase"])
        epoch = GaugeMetricFamily("nfsha_vfs_epoch", "Epoch of this node's holding", labels=["vfs"])
        grace = GaugeMetricFamily("nfsha_vfs_grace_remaining_seconds", "NFS grace period left at most (Ganesha "
                                  "may end it early once every client reclaimed)", labels=["vfs"])
        last = GaugeMetricFamily("nfsha_vfs_last_takeover_duration_seconds", "The last takeover of the VFS on "
                                 "this node", labels=["vfs"])
        steps = GaugeMetricFamily("nfsha_vfs_last_takeover_step_seconds", "Each step of that takeover",
                                  labels=["vfs", "step"])
        for v in s.vfs:
            held.add_metric([v.name], 1.0 if v.held else 0.0)
            for p in PHASES:
                phase.add_metric([v.name, p], 1.0 if v.phase == p else 0.0)
            if v.epoch is not None:
                epoch.add_metric([v.name], float(v.epoch))
            if v.grace_remaining is not None:
                grace.add_metric([v.name], v.grace_remaining)
            if v.last_takeover is not None:
                last.add_metric([v.name], v.last_takeover)
            for step, seconds in sorted(v.last_steps.items()):
                steps.add_metric([v.name, step], seconds)
        yield from (held, phase, epoch, grace, last, steps)
        yield GaugeMetricFamily("nfsha_self_fence_deadline_seconds", "Time to the earliest self-fence deadline "
                                "of a holding (NaN: none held)",
                                value=math.nan if s.deadline_margin is None else s.deadline_margin)
        yield GaugeMetricFamily("nfsha_guard_alive", "1 while the fence guard runs and reads its pipe",
                                value=1.0 if s.guard_alive else 0.0)
        endpoint = GaugeMetricFamily("nfsha_etcd_endpoint", "The etcd endpoint in use, per channel",
                                     labels=["channel", "endpoint"])
        for channel, where in sorted(s.endpoints.items()):
            endpoint.add_metric([channel, where], 1.0)
        yield endpoint
        loops = GaugeMetricFamily("nfsha_loop_errors", "Errors caught in background loops since start",
                                  labels=["loop"])
        for name, count in sorted(s.loop_errors.items()):
            loops.add_metric([name], float(count))
        yield loops
        yield GaugeMetricFamily("nfsha_vfs_refused", "VFS this node's policy refuses", value=float(s.refused))
