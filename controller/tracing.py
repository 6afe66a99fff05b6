"""OpenTelemetry set-up for the agent, and the span helpers the reconcile loop uses.

Configuration is the standard one: OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT),
OTEL_EXPORTER_OTLP_PROTOCOL (grpc, the default, or http/protobuf), OTEL_SERVICE_NAME
(default nfs-ha-agent), OTEL_RESOURCE_ATTRIBUTES; host.name is the node name. Spans can
also be appended to a local file (OTLP/JSON lines) for `nfs-ha timeline`.

Tracing must never slow or break a failover: every exporter sits behind a
BatchSpanProcessor (a bounded queue, exported from its own thread, dropped when full),
and nothing here raises into the caller.

A planned move is one trace across two nodes: the releasing node writes the W3C
traceparent of its `vfs.move` span into the VFS status in etcd, and the node that takes
over uses it as the parent of its `vfs.takeover` span.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

SERVICE_NAME = "nfs-ha-agent"
EXPORT_SECONDS = 5.0
DEFER_SECONDS = 10.0
MAX_QUEUED_SPANS = 16384  # a storm of 1000 takeovers (about 12 spans each) fits
EXPORT_BATCH = 2048
_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer = trace.NoOpTracer()


def _otlp_exporter() -> SpanExporter | None:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint:
        return None
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        return GrpcExporter(timeout=5)
    if protocol in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
        return HttpExporter(timeout=5)
    log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported (grpc, http/protobuf); not exporting", protocol)
    return None


EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.grpc.exporter",
                    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                    "opentelemetry.sdk.trace.export")
QUIET_SECONDS = 60.0


class _ExporterTrouble(logging.Filter):
    """A collector that is down is a warning, not an error of nfs-ha, and once a minute is
    enough: the exporter would otherwise log at ERROR on every retry."""

    def __init__(self) -> None:
        super().__init__()
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if record.levelno < logging.WARNING:
            return True
        now = time.monotonic()
        if now - self._last < QUIET_SECONDS:
            return False
        self._last = now
        return True


def setup(node: str, span_file: str = "") -> TracerProvider:
    """Install the agent's tracer provider; returns it so the agent can flush it on exit."""
    global _tracer
    trouble = _ExporterTrouble()
    for name in EXPORTER_LOGGERS:
        logging.getLogger(name).addFilter(trouble)
    attrs: dict[str, Any] = {"host.name": node}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = SERVICE_NAME
    provider = TracerProvider(resource=Resource.create(attrs))
    exporters: list[SpanExporter] = []
    otlp = _otlp_exporter()
    if otlp is not None:
        exporters.append(otlp)
    if span_file and span_file != "off":
        from controller.span_file import SpanFileExporter
        exporters.append(SpanFileExporter(span_file))
    for exporter in exporters:
        # Exported every EXPORT_SECONDS in one batch, not as batches fill: encoding spans holds the GIL, and
        # during a storm of takeovers (bench/scale, a node of 100 killed) exports every 0.5 s made the last
        # VIP 0.6-0.7 s later (docs/benchmarks.md); this way they mostly run after the storm.
        # Batches of EXPORT_BATCH: one OTLP request stays well under a collector's 4 MiB message limit. A
        # batch that fills mid-storm waits in _Deferred like the others.
        provider.add_span_processor(BatchSpanProcessor(
            _Deferred(exporter), max_queue_size=MAX_QUEUED_SPANS, max_export_batch_size=EXPORT_BATCH,
            schedule_delay_millis=int(EXPORT_SECONDS * 1000), export_timeout_millis=5000))
    _tracer = provider.get_tracer("nfs-ha")
    return provider


def _never() -> bool:
    return False


_busy: Callable[[], bool] = _never


def defer_while(busy: Callable[[], bool]) -> None:
    """Exports wait (at most DEFER_SECONDS) while `busy()` says takeovers run (TakeoverGate.busy)."""
    global _busy
    _busy = busy


def stop_deferring() -> None:
    """The agent is exiting: the last export goes at once (a takeover that never ended must not keep
    its own spans, the ones most needed, from being written)."""
    defer_while(_never)


class _Deferred(SpanExporter):
    """An exporter that waits for the takeovers in flight to end before it encodes and sends (encoding
    holds the GIL the takeovers need); never longer than DEFER_SECONDS, so a stuck takeover delays
    spans, never drops them."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        deadline = time.monotonic() + DEFER_SECONDS
        while _busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.inner.export(spans)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


def tracer() -> trace.Tracer:
    return _tracer


def traceparent(span: Span) -> str:
    """The W3C traceparent of a span, to carry through etcd ('' if not recording)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def context_from(value: Any) -> Context | None:
    """A parent context from a traceparent found in etcd; None if absent or malformed."""
    if not isinstance(value, str) or not value:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": value})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def fail(span: Span, error: BaseException | str) -> None:
    """Record an error on a span, with status ERROR."""
    if isinstance(error, BaseException):
        span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, str(error)))


@contextlib.contextmanager
def child(parent: Span, name: str, attrs: dict[str, Any], start_time: int | None = None) -> Iterator[Span]:
    """A step span under `parent`; an exception is recorded on it and re-raised."""
    ctx = trace.set_span_in_context(parent)
    with _tracer.start_as_current_span(name, context=ctx, attributes=attrs, start_time=start_time,
                                       record_exception=False, set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            fail(span, exc)
            raise
