"""A real OTLP/gRPC trace receiver for tests: what an agent's OTLPSpanExporter talks to.

In-process:

    receiver = OtlpReceiver("127.0.0.1", 0)   # port 0: the kernel picks one, see .port
    ...                                       # point OTEL_EXPORTER_OTLP_ENDPOINT at it
    spans = receiver.wait_for(lambda spans: any(s.name == "vfs.takeover" for s in spans), timeout=10)
    receiver.stop()

As a process (e.g. inside the lab's client network namespace), writing every request as one
OTLP/JSON line, the format of controller.span_file (read it back with read_spans):

    python -m tests.otlp_receiver --listen 10.77.0.50:4317 --out /tmp/spans.jsonl

It prints `listening on HOST:PORT` once it accepts requests, and stops cleanly on SIGTERM/SIGINT.
Received spans go through the same OTLP/JSON conversion and parser as span files, so a test
compares exactly what a file reader would see.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from controller.span_file import SpanRecord, append_line, request_to_json, request_to_line, spans_from_json


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    # The name is the gRPC method's (opentelemetry.proto.collector.trace.v1.TraceService/Export).
    def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
        self._receiver._store(request)
        return ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP TraceService on host:port, keeping every ResourceSpans it receives."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, out: str | Path | None = None) -> None:
        self.host = host
        self.out = Path(out) if out is not None else None
        self._resource_spans: list[ResourceSpans] = []
        self._cond = threading.Condition()
        # No SO_REUSEPORT (gRPC's default): a busy port must fail, not be shared with another receiver.
        self._server = grpc.server(ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Servicer(self), self._server)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = self._server.add_insecure_port(target)  # raises RuntimeError if it cannot bind
        if self.port == 0:  # older grpcio reports a failed bind this way
            raise RuntimeError(f"cannot listen on {target}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """host:port, as OTLPSpanExporter(endpoint=..., insecure=True) wants it."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _store(self, request: ExportTraceServiceRequest) -> None:
        with self._cond:
            if self.out is not None:
                # Under the lock: gRPC serves requests from several threads.
                append_line(self.out, request_to_line(request))
            self._resource_spans.extend(request.resource_spans)
            self._cond.notify_all()

    def resource_spans(self) -> list[ResourceSpans]:
        with self._cond:
            return list(self._resource_spans)

    def spans(self) -> list[SpanRecord]:
        """Everything received so far, through the same OTLP/JSON path as span files."""
        request = ExportTraceServiceRequest(resource_spans=self.resource_spans())
        return spans_from_json(request_to_json(request))

    def wait_for(self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = 10.0) -> list[SpanRecord]:
        """The spans once `predicate(spans)` holds; TimeoutError (naming what came) if it does not in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                spans = self.spans()
                if predicate(spans):
                    return spans
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s.name for s in spans})
                    raise TimeoutError(f"OTLP receiver: condition not met after {timeout} s; "
                                       f"{len(spans)} spans received: {names}")
                self._cond.wait(left)

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.otlp_receiver", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_parse_listen, default=("127.0.0.1", 4317), metavar="HOST:PORT")
    parser.add_argument("--out", required=True, type=Path, help="append each request as one OTLP/JSON line")
    args = parser.parse_args(argv)
    host, port = args.listen
    try:
        receiver = OtlpReceiver(host, port, out=args.out)
    except RuntimeError as exc:
        print(f"otlp_receiver: {exc}", file=sys.stderr)
        return 1
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"listening on {receiver.endpoint}", flush=True)
    while not stopping.wait(0.5):  # a timed wait lets the signal handler run promptly
        pass
    receiver.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
