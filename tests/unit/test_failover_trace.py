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
    flow = tr.start_takeover(SPEC, {"phase": "serving", "node": "node-a"}, "placement", "node-a")
    flow.finish("node-a", view(owner=None, nodes=("node-b",)))
    assert flow.cause == "node_lost"
    done = {s.name: s for s in spans.get_finished_spans()}
    assert set(done) == {"detect_loss", "placement_wait", "vfs.takeover"}
    detect = done["detect_loss"]
    assert detect.parent.span_id == flow.root.get_span_context().span_id
    assert 1.9e9 <= detect.end_time - detect.start_time <= 2.5e9  # the old owner's TTL
    assert done["vfs.takeover"].start_time == detect.start_time
    assert done["vfs.takeover"].attributes["nfs_ha.previous_owner"] == "node-a"


def test_planned_move_joins_the_releasing_nodes_trace(spans):
    old, new = FailoverTracer("home", "node-a"), FailoverTracer("home", "node-b")
    h = Holding(vfs="home", lease_id=1, ttl=2, granted_at=time.monotonic(), drop=lambda: None, epoch=10)
    release = old.start_release(SPEC, h, "intent: move to node-b")
    status = {"phase": "unplaced", "previous": "node-a", "cause": "intent: move to node-b",
              "trace": release.traceparent()}
    assert status["trace"] != tracing.traceparent(release.root)  # the move's, not the release's
    release.released()
    takeover = new.start_takeover(SPEC, status, "intent", None)
    takeover.finish("node-a", view(owner=None, nodes=("node-a", "node-b")))
    assert takeover.cause == "intent"
    assert takeover.root.get_span_context().trace_id == release.root.get_span_context().trace_id
    old.observe(view(owner="node-b", status={"phase": "serving", "epoch": 12}))
    assert "vfs.move" not in {s.name for s in spans.get_finished_spans()}  # not before takeover_done
    old.observe(view(owner="node-b", status={"phase": "serving", "epoch": 12, "takeover_done": True}))
    done = {s.name: s for s in spans.get_finished_spans()}
    assert done["vfs.move"].end_time >= done["vfs.takeover"].end_time
    assert done["vfs.release"].parent.span_id == done["vfs.move"].context.span_id
    assert done["vfs.takeover"].parent.span_id == done["vfs.move"].context.span_id


def test_a_takeover_flow_records_its_steps_facts_fence_hook_and_failure(spans):
    flow = FailoverTracer("home", "node-b").start_takeover(SPEC, {}, "placement", None)
    with flow.step("lease_grant"):
        pass
    with pytest.raises(RuntimeError), flow.step("mount"):
        raise RuntimeError("mount failed")
    flow.note(epoch=12, release_bound_wait=1.5)
    flow.fence_hook("node-a", time.time_ns(), False, "exit 1: switch refused")
    flow.failed("takeover failed: mount failed")
    flow.finish(None, view(owner=None, nodes=("node-b",)))
    done = {s.name: s for s in spans.get_finished_spans()}
    root = done["vfs.takeover"]
    assert {n for n, s in done.items() if s.parent is not None and s.parent.span_id == root.context.span_id} == {
        "lease_grant", "mount", "fence_hook"}
    assert root.attributes["nfs_ha.epoch"] == 12 and root.attributes["nfs_ha.release_bound_wait"] == 1.5
    assert not root.status.is_ok and not done["mount"].status.is_ok and done["lease_grant"].status.is_ok
    hook = done["fence_hook"]
    assert hook.attributes["nfs_ha.fence.target"] == "node-a" and hook.attributes["nfs_ha.fence.ok"] is False
    assert "switch refused" in (hook.status.description or "")


def test_an_untraced_flow_records_nothing(spans):
    flow = FailoverTracer("home", "node-a").untraced()
    with flow.step("vip_down"):
        pass
    flow.note(epoch=3)
    flow.failed("stuck")
    flow.stuck()
    assert flow.traceparent() is None and spans.get_finished_spans() == ()
