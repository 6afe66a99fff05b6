"""The agent's metrics and health endpoint (controller/metrics.py, node/observe.py), without root."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from controller import metrics
from controller.failover_trace import TakeoverFlow
from controller.keyspace import Keyspace
from controller.view import ClusterView
from node import observe
from node.observe import ObservabilityServer, parse_address


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_fence_reasons_are_a_fixed_set() -> None:
    assert metrics.fence_reason("no keepalive acknowledged in time (last acked send 2.1s ago, TTL 2s)") \
        == "keepalive_timeout"
    assert metrics.fence_reason("lease is gone in etcd (expired or revoked)") == "lease_gone"
    assert metrics.fence_reason("owner key is gone or belongs to a newer epoch") == "owner_lost"
    assert metrics.fence_reason("anything else, from etcd or a bug") == "other"


def test_a_takeover_flow_counts_its_outcome_and_times_its_steps() -> None:
    before = samples(metrics.REGISTRY)
    tracer = TracerProvider().get_tracer("t")
    flow = TakeoverFlow(tracer.start_span("vfs.takeover"), "mvfs", "node-a", "intent")
    with flow.step("mount"):
        pass
    flow.note(epoch=12)
    flow.finish(None, ClusterView(Keyspace("/t")))
    lost = TakeoverFlow(tracer.start_span("vfs.takeover"), "mvfs", "node-a", "placement")
    lost.finish(None, ClusterView(Keyspace("/t")))
    after = samples(metrics.REGISTRY)
    key = ("nfsha_takeovers_total", (("cause", "intent"), ("outcome", "served"), ("vfs", "mvfs")))
    assert after[key] == before.get(key, 0) + 1
    assert after[("nfsha_takeovers_total", (("cause", "placement"), ("outcome", "lost"), ("vfs", "mvfs")))] >= 1
    step = ("nfsha_step_duration_seconds_count", (("step", "mount"),))
    assert after[step] == before.get(step, 0) + 1
    metrics.forget("mvfs")
    assert not [k for k in samples(metrics.REGISTRY) if ("vfs", "mvfs") in k[1]]


def test_the_collector_reads_the_agents_state_at_each_scrape() -> None:
    registry = CollectorRegistry()
    state = metrics.NodeState(
        [metrics.VfsState("home", True, "serving", epoch=7, grace_remaining=3.5, last_takeover=0.8,
                          last_steps={"vip": 0.01}),
         metrics.VfsState("work", False, "unplaced")],
        deadline_margin=1.25, guard_alive=True, endpoints={"grpc": "10.0.0.1:2379", "keepalive": "10.0.0.2:2379"},
        loop_errors={"keepalive": 2}, refused=1)
    registry.register(metrics.AgentCollector(lambda: state))
    got = samples(registry)
    assert got[("nfsha_vfs_held", (("vfs", "home"),))] == 1 and got[("nfsha_vfs_held", (("vfs", "work"),))] == 0
    assert got[("nfsha_vfs_phase", (("phase", "serving"), ("vfs", "home")))] == 1
    assert got[("nfsha_vfs_phase", (("phase", "error"), ("vfs", "home")))] == 0
    assert got[("nfsha_vfs_epoch", (("vfs", "home"),))] == 7
    assert got[("nfsha_vfs_grace_remaining_seconds", (("vfs", "home"),))] == 3.5
    assert got[("nfsha_vfs_last_takeover_step_seconds", (("step", "vip"), ("vfs", "home")))] == 0.01
    assert got[("nfsha_self_fence_deadline_seconds", ())] == 1.25
    assert got[("nfsha_etcd_endpoint", (("channel", "keepalive"), ("endpoint", "10.0.0.2:2379")))] == 1
    assert got[("nfsha_loop_errors", (("loop", "keepalive"),))] == 2
    assert ("nfsha_vfs_epoch", (("vfs", "work"),)) not in got


@pytest.mark.parametrize("text", ["9640", "host", "a:0", "a:70000", ":9640", "a b:1"])
def test_bad_metrics_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="metrics_address must be HOST:PORT"):
        parse_address(text)


def test_ipv6_and_ipv4_addresses_parse() -> None:
    assert parse_address("[::1]:9640") == ("::1", 9640) and parse_address("0.0.0.0:1") == ("0.0.0.0", 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ObservabilityServer, list[str], list[bool]]]:
    monkeypatch.setattr(observe, "CACHE_SECONDS", 0.0)
    problems: list[str] = []
    ready = [False]
    srv = ObservabilityServer(f"127.0.0.1:{free_port()}", metrics.REGISTRY, lambda: list(problems),
                              lambda: ready[0])
    assert srv.start()
    yield srv, problems, ready
    srv.stop()


def get(srv: ObservabilityServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.address[1]}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_ready_and_metrics_over_http(server: tuple[ObservabilityServer, list[str], list[bool]]) -> None:
    srv, problems, ready = server
    assert get(srv, "/healthz") == (200, b'{"ok": true, "problems": []}\n')
    problems.append("home: VIP 10.77.0.100/24 is not on eth0")
    code, body = get(srv, "/healthz")
    assert code == 503 and json.loads(body)["problems"] == ["home: VIP 10.77.0.100/24 is not on eth0"]
    assert get(srv, "/readyz")[0] == 503
    ready[0] = True
    assert get(srv, "/readyz")[0] == 200
    code, body = get(srv, "/metrics")
    assert code == 200 and b"nfsha_lease_renew_latency_seconds_bucket" in body and b"process_cpu_seconds_total" in body
    assert get(srv, "/other")[0] == 404


def test_a_taken_port_leaves_the_agent_without_metrics_not_without_service() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        srv = ObservabilityServer(f"127.0.0.1:{taken.getsockname()[1]}", metrics.REGISTRY, list, lambda: True)
        assert srv.start() is False
        srv.stop()


def test_scrapers_are_answered_from_a_cache_and_cannot_hold_every_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded machine must not let the cache expire, or an idle connection time out, mid-test.
    monkeypatch.setattr(observe, "CACHE_SECONDS", 60.0)
    monkeypatch.setattr(observe, "TIMEOUT", 60.0)
    calls: list[int] = []
    srv = ObservabilityServer(f"127.0.0.1:{free_port()}", metrics.REGISTRY, lambda: calls.append(1) or [],
                              lambda: True)
    assert srv.start()
    try:
        for _ in range(5):
            assert get(srv, "/healthz")[0] == 200
        assert len(calls) == 1  # computed once a second at most, however often it is asked
        idle = [socket.create_connection(("127.0.0.1", srv.address[1])) for _ in range(observe.MAX_CONNECTIONS)]
        try:
            server = srv._server
            assert server is not None
            deadline = time.monotonic() + 10  # until the server accepted them all (each a thread)
            while server._connections._value > 0 and time.monotonic() < deadline:  # type: ignore[attr-defined]
                time.sleep(0.05)
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                get(srv, "/readyz")  # every connection slot taken: closed at once, no new thread
        finally:
            for conn in idle:
                conn.close()
        assert wait_ok(srv)  # once they are gone, it answers again
    finally:
        srv.stop()


def wait_ok(srv: ObservabilityServer) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return get(srv, "/readyz")[0] == 200
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    return False
