"""Span file exporter/reader, Jaeger reader, OTLP receiver and `nfs-ha timeline` (no root, loopback only).

Spans come from the real OpenTelemetry SDK: two TracerProviders stand for two agents (host.name
node-a and node-b), and a planned move crosses from one to the other through a W3C traceparent
carried in a plain dict, as the agents carry it through etcd. Step times are given explicitly, so
the expected timelines are exact.
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from controller.span_file import (
    SpanFileExporter,
    SpanRecord,
    SpanSourceError,
    read_spans,
    rotated,
    spans_from_jaeger,
)
from controller.timeline import add_timeline_parser, render_json, render_text, timelines
from tests.otlp_receiver import OtlpReceiver

REPO = Path(__file__).resolve().parents[2]
MS = 1_000_000
T0 = 1_700_000_000_000 * MS  # 2023-11-14T22:13:20Z
RELEASE_STEPS = [("vip_down", 5), ("nfs_server_down", 40), ("mount_down", 20), ("owner_release", 10),
                 ("status_write", 5)]
TAKEOVER_STEPS = [("lease_grant", 2), ("owner_txn", 3), ("arp_probe", 250), ("mount", 30), ("epoch_check", 4),
                  ("nfs_server", 100), ("vip", 2), ("gratuitous_arp", 1), ("status_write", 3)]
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib and gRPC honour proxy variables; everything here is loopback.
    for var in ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def agent(node: str, *exporters: SpanExporter) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "nfs-ha-agent", "host.name": node}))
    for exporter in exporters:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def run_steps(tracer: trace.Tracer, parent: Span, steps: list[tuple[str, int]], t: int, vfs: str, node: str,
              fail: str = "") -> int:
    """Back-to-back step spans under `parent` from time t; returns the end time."""
    ctx = trace.set_span_in_context(parent)
    for name, ms in steps:
        span = tracer.start_span(name, context=ctx, start_time=t, attributes={"nfs_ha.vfs": vfs, "nfs_ha.node": node})
        if name == fail:
            span.record_exception(RuntimeError(f"{name} failed"))
            span.set_status(Status(StatusCode.ERROR, f"{name} failed"))
        t += ms * MS
        span.end(end_time=t)
    return t


def root_attrs(vfs: str, node: str, epoch: int, cause: str, **extra: Any) -> dict[str, Any]:
    return {"nfs_ha.vfs": vfs, "nfs_ha.node": node, "nfs_ha.epoch": epoch, "nfs_ha.vip": "10.77.0.100/24",
            "nfs_ha.cause": cause, **extra}


def write_move(dir_: Path, t0: int = T0, vfs: str = "home") -> tuple[list[Path], int]:
    """A planned move node-a -> node-b in one trace across two agents; (span files, end time)."""
    paths = [dir_ / "node-a" / "spans.jsonl", dir_ / "node-b" / "spans.jsonl"]
    a, b = agent("node-a", SpanFileExporter(paths[0])), agent("node-b", SpanFileExporter(paths[1]))
    ta, tb = a.get_tracer("nfs-ha"), b.get_tracer("nfs-ha")
    move = ta.start_span("vfs.move", start_time=t0, attributes=root_attrs(vfs, "node-a", 7, "intent"))
    release = ta.start_span("vfs.release", context=trace.set_span_in_context(move), start_time=t0,
                            attributes=root_attrs(vfs, "node-a", 7, "intent"))
    t = run_steps(ta, release, RELEASE_STEPS, t0, vfs, "node-a")
    release.end(end_time=t)
    carrier: dict[str, str] = {}  # what the releasing agent writes into etcd
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(move))
    move.end(end_time=t)

    parent = TraceContextTextMapPropagator().extract(carrier)
    t += 3 * MS  # node-b notices the released key
    takeover = tb.start_span("vfs.takeover", context=parent, start_time=t,
                             attributes=root_attrs(vfs, "node-b", 8, "intent", **{"nfs_ha.previous_owner": "node-a"}))
    t = run_steps(tb, takeover, TAKEOVER_STEPS, t, vfs, "node-b")
    takeover.end(end_time=t)
    a.shutdown()
    b.shutdown()
    return paths, t


def write_takeover(path: Path, t0: int, vfs: str = "home", fail: str = "", vfs_on_root: bool = True) -> str:
    """One vfs.takeover on node-b after node-a was lost; returns its trace id."""
    provider = agent("node-b", SpanFileExporter(path))
    tracer = provider.get_tracer("nfs-ha")
    attrs = root_attrs(vfs, "node-b", 9, "node_lost", **{"nfs_ha.previous_owner": "node-a"})
    if not vfs_on_root:
        del attrs["nfs_ha.vfs"]
    root = tracer.start_span("vfs.takeover", start_time=t0, attributes=attrs)
    steps = [("detect_loss", 1), *TAKEOVER_STEPS[:4]]
    t = run_steps(tracer, root, steps, t0, vfs, "node-b", fail=fail)
    if fail:
        root.set_status(Status(StatusCode.ERROR, f"takeover refused: {fail} failed"))
    else:
        root.set_status(Status(StatusCode.OK))
    root.end(end_time=t)
    provider.shutdown()
    return format(root.get_span_context().trace_id, "032x")


def by_name(spans: list[SpanRecord]) -> dict[str, SpanRecord]:
    return {s.name + ("@" + s.node if s.name == "status_write" else ""): s for s in spans}


# --- span file ----------------------------------------------------------------------------------

def test_span_file_is_otlp_json_lines_with_hex_ids(tmp_path: Path) -> None:
    paths, _ = write_move(tmp_path)
    lines = paths[0].read_text().splitlines()
    assert len(lines) == 1 + len(RELEASE_STEPS) + 1  # SimpleSpanProcessor: one export (line) per span
    doc = json.loads(lines[0])
    resource = {a["key"]: a["value"] for a in doc["resourceSpans"][0]["resource"]["attributes"]}
    assert resource["host.name"] == {"stringValue": "node-a"}
    span = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert span["name"] == "vip_down"
    assert HEX32.match(span["traceId"]) and HEX16.match(span["spanId"]) and HEX16.match(span["parentSpanId"])
    assert span["startTimeUnixNano"] == str(T0) and span["endTimeUnixNano"] == str(T0 + 5 * MS)
    assert {"key": "nfs_ha.vfs", "value": {"stringValue": "home"}} in span["attributes"]
    root = json.loads(lines[-1])["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    assert root["name"] == "vfs.move" and "parentSpanId" not in root
    assert {"key": "nfs_ha.epoch", "value": {"intValue": "7"}} in root["attributes"]


def test_read_spans_keeps_structure_across_two_agents(tmp_path: Path) -> None:
    paths, _ = write_move(tmp_path)
    spans = read_spans(paths)
    assert len(spans) == 2 + len(RELEASE_STEPS) + 1 + len(TAKEOVER_STEPS)
    assert len({s.trace_id for s in spans}) == 1
    assert all(HEX32.match(s.trace_id) and HEX16.match(s.span_id) for s in spans)
    named = by_name(spans)
    move, release, takeover = named["vfs.move"], named["vfs.release"], named["vfs.takeover"]
    assert move.parent_span_id is None
    assert release.parent_span_id == move.span_id
    assert takeover.parent_span_id == move.span_id  # the parent came from the other agent
    assert named["arp_probe"].parent_span_id == takeover.span_id
    assert named["vip_down"].parent_span_id == release.span_id
    assert takeover.attributes == root_attrs("home", "node-b", 8, "intent", **{"nfs_ha.previous_owner": "node-a"})
    assert move.resource["host.name"] == "node-a" and takeover.resource["host.name"] == "node-b"
    assert takeover.resource["service.name"] == "nfs-ha-agent"
    assert named["mount"].node == "node-b" and named["mount"].duration_ns == 30 * MS
    assert {s.status for s in spans} == {"UNSET"}


def test_error_status_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    write_takeover(path, T0, fail="arp_probe")
    write_takeover(path, T0 + 60_000 * MS)
    spans = read_spans([path])
    failed = [s for s in spans if s.name == "arp_probe" and s.status == "ERROR"]
    assert len(failed) == 1 and failed[0].status_message == "arp_probe failed"
    roots = {s.status: s for s in spans if s.name == "vfs.takeover"}
    assert set(roots) == {"OK", "ERROR"}
    assert roots["ERROR"].status_message == "takeover refused: arp_probe failed"
    [older] = [t for t in timelines(spans, "home", last=2) if t.start_ns == T0]
    text = render_text(older)
    arp_line = next(line for line in text.splitlines() if "arp_probe" in line)
    assert "ERROR" in arp_line and "#" in arp_line and "█" not in arp_line
    assert arp_line.endswith("arp_probe failed")


def test_malformed_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spans.jsonl"
    write_takeover(path, T0)
    good = len(read_spans([path]))
    with path.open("ab") as f:
        f.write(b"not json at all\n")
        f.write(b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}\n')
        f.write(b"\xff\xfe\x00binary\n\n")
    write_takeover(path, T0 + 60_000 * MS)
    with path.open("a") as f:
        f.write('{"resourceSpans": [{"scopeSp')  # a torn last line
    with caplog.at_level(logging.WARNING, logger="controller.span_file"):
        spans = read_spans([path])
    assert len(spans) == 2 * good
    assert "skipped 4 malformed lines" in caplog.text


def test_exporter_creates_dirs_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nested = tmp_path / "a" / "b" / "spans.jsonl"
    write_takeover(nested, T0)
    assert nested.exists()
    blocked = tmp_path / "dir-not-file"
    blocked.mkdir()
    exporter = SpanFileExporter(blocked)
    provider = agent("node-a")
    span = provider.get_tracer("t").start_span("vfs.fence")
    span.end()
    with caplog.at_level(logging.WARNING, logger="controller.span_file"):
        assert exporter.export([span]) is SpanExportResult.FAILURE
        assert exporter.export([span]) is SpanExportResult.FAILURE
    assert caplog.text.count("cannot write spans") == 1  # once per outage
    ok = SpanFileExporter(tmp_path / "ok.jsonl")
    assert ok.export([span]) is SpanExportResult.SUCCESS
    ok.shutdown()
    assert ok.export([span]) is SpanExportResult.FAILURE


def test_exporter_is_thread_safe(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = SpanFileExporter(path)
    provider = agent("node-a")
    tracer = provider.get_tracer("t")
    spans = []
    for i in range(20):
        span = tracer.start_span("step", attributes={"nfs_ha.vfs": "x" * 5000, "i": i})
        span.end()
        spans.append(span)

    def export() -> None:
        for span in spans:
            exporter.export([span])

    threads = [threading.Thread(target=export) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(path.read_text().splitlines()) == 80
    assert len(read_spans([path])) == 80  # no interleaved (malformed) lines


# --- timeline ------------------------------------------------------------------------------------

def test_move_timeline_spans_both_nodes_in_start_order(tmp_path: Path) -> None:
    paths, end = write_move(tmp_path)
    [tl] = timelines(read_spans(paths), "home")
    assert (tl.root, tl.cause, tl.epoch, tl.nodes, tl.vfs) == ("vfs.move", "intent", 7, ["node-a", "node-b"], "home")
    assert tl.start_ns == T0 and tl.duration_s == pytest.approx((end - T0) / 1e9)
    expected = (["vfs.move", "vfs.release"] + [n for n, _ in RELEASE_STEPS] + ["vfs.takeover"]
                + [n for n, _ in TAKEOVER_STEPS])
    assert [r.name for r in tl.rows] == expected
    assert [r.depth for r in tl.rows] == [0, 1, *[2] * len(RELEASE_STEPS), 1, *[2] * len(TAKEOVER_STEPS)]
    offsets = [r.offset_s for r in tl.rows]
    assert offsets == sorted(offsets)
    assert {r.node for r in tl.rows[:7]} == {"node-a"} and {r.node for r in tl.rows[7:]} == {"node-b"}
    takeover = tl.rows[7]
    steps = tl.rows[8:]
    assert sum(r.duration_s for r in steps) == pytest.approx(takeover.duration_s, abs=0.001)
    release = tl.rows[1]
    assert sum(r.duration_s for r in tl.rows[2:7]) == pytest.approx(release.duration_s, abs=0.001)


def test_render_text_gantt(tmp_path: Path) -> None:
    paths, end = write_move(tmp_path)
    [tl] = timelines(read_spans(paths), "home")
    width = 50
    lines = render_text(tl, width=width).splitlines()
    header, columns, rows = lines[0], lines[1], lines[2:]
    assert header.startswith(f"trace {tl.trace_id}  vfs.move  vfs=home  cause=intent  epoch=7  nodes=node-a,node-b")
    assert header.endswith(f"total {(end - T0) / MS:.1f} ms")
    assert columns.split()[:7] == ["STEP", "NODE", "START", "ms", "DUR", "ms", "STATUS"]
    assert len(rows) == len(tl.rows)
    positions = [line.index(r.name) for line, r in zip(rows, tl.rows, strict=True)]  # every step, in order
    assert [p - positions[0] for p in positions] == [2 * r.depth for r in tl.rows]  # indented by depth
    bars = [line[line.index("|") + 1:line.rindex("|")] for line in rows]
    assert all(len(bar) == width for bar in bars)
    assert bars[0].startswith("█") and bars[0].strip() and not bars[0].endswith("█")  # vfs.move: node-a part
    takeover_bar = bars[7]
    assert takeover_bar.endswith("█")  # the takeover ends the trace
    arp = next(i for i, r in enumerate(tl.rows) if r.name == "arp_probe")
    expected_col = int(tl.rows[arp].offset_s / tl.duration_s * width)
    assert len(bars[arp]) - len(bars[arp].lstrip()) == expected_col
    assert rows[arp].split()[2:5] == [f"{tl.rows[arp].offset_s * 1000:.1f}", "250.0", "UNSET"]


def test_last_selects_newest_and_vfs_matches_descendants(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    minute = 60_000 * MS
    ids = [write_takeover(path, T0 + i * minute, vfs_on_root=i != 2) for i in range(3)]
    write_takeover(path, T0 + 3 * minute, vfs="other")
    spans = read_spans([path])
    newest = timelines(spans, "home", last=2)
    assert [t.trace_id for t in newest] == [ids[2], ids[1]]  # the newest's vfs is on its steps only
    assert [t.trace_id for t in timelines(spans, "home", last=10)] == ids[::-1]
    assert timelines(spans, "nope") == []


def test_non_vfs_roots_are_not_failovers(tmp_path: Path) -> None:
    path = tmp_path / "spans.jsonl"
    provider = agent("node-a", SpanFileExporter(path))
    span = provider.get_tracer("t").start_span("keepalive", attributes={"nfs_ha.vfs": "home"})
    span.end()
    provider.shutdown()
    assert timelines(read_spans([path]), "home") == []


def test_render_json_parses(tmp_path: Path) -> None:
    paths, _ = write_move(tmp_path)
    doc = json.loads(render_json(timelines(read_spans(paths), "home")))
    [tl] = doc
    assert tl["root"] == "vfs.move" and tl["nodes"] == ["node-a", "node-b"]
    assert tl["start"] == "2023-11-14T22:13:20.000Z" and tl["start_unix_nano"] == T0
    assert tl["rows"][0] | {"span_id": ""} == {"depth": 0, "name": "vfs.move", "node": "node-a", "offset_s": 0.0,
                                              "duration_s": 0.08, "status": "UNSET", "status_message": "",
                                              "span_id": ""}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nfs-ha")
    add_timeline_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_args(argv)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    paths, _ = write_move(tmp_path)
    files = [arg for p in paths for arg in ("--file", str(p))]
    args = parse(["timeline", "home", *files, "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)[0]["root"] == "vfs.move"

    monkeypatch.setenv("NFS_HA_SPAN_FILE", str(paths[1]))  # node-b's file only: the takeover
    args = parse(["timeline", "home", "--last", "1"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("trace ") and " vfs.takeover " in out.splitlines()[0]

    args = parse(["timeline", "other", *files])
    assert args.func(args) == 1
    assert "no failover of VFS 'other'" in capsys.readouterr().err

    args = parse(["timeline", "home", "--file", str(tmp_path / "missing.jsonl")])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "cannot read" in err and "missing.jsonl" in err

    with pytest.raises(SystemExit):
        parse(["timeline", "home", "--last", "0"])


# --- OTLP receiver -------------------------------------------------------------------------------

@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver("127.0.0.1", 0)
    yield r
    r.stop()


def test_grpc_receiver_gets_the_same_spans_as_the_file(tmp_path: Path, receiver: OtlpReceiver) -> None:
    assert receiver.port > 0
    with pytest.raises(RuntimeError):  # a busy port fails instead of being shared
        OtlpReceiver("127.0.0.1", receiver.port)
    path = tmp_path / "spans.jsonl"
    provider = agent("node-b", SpanFileExporter(path),
                     OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True, timeout=5))
    tracer = provider.get_tracer("nfs-ha")
    root = tracer.start_span("vfs.takeover", start_time=T0, attributes=root_attrs("home", "node-b", 3, "startup"))
    run_steps(tracer, root, TAKEOVER_STEPS, T0, "home", "node-b", fail="mount")
    root.end(end_time=T0 + 500 * MS)
    n = len(TAKEOVER_STEPS) + 1
    received = receiver.wait_for(lambda spans: len(spans) >= n, timeout=15)
    provider.shutdown()
    key = lambda s: s.span_id  # noqa: E731
    assert sorted(received, key=key) == sorted(read_spans([path]), key=key)
    assert [s.status for s in received if s.name == "mount"] == ["ERROR"]
    assert timelines(received, "home")[0].rows[0].name == "vfs.takeover"
    with pytest.raises(TimeoutError, match=r"vfs\.takeover"):
        receiver.wait_for(lambda spans: len(spans) > n, timeout=0.2)


def test_receiver_process_writes_span_file(tmp_path: Path) -> None:
    out = tmp_path / "received.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tests.otlp_receiver", "--listen", "127.0.0.1:0",
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "receiver did not start"
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        endpoint = line.split()[-1]
        provider = agent("node-a", OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=5))
        tracer = provider.get_tracer("nfs-ha")
        root = tracer.start_span("vfs.fence", start_time=T0, attributes=root_attrs("home", "node-a", 4,
                                                                                     "lease_expired"))
        run_steps(tracer, root, RELEASE_STEPS, T0, "home", "node-a")
        root.end(end_time=T0 + 80 * MS)
        provider.shutdown()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (not out.exists() or len(read_spans([out])) < 6):
            time.sleep(0.05)
        spans = read_spans([out])
        assert len(spans) == 6 and {s.resource["host.name"] for s in spans} == {"node-a"}
        [tl] = timelines(spans, "home")
        assert (tl.root, tl.cause) == ("vfs.fence", "lease_expired")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# --- Jaeger --------------------------------------------------------------------------------------

TRACE = "0af7651916cd43dd8448eb211c80319c"
MOVE, RELEASE, TAKEOVER, ARP = "b7ad6b7169203331", "00f067aa0ba902b7", "0c2c7b9a1c3e5f01", "1a2b3c4d5e6f7081"
T0_US = T0 // 1000


def jaeger_span(span_id: str, name: str, start_ms: int, dur_ms: int, pid: str, parent: str | None,
                tags: list[dict[str, Any]]) -> dict[str, Any]:
    refs = [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": parent}] if parent else []
    return {"traceID": TRACE, "spanID": span_id, "operationName": name, "references": refs,
            "startTime": T0_US + start_ms * 1000, "duration": dur_ms * 1000, "processID": pid, "tags": tags,
            "logs": [], "flags": 1}


def tag(key: str, value: Any, type_: str = "string") -> dict[str, Any]:
    return {"key": key, "type": type_, "value": value}


JAEGER_DOC = {"data": [{
    "traceID": TRACE,
    "spans": [
        jaeger_span(MOVE, "vfs.move", 0, 80, "p1", None,
                    [tag("nfs_ha.vfs", "home"), tag("nfs_ha.cause", "intent"), tag("nfs_ha.epoch", 7, "int64"),
                     tag("span.kind", "internal"), tag("otel.scope.name", "nfs-ha")]),
        jaeger_span(RELEASE, "vfs.release", 0, 80, "p1", MOVE, [tag("nfs_ha.vfs", "home")]),
        jaeger_span(TAKEOVER, "vfs.takeover", 83, 300, "p2", MOVE,
                    [tag("nfs_ha.vfs", "home"), tag("otel.status_code", "ERROR"), tag("error", True, "bool"),
                     tag("otel.status_description", "refused")]),
        jaeger_span(ARP, "arp_probe", 85, 250, "p2", TAKEOVER,
                    [tag("nfs_ha.vfs", "home"), tag("nfs_ha.node", "node-b"), tag("otel.status_code", "ERROR"),
                     tag("otel.status_description", "VIP answered by 02:00:00:00:00:0a")]),
    ],
    "processes": {
        "p1": {"serviceName": "nfs-ha-agent", "tags": [tag("hostname", "node-a")]},
        "p2": {"serviceName": "nfs-ha-agent", "tags": [tag("host.name", "node-b")]},
    },
    "warnings": None,
}], "total": 0, "limit": 0, "offset": 0, "errors": None}


@pytest.fixture
def jaeger() -> Iterator[tuple[str, list[str]]]:
    """A local stand-in for Jaeger's query API: (base URL, request paths seen)."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.path)
            ok = urllib.parse.urlsplit(self.path).path == "/api/traces"
            body = json.dumps(JAEGER_DOC if ok else {"data": None, "errors": [{"code": 404, "msg": "no"}]}).encode()
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_spans_from_jaeger(jaeger: tuple[str, list[str]]) -> None:
    url, seen = jaeger
    spans = spans_from_jaeger(url + "/", "nfs-ha-agent", limit=20, timeout=5, tags={"nfs_ha.vfs": "home"})
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(seen[0]).query)
    assert urllib.parse.urlsplit(seen[0]).path == "/api/traces"
    assert query == {"service": ["nfs-ha-agent"], "limit": ["20"], "tags": ['{"nfs_ha.vfs": "home"}']}
    named = {s.name: s for s in spans}
    move, takeover, arp = named["vfs.move"], named["vfs.takeover"], named["arp_probe"]
    assert move.trace_id == TRACE and move.span_id == MOVE and move.parent_span_id is None
    assert takeover.parent_span_id == MOVE and arp.parent_span_id == TAKEOVER
    assert move.start_ns == T0 and move.end_ns == T0 + 80 * MS
    assert move.attributes == {"nfs_ha.vfs": "home", "nfs_ha.cause": "intent", "nfs_ha.epoch": 7}
    assert move.resource == {"hostname": "node-a", "host.name": "node-a", "service.name": "nfs-ha-agent"}
    assert (arp.status, arp.status_message, arp.node) == ("ERROR", "VIP answered by 02:00:00:00:00:0a", "node-b")
    assert (takeover.status, takeover.status_message, move.status) == ("ERROR", "refused", "UNSET")
    [tl] = timelines(spans, "home")
    assert [r.name for r in tl.rows] == ["vfs.move", "vfs.release", "vfs.takeover", "arp_probe"]
    assert tl.nodes == ["node-a", "node-b"] and tl.duration_s == pytest.approx(0.383)


def test_jaeger_errors(jaeger: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = jaeger
    for bad in ("file:///etc/passwd", "ftp://x/", "http://"):
        with pytest.raises(SpanSourceError, match="http"):
            spans_from_jaeger(bad, "nfs-ha-agent", 20, 1)
    with pytest.raises(SpanSourceError, match="HTTP 404"):
        spans_from_jaeger(url + "/prefix-that-is-not-there", "nfs-ha-agent", 20, 5)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    args = parse(["timeline", "home", "--jaeger", f"http://127.0.0.1:{closed}"])
    assert args.func(args) == 2
    assert "cannot reach Jaeger" in capsys.readouterr().err
    args = parse(["timeline", "home", "--jaeger", url, "--last", "1"])
    assert args.func(args) == 0
    assert "arp_probe" in capsys.readouterr().out


def test_a_full_span_file_is_rotated_and_timeline_reads_the_rotated_files_too(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On by default, the span file must not fill the disk: rotated at a size, three kept; the
    timeline of a failover whose spans straddle a rotation is still whole."""
    path = tmp_path / "spans.jsonl"
    exporter = SpanFileExporter(path, rotate_bytes=8000)
    provider = agent("node-b", exporter)
    tracer = provider.get_tracer("nfs-ha")
    for i in range(12):  # each takeover is several lines of a few hundred bytes
        root = tracer.start_span("vfs.takeover", start_time=T0 + i * 10**9,
                                 attributes=root_attrs("home", "node-b", 10 + i, "node_lost"))
        root.end(end_time=run_steps(tracer, root, TAKEOVER_STEPS, T0 + i * 10**9, "home", "node-b"))
    provider.shutdown()
    assert [p.name for p in rotated(path)] == ["spans.jsonl.3", "spans.jsonl.2", "spans.jsonl.1", "spans.jsonl"]
    assert not (tmp_path / "spans.jsonl.4").exists()
    assert all(p.stat().st_size < 8000 + 2000 for p in rotated(path))
    args = parse(["timeline", "home", "--file", str(path), "--last", "50", "--json"])
    assert args.func(args) == 0
    found = json.loads(capsys.readouterr().out)
    whole = sorted(tl["epoch"] for tl in found if len(tl["rows"]) == 1 + len(TAKEOVER_STEPS))
    assert whole[-4:] == [18, 19, 20, 21]  # the newest, across the rotated files, none cut in half
