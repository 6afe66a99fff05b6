"""Which spans a failover produces, with an in-memory exporter (no etcd, no root)."""

import json
import time

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from controller import tracing
from controller.failover_trace import FailoverTracer, cause_of
from controller.keyspace import Keyspace
from controller.ownership import Holding
from controller.spec import parse_spec
from controller.view import ClusterView, KeyRecord

KS = Keyspace("/t")
SPEC = parse_spec("home", json.dumps({"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]}))


@pytest.fixture
def spans(monkeypatch):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    return exporter


def view(owner=None, status=None, nodes=("node-a", "node-b")):
    keys = {KS.node(n): KeyRecord(b"{}", 1, 1, 0) for n in nodes}
    if owner:
        keys[KS.owner("home")] = KeyRecord(json.dumps({"node": owner, "ttl": 2}).encode(), 10, 10, 7)
    if status:
        keys[KS.status("home")] = KeyRecord(json.dumps(status).encode(), 3, 11, 0)
    return ClusterView(KS, 20, keys)


def test_cause_words():
    assert cause_of("intent: move to node-b") == "intent"
    assert cause_of("spec_changed: VIP is now x") == "spec_changed"
    assert cause_of("agent stopping") == "shutdown"
    assert cause_of("nfs_server died 4 times in 60s") == "unhealthy"


def test_loss_takeover_starts_at_the_old_owners_last_sign_of_life(spans):
    tr = FailoverTracer("home", "node-b")
    tr.observe(view(owner="node-a"))
    tr.observe(view(owner=None, nodes=("node-b",)))  # owner key and node-a's registration gone
    root, cause = tr.start_takeover(SPEC, {"phase": "serving", "node": "node-a"}, "placement", "node-a")
    root.end()
    assert cause == "node_lost"
    done = {s.name: s for s in spans.get_finished_spans()}
    assert set(done) == {"detect_loss", "placement_wait", "vfs.takeover"}
    detect = done["detect_loss"]
    assert detect.parent.span_id == root.get_span_context().span_id
    assert 1.9e9 <= detect.end_time - detect.start_time <= 2.5e9  # the old owner's TTL
    assert done["vfs.takeover"].start_time == detect.start_time
    assert done["vfs.takeover"].attributes["nfs_ha.previous_owner"] == "node-a"


def test_planned_move_joins_the_releasing_nodes_trace(spans):
    old, new = FailoverTracer("home", "node-a"), FailoverTracer("home", "node-b")
    h = Holding(vfs="home", lease_id=1, ttl=2, granted_at=time.monotonic(), drop=lambda: None, epoch=10)
    release, move = old.start_release(SPEC, h, "intent: move to node-b")
    assert move is not None
    status = {"phase": "unplaced", "previous": "node-a", "cause": "intent: move to node-b",
              "trace": tracing.traceparent(move)}
    release.end()
    old.release_done(move, 10)
    takeover, cause = new.start_takeover(SPEC, status, "intent", None)
    takeover.end()
    assert cause == "intent"
    assert takeover.get_span_context().trace_id == move.get_span_context().trace_id
    old.observe(view(owner="node-b", status={"phase": "serving", "epoch": 12}))
    assert "vfs.move" not in {s.name for s in spans.get_finished_spans()}  # not before takeover_done
    old.observe(view(owner="node-b", status={"phase": "serving", "epoch": 12, "takeover_done": True}))
    done = {s.name: s for s in spans.get_finished_spans()}
    assert done["vfs.move"].end_time >= done["vfs.takeover"].end_time
    assert done["vfs.release"].parent.span_id == done["vfs.move"].context.span_id
    assert done["vfs.takeover"].parent.span_id == done["vfs.move"].context.span_id
