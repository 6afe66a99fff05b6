"""The agent's HTTP endpoint for monitoring: /metrics (Prometheus), /healthz and /readyz.

- /metrics: controller/metrics.py's registry, in Prometheus' text format (OpenMetrics if asked).
- /healthz: 200 while this node serves what it holds; 503 with the problems otherwise (the fence
  guard is gone, a held VFS's VIP is not on the interface or its disk is not mounted, a holding is
  within its last keepalive interval of its self-fence deadline). Body: JSON {"ok", "problems"}.
- /readyz: 200 once the agent is registered and placing VFS, 503 before that and while stopping.
GET only, no authentication: bind it (metrics_address) to a management address, not to the
client-facing one. A server that cannot start (the port is taken) is logged and counted; the agent
goes on without it. The handlers only read: nothing here can change what the agent holds, and a
scraper cannot make it work harder than once a second per page (answers are cached for CACHE_SECONDS),
have more than MAX_CLIENTS requests answered at once, open more than MAX_CONNECTIONS connections
(threads), or keep an idle one past TIMEOUT.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from controller import loops

log = logging.getLogger(__name__)

CACHE_SECONDS = 1.0
MAX_CLIENTS = 8  # requests answered at once
MAX_CONNECTIONS = 32  # connections open at once
TIMEOUT = 5.0


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT; ValueError naming metrics_address otherwise."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c in host for c in "/ \0"):
        raise ValueError(f"metrics_address must be HOST:PORT (or off), got {text!r}")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections (each a thread, at most TIMEOUT idle); more are closed at once."""

    daemon_threads = True  # a slow scraper never holds up the agent's exit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._connections.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class ObservabilityServer:
    def __init__(self, address: str, registry: CollectorRegistry, problems: Callable[[], list[str]],
                 ready: Callable[[], bool]) -> None:
        self.address = parse_address(address)
        self._registry, self._problems, self._ready = registry, problems, ready
        self._server: ThreadingHTTPServer | None = None
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._cache: dict[str, tuple[float, int, bytes, str]] = {}
        self._cache_lock = threading.Lock()  # one computation per page at a time

    def start(self) -> bool:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = TIMEOUT  # an idle or slow client is dropped, its thread freed

            def do_GET(self) -> None:
                if not outer._slots.acquire(blocking=False):
                    outer._send(self, 503, b"busy\n", "text/plain")
                    return
                try:
                    outer._answer(self)
                except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:
                    log.debug("scraper went away: %s", exc)  # its business, not an error of the agent
                except Exception as exc:
                    loops.record("metrics-http", exc, self.path[:40], log)
                finally:
                    outer._slots.release()

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
            self._send(req, *self._cached(f"/metrics {content_type}", lambda: (200, encoder(self._registry),
                                                                              content_type)))
        elif path == "/healthz":
            self._send(req, *self._cached(path, self._health))
        elif path == "/readyz":
            ready = self._ready()
            self._send(req, 200 if ready else 503, json.dumps({"ready": ready}).encode() + b"\n", "application/json")
        else:
            self._send(req, 404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")

    def _health(self) -> tuple[int, bytes, str]:
        problems = self._problems()
        body = json.dumps({"ok": not problems, "problems": problems}).encode() + b"\n"
        return 503 if problems else 200, body, "application/json"

    def _cached(self, key: str, make: Callable[[], tuple[int, bytes, str]]) -> tuple[int, bytes, str]:
        with self._cache_lock:
            hit = self._cache.get(key)
            now = time.monotonic()
            if hit is None or now - hit[0] > CACHE_SECONDS:
                hit = (now, *make())
                self._cache[key] = hit
            return hit[1], hit[2], hit[3]

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
