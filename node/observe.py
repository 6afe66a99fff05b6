"""The agent's HTTP endpoint for monitoring: /metrics (Prometheus), /healthz and /readyz.

- /metrics: controller/metrics.py's registry, in Prometheus' text format (OpenMetrics if asked).
- /healthz: 200 while this node serves what it holds; 503 with the problems otherwise (the fence
  guard is gone, a held VFS's VIP is not on the interface or its disk is not mounted, a holding is
  within its last keepalive interval of its self-fence deadline). Body: JSON {"ok", "problems"}.
- /readyz: 200 once the agent is registered and placing VFS, 503 before that and while stopping.
GET only, no authentication: bind it (metrics_address) to a management address, not to the
client-facing one. A server that cannot start (the port is taken) is logged and counted; the agent
goes on without it. The handlers only read: nothing here can change what the agent holds.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from controller import loops

log = logging.getLogger(__name__)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT; ValueError naming metrics_address otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ \0"):
        raise ValueError(f"metrics_address must be HOST:PORT (or off), got {text!r}")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never holds up the agent's exit


class _Server6(_Server):
    address_family = socket.AF_INET6


class ObservabilityServer:
    def __init__(self, address: str, registry: CollectorRegistry, problems: Callable[[], list[str]],
                 ready: Callable[[], bool]) -> None:
        self.address = parse_address(address)
        self._registry, self._problems, self._ready = registry, problems, ready
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> bool:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with loops.guarded("metrics-http", self.path[:40], log):
                    outer._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("%s %s", self.address_string(), format % args)

        try:
            self._server = (_Server6 if ":" in self.address[0] else _Server)(self.address, Handler)
        except OSError as exc:
            loops.record("metrics-http", exc, f"{self.address[0]}:{self.address[1]}", log)
            log.error("metrics, /healthz and /readyz are off: cannot listen on %s:%d: %s", *self.address, exc)
            return False
        threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("metrics, /healthz and /readyz on http://%s:%d/", *self.address)
        return True

    def _answer(self, req: BaseHTTPRequestHandler) -> None:
        path = req.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(req.headers.get("Accept", ""))
            self._send(req, 200, encoder(self._registry), content_type)
        elif path == "/healthz":
            problems = self._problems()
            body = json.dumps({"ok": not problems, "problems": problems}).encode() + b"\n"
            self._send(req, 503 if problems else 200, body, "application/json")
        elif path == "/readyz":
            ready = self._ready()
            self._send(req, 200 if ready else 503, json.dumps({"ready": ready}).encode() + b"\n", "application/json")
        else:
            self._send(req, 404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, code: int, body: bytes, content_type: str) -> None:
        req.send_response(code)
        req.send_header("Content-Type", content_type)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
