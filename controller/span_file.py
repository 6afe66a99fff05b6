"""Spans as OTLP/JSON lines in a local file, and the readers `nfs-ha timeline` uses.

File format: UTF-8 (in practice ASCII), one line per `export()` call, each line one OTLP/JSON
`ExportTraceServiceRequest` (https://opentelemetry.io/docs/specs/otlp/#json-protobuf-encoding):
camelCase field names, trace/span ids as lowercase hex, 64-bit integers (times in unix nanoseconds,
`intValue`) as decimal strings, enums as integers. It is what an OpenTelemetry Collector's file
exporter writes, so the files can be replayed into any OTLP backend.

The same JSON is the one internal representation: OTLP requests received over gRPC (the test
receiver) are converted to it and parsed by the same code as the files. Jaeger's query API is a
second source, converted to the same `SpanRecord`.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

log = logging.getLogger(__name__)

TRACE_ID_BYTES = 16
SPAN_ID_BYTES = 8
# OTLP status codes; names are accepted too because other writers may emit them.
_STATUS = {0: "UNSET", 1: "OK", 2: "ERROR", "STATUS_CODE_UNSET": "UNSET", "STATUS_CODE_OK": "OK",
           "STATUS_CODE_ERROR": "ERROR"}


class SpanSourceError(Exception):
    """Spans could not be read at all (missing file, unreachable or failing Jaeger, bad URL)."""


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, independent of where it was read from."""

    trace_id: str  # 32 lowercase hex digits
    span_id: str  # 16 lowercase hex digits
    parent_span_id: str | None  # None for a root span
    name: str
    start_ns: int  # unix nanoseconds
    end_ns: int
    status: str  # "OK", "ERROR" or "UNSET"
    status_message: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)  # service.name, host.name, ...

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    @property
    def node(self) -> str:
        """The node the span ran on: its nfs_ha.node attribute, else the resource's host.name."""
        return str(self.attributes.get("nfs_ha.node") or self.resource.get("host.name") or "")


# --- writing -------------------------------------------------------------------------------------

def _b64_to_hex(value: str) -> str:
    return base64.b64decode(value).hex()


def _hex_ids(obj: dict[str, Any], keys: Sequence[str]) -> None:
    for key in keys:
        if key in obj:
            obj[key] = _b64_to_hex(obj[key])


def request_to_json(request: ExportTraceServiceRequest) -> dict[str, Any]:
    """The OTLP/JSON form of a request (protobuf's JSON mapping would give base64 ids)."""
    doc = MessageToDict(request, use_integers_for_enums=True)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                _hex_ids(span, ("traceId", "spanId", "parentSpanId"))
                for link in span.get("links", []):
                    _hex_ids(link, ("traceId", "spanId"))
    return doc


def request_to_line(request: ExportTraceServiceRequest) -> str:
    """One line of a span file, newline included."""
    return json.dumps(request_to_json(request), separators=(",", ":")) + "\n"


def append_line(path: Path, line: str) -> None:
    """Append one line with a single O_APPEND write, so writers never interleave within a line.

    The file is opened per call: a rotated or deleted file is simply recreated (no reopen signal
    needed), and nothing sits in a user-space buffer. Raises OSError.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    try:
        data = memoryview(line.encode("utf-8"))
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


DEFAULT_SPAN_FILE = "/var/log/nfs-ha/spans.jsonl"  # the agent's default and `nfs-ha timeline`'s
ROTATE_BYTES = 32 * 1024 * 1024
ROTATE_KEEP = 3  # spans.jsonl.1 (newest) .. .3 (oldest)


def rotated(path: Path, keep: int = ROTATE_KEEP) -> list[Path]:
    """`path` and its rotated files that exist, oldest first (the order to read them in)."""
    files = [path.with_name(f"{path.name}.{i}") for i in range(keep, 0, -1)] + [path]
    return [f for f in files if f.exists()]


def rotate(path: Path, keep: int = ROTATE_KEEP) -> None:
    """spans.jsonl -> .1 -> .2 ... -> .keep (the oldest is dropped). Renames only: a reader keeps its file."""
    for i in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{i + 1}"))
    os.replace(path, path.with_name(f"{path.name}.1"))


class SpanFileExporter(SpanExporter):
    """Appends each batch of spans to `path` as one OTLP/JSON line. Never raises into the SDK.

    The file is rotated once it reaches `rotate_bytes` (ROTATE_KEEP files kept), so a span file on by
    default never fills the disk; `nfs-ha timeline` reads the rotated files too."""

    def __init__(self, path: str | os.PathLike[str], rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self._lock = threading.Lock()
        self._shutdown = False
        self._failing = False  # warn once per outage, not once per batch

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shutdown:
            return SpanExportResult.FAILURE
        if not spans:
            return SpanExportResult.SUCCESS
        try:
            line = request_to_line(encode_spans(spans))
        except Exception:  # a span the encoder chokes on must not break a failover
            log.warning("cannot encode %d spans for %s; dropped", len(spans), self.path, exc_info=True)
            return SpanExportResult.FAILURE
        with self._lock:
            try:
                if self.path.exists() and self.path.stat().st_size >= self.rotate_bytes:
                    rotate(self.path)
                append_line(self.path, line)
            except OSError as exc:
                if not self._failing:
                    log.warning("cannot write spans to %s: %s; dropping spans until it works again", self.path, exc)
                self._failing = True
                return SpanExportResult.FAILURE
            if self._failing:
                log.warning("writing spans to %s again", self.path)
                self._failing = False
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self._shutdown = True

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # every export is already in the kernel


# --- reading OTLP/JSON ---------------------------------------------------------------------------

def _norm_id(value: Any, nbytes: int) -> str:
    """Lowercase hex; also accepts base64 ids (protobuf's default JSON mapping) from other writers."""
    if not isinstance(value, str):
        raise ValueError(f"id is not a string: {value!r}")
    if len(value) == 2 * nbytes:
        return bytes.fromhex(value).hex()
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"bad id {value!r}") from exc
    if len(raw) != nbytes:
        raise ValueError(f"bad id {value!r}")
    return raw.hex()


def _any_value(value: Mapping[str, Any]) -> Any:
    """The Python value of an OTLP/JSON AnyValue."""
    if "stringValue" in value:
        return value["stringValue"]
    if "boolValue" in value:
        return bool(value["boolValue"])
    if "intValue" in value:
        return int(value["intValue"])
    if "doubleValue" in value:
        return float(value["doubleValue"])
    if "arrayValue" in value:
        return [_any_value(v) for v in value["arrayValue"].get("values", [])]
    if "kvlistValue" in value:
        return _attributes(value["kvlistValue"].get("values", []))
    if "bytesValue" in value:
        return value["bytesValue"]  # left base64: only shown, never interpreted
    return None


def _attributes(items: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {item["key"]: _any_value(item.get("value", {})) for item in items}


def _record(span: Mapping[str, Any], resource: dict[str, Any]) -> SpanRecord:
    status = span.get("status", {})
    parent = span.get("parentSpanId")
    return SpanRecord(
        trace_id=_norm_id(span["traceId"], TRACE_ID_BYTES),
        span_id=_norm_id(span["spanId"], SPAN_ID_BYTES),
        parent_span_id=_norm_id(parent, SPAN_ID_BYTES) if parent else None,
        name=str(span["name"]),
        start_ns=int(span["startTimeUnixNano"]),
        end_ns=int(span.get("endTimeUnixNano", span["startTimeUnixNano"])),
        status=_STATUS.get(status.get("code", 0), "UNSET"),
        status_message=str(status.get("message", "")),
        attributes=_attributes(span.get("attributes", [])),
        resource=resource,
    )


def spans_from_json(doc: Mapping[str, Any]) -> list[SpanRecord]:
    """The spans of one OTLP/JSON ExportTraceServiceRequest. Raises KeyError/ValueError/TypeError."""
    records = []
    for rs in doc.get("resourceSpans", []):
        resource = _attributes(rs.get("resource", {}).get("attributes", []))
        for ss in rs.get("scopeSpans", []):
            records.extend(_record(span, resource) for span in ss.get("spans", []))
    return records


def _read_file(path: Path) -> list[SpanRecord]:
    records: list[SpanRecord] = []
    bad = 0
    try:
        # errors="replace": a torn or binary line must cost that line only, not the file.
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.extend(spans_from_json(json.loads(line)))
                except (ValueError, KeyError, TypeError, AttributeError):
                    bad += 1
    except OSError as exc:
        raise SpanSourceError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if bad:
        log.warning("%s: skipped %d malformed line%s", path, bad, "" if bad == 1 else "s")
    return records


def read_spans(paths: Iterable[str | os.PathLike[str]]) -> list[SpanRecord]:
    """All spans in the given span files; malformed lines are skipped (one warning per file).

    Raises SpanSourceError when a file cannot be opened or read.
    """
    records: list[SpanRecord] = []
    for path in paths:
        records.extend(_read_file(Path(path)))
    return records


# --- reading Jaeger ------------------------------------------------------------------------------

# Tags Jaeger derives from OTLP fields; they are not span attributes.
_JAEGER_SYNTHETIC = {"otel.status_code", "otel.status_description", "error", "span.kind", "otel.scope.name",
                     "otel.scope.version", "otel.library.name", "otel.library.version", "internal.span.format"}


def _jaeger_tags(tags: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    return {t["key"]: t.get("value") for t in tags}


def _jaeger_resource(process: Mapping[str, Any]) -> dict[str, Any]:
    resource = _jaeger_tags(process.get("tags", []))
    if "hostname" in resource and "host.name" not in resource:
        resource["host.name"] = resource["hostname"]
    resource["service.name"] = process.get("serviceName", "")
    return resource


def _jaeger_parent(span: Mapping[str, Any]) -> str | None:
    refs = span.get("references") or []
    for ref_type in ("CHILD_OF", "FOLLOWS_FROM"):
        for ref in refs:
            if ref.get("refType") == ref_type and ref.get("spanID"):
                return _jaeger_id(ref["spanID"], SPAN_ID_BYTES)
    legacy = span.get("parentSpanID")  # very old Jaeger versions
    return _jaeger_id(legacy, SPAN_ID_BYTES) if legacy and legacy.strip("0") else None


def _jaeger_id(value: str, nbytes: int) -> str:
    # Jaeger drops leading zeros and may carry 64-bit trace ids.
    return _norm_id(value.lower().rjust(2 * nbytes, "0"), nbytes)


def _jaeger_status(tags: Mapping[str, Any]) -> tuple[str, str]:
    code = str(tags.get("otel.status_code", "")).upper()
    if code == "ERROR" or tags.get("error") in (True, "true"):
        return "ERROR", str(tags.get("otel.status_description", ""))
    return ("OK" if code == "OK" else "UNSET"), ""


def _jaeger_span(span: Mapping[str, Any], resources: Mapping[str, dict[str, Any]]) -> SpanRecord:
    tags = _jaeger_tags(span.get("tags", []))
    status, message = _jaeger_status(tags)
    start_ns = int(span["startTime"]) * 1000  # Jaeger times are microseconds
    return SpanRecord(
        trace_id=_jaeger_id(span["traceID"], TRACE_ID_BYTES),
        span_id=_jaeger_id(span["spanID"], SPAN_ID_BYTES),
        parent_span_id=_jaeger_parent(span),
        name=str(span["operationName"]),
        start_ns=start_ns,
        end_ns=start_ns + int(span.get("duration", 0)) * 1000,
        status=status,
        status_message=message,
        attributes={k: v for k, v in tags.items() if k not in _JAEGER_SYNTHETIC},
        resource=dict(resources.get(span.get("processID", ""), {})),
    )


def spans_from_jaeger_json(doc: Mapping[str, Any]) -> list[SpanRecord]:
    """The spans of a Jaeger query API answer (`/api/traces`)."""
    records = []
    for trace in doc.get("data") or []:
        resources = {pid: _jaeger_resource(p) for pid, p in (trace.get("processes") or {}).items()}
        records.extend(_jaeger_span(span, resources) for span in trace.get("spans") or [])
    return records


def _jaeger_query_url(url: str, service: str, limit: int, tags: Mapping[str, str] | None) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SpanSourceError(f"Jaeger URL must be http:// or https://host[:port], not {url!r}")
    if limit < 1:
        raise SpanSourceError(f"limit must be at least 1, not {limit}")
    query = {"service": service, "limit": str(limit)}
    if tags:
        query["tags"] = json.dumps(dict(tags))  # Jaeger filters traces having a span with these tags
    return url.rstrip("/") + "/api/traces?" + urllib.parse.urlencode(query)


def spans_from_jaeger(url: str, service: str = "nfs-ha-agent", limit: int = 20, timeout: float = 10.0,
                      tags: Mapping[str, str] | None = None) -> list[SpanRecord]:
    """Spans of the newest `limit` traces of `service` from Jaeger's HTTP query API at `url`.

    Raises SpanSourceError for a bad URL, an unreachable Jaeger, an HTTP error or a bad answer.
    """
    query_url = _jaeger_query_url(url, service, limit, tags)
    request = urllib.request.Request(query_url, headers={"Accept": "application/json"})
    try:
        # The scheme was checked above: urllib would also open file:// and ftp:// URLs.
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            doc = json.load(answer)
    except urllib.error.HTTPError as exc:
        raise SpanSourceError(f"Jaeger at {url} answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise SpanSourceError(f"cannot reach Jaeger at {url}: {reason}") from exc
    except ValueError as exc:
        raise SpanSourceError(f"Jaeger at {url} did not answer JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise SpanSourceError(f"Jaeger at {url} answered an unexpected document")
    if doc.get("errors"):
        msgs = [str(e.get("msg", e)) if isinstance(e, dict) else str(e) for e in doc["errors"]]
        raise SpanSourceError(f"Jaeger at {url}: {'; '.join(msgs)}")
    try:
        return spans_from_jaeger_json(doc)
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise SpanSourceError(f"Jaeger at {url} answered spans this reader does not understand: {exc!r}") from exc
