"""One etcd LeaseKeepAlive stream for all of a node's leases, spoken over HTTP/2 with `h2`.

Why not grpcio's stream (what store.EtcdStore uses for everything else): measured on the 2-core
lab machine, 100 leases renewed every 0.5 s (200 keepalives/s) cost 5.5 % of a core over a grpcio
stream when sent in rounds and 8.5 % when spread out, 3.6 % over grpc.aio, and 0.5 % here
(docs/benchmarks.md, "Keepalive stream"). grpcio hands every message between three Python threads
(request iterator, channel spin, reader); here a round of keepalives is one socket write and its
answers arrive in a few reads. gRPC on HTTP/2 adds only a 5-byte prefix per message (compressed
flag, length); `h2` (a maintained library) does HTTP/2 itself: framing, flow control, settings,
ping answers, GOAWAY.

Contract (coordination.Coordination.lease_stream, as etcd's clientv3 keeps leases alive):
- send_many(lease_ids, sending) calls `sending(generation)` before the requests leave (so an answer
  always finds its request recorded) and returns without waiting for answers. StoreError only if no
  connection could be opened (nothing was sent; `sending` was not called).
- `on_answer(lease_id, ttl, generation)` for every answer, in etcd's order (a stream is answered in
  order); ttl <= 0: etcd no longer has the lease. An answer being reported while its generation
  ends (a reset() on another thread) can still come just after on_ended: the caller matches answers
  to its own record of each generation's requests (ownership.LeaseKeeper does).
- A generation is one connection. When it ends (an error, a failed write, the peer's end, reset())
  `on_ended(generation)` is told once, no answer of it is reported after that, and the next send
  opens a new connection on the next endpoint. close() ends it without on_ended.
- TLS (https endpoints): the TLS state is driven through memory BIOs under the connection's `io`
  lock, so the reader thread and the keeper's writes never use OpenSSL's connection at once; the
  handshake, like the TCP connect, is bounded by CONNECT_TIMEOUT and must agree on HTTP/2 (ALPN).
- etcd authentication: the call carries the store's current token, if it has one; a call etcd ends
  as UNAUTHENTICATED (the token expired) has the store drop that token (store.EtcdStore.stream_token),
  so the next call of another thread logs in again; this thread never logs in.
Not guaranteed: that a request is answered at all, or in time; the keeper (ownership.LeaseKeeper)
resets a stream that answers nothing for a keepalive interval.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from pyetcd.etcdrpc import rpc_pb2

from controller import loops
from controller.store import StoreError

log = logging.getLogger(__name__)

PATH = b"/etcdserverpb.Lease/LeaseKeepAlive"
# Connecting is synchronous on the keeper's thread, so a black-holed endpoint may hold every lease's
# keepalive up this long (then the next endpoint is tried): well under a keepalive interval (TTL/4).
# With TLS the handshake has as long again: a frozen etcd accepts TCP (the kernel does) and stalls the
# handshake instead, so one failing endpoint costs at most 2 x CONNECT_TIMEOUT.
CONNECT_TIMEOUT = 0.3
SEND_TIMEOUT = 0.3  # a peer that stopped reading: the write fails, the generation ends
PREFIX = struct.Struct(">BI")  # gRPC message prefix: compressed flag, length


def first_endpoint(count: int) -> int:
    """Where a new stream starts: a random endpoint, so the nodes' streams spread over the members."""
    return random.randrange(count)


class _Connection:
    """One TCP connection carrying one LeaseKeepAlive call. `io` guards the h2 state and socket writes."""

    def __init__(self, host: str, port: int, addresses: list[tuple[int, tuple[Any, ...]]],
                 tls: ssl.SSLContext | None = None, token: str | None = None) -> None:
        self.sock = _connect(addresses)
        self.tls: ssl.SSLObject | None = None
        try:
            if tls is not None:
                self._handshake(tls, host)
            self._start(host, port, token)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, ctx: ssl.SSLContext, host: str) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(self._in, self._out, server_hostname=host)
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                self.sock.settimeout(max(0.001, deadline - time.monotonic()))
                data = self.sock.recv(65536)
                if not data:
                    raise OSError("etcd closed the connection during the TLS handshake") from None
                self._in.write(data)
        self.sock.sendall(self._out.read())
        if tls.selected_alpn_protocol() != "h2":
            raise OSError("etcd did not agree to HTTP/2 in the TLS handshake (ALPN)")
        self.tls = tls

    def _send(self, data: bytes) -> None:
        """Send bytes of the HTTP/2 connection (encrypted first with TLS). Under `io`, or before the reader runs."""
        if self.tls is not None:
            self.tls.write(data)
            data = self._out.read()
        self.sock.sendall(data)

    def _decrypt(self, data: bytes) -> bytes:
        """The HTTP/2 bytes in what the socket gave (all of it without TLS). Under `io`."""
        if self.tls is None:
            return data
        self._in.write(data)
        plain = bytearray()
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise OSError("etcd closed the TLS session") from None
            if not chunk:
                break
            plain += chunk
        pending = self._out.read()  # e.g. the answer to a TLS key update
        if pending:
            self.sock.sendall(pending)
        return bytes(plain)

    def _start(self, host: str, port: int, token: str | None) -> None:
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(None)  # reads block until data or shutdown(); writes have SO_SNDTIMEO
        secs = int(SEND_TIMEOUT)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                             struct.pack("ll", secs, int((SEND_TIMEOUT - secs) * 1e6)))
        self.io = threading.Lock()
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        self.stream_id = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"https" if self.tls else b"http"), (b":path", PATH),
                   (b":authority", f"{host}:{port}".encode()), (b"content-type", b"application/grpc"),
                   (b"te", b"trailers")]
        if token:
            headers.append((b"token", token.encode()))
        self.h2.send_headers(self.stream_id, headers)
        self._send(self.h2.data_to_send())

    def write(self, payload: bytes) -> None:
        with self.io:
            if self.h2.local_flow_control_window(self.stream_id) < len(payload):
                raise OSError("etcd stopped taking keepalives (HTTP/2 flow-control window exhausted)")
            step = self.h2.max_outbound_frame_size
            for i in range(0, len(payload), step):
                self.h2.send_data(self.stream_id, payload[i:i + step])
            self._send(self.h2.data_to_send())

    def receive(self, data: bytes) -> list[h2.events.Event]:
        with self.io:
            events = self.h2.receive_data(self._decrypt(data))
            for ev in events:
                if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            out = self.h2.data_to_send()  # window updates, settings and ping acknowledgements
            if out:
                self._send(out)
        return events

    def shut(self) -> None:
        """End it from any thread: wakes the reader blocked in recv(), which then closes the socket
        (closing it here could hand its descriptor number to the next connection under the reader)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Ended(Exception):
    """The call or the connection ended (the message says how)."""

    def __init__(self, message: str, unauthenticated: bool = False) -> None:
        super().__init__(message)
        self.unauthenticated = unauthenticated


class H2LeaseStream:
    def __init__(self, endpoints: Sequence[tuple[str, int]], on_answer: Callable[[int, int, int], None],
                 on_ended: Callable[[int], None], tls: Callable[[], ssl.SSLContext] | None = None,
                 token: Callable[[str | None], str | None] | None = None) -> None:
        self._endpoints = list(endpoints)
        self._tls = tls  # makes the TLS context at each connection: rotated certificate files are read anew
        self._token = token  # the auth token: token(refused) (store.EtcdStore.stream_token)
        self._sent_token: str | None = None
        self._refused_token: str | None = None  # etcd ended a call for this token: the store drops it
        self._addresses: dict[tuple[str, int], list[tuple[int, tuple[Any, ...]]]] = {}  # see _resolved
        self._at = first_endpoint(len(self._endpoints))
        self._on_answer = on_answer
        self._on_ended = on_ended
        self._lock = threading.Lock()  # generation and connection; never held while calling back
        self.generation = 0
        self._conn: _Connection | None = None

    def send(self, lease_id: int, sending: Callable[[int], None]) -> None:
        self.send_many([lease_id], sending)

    def send_many(self, lease_ids: Sequence[int], sending: Callable[[int], None]) -> None:
        payload = b"".join(_message(rpc_pb2.LeaseKeepAliveRequest(ID=i).SerializeToString()) for i in lease_ids)
        with self._lock:
            if self._conn is None:
                self._open()
            conn, generation = self._conn, self.generation
            assert conn is not None
            sending(generation)
            try:
                conn.write(payload)
                return
            except (OSError, h2.exceptions.H2Error) as exc:
                log.debug("keepalive write failed on %s: %s", self.where(), exc)
        self._ended(generation, failed=True)  # its requests are lost: on_ended tells the keeper

    def where(self) -> str:
        """The endpoint in use (or to be used by the next connection)."""
        host, port = self._endpoints[self._at]
        return f"{host}:{port}"

    def _open(self) -> None:
        """Connect to the current endpoint (the next one after a failure). Under self._lock."""
        host, port = self._endpoints[self._at]
        token = self._token(self._refused_token) if self._token is not None else None
        self._refused_token = None
        try:
            tls = self._tls() if self._tls is not None else None
        except ValueError as exc:  # the files, mid-rotation: like a failed connection, nothing was sent
            raise StoreError(f"etcd lease keepalive stream: {exc}") from exc
        try:
            conn = _Connection(host, port, self._resolved(host, port), tls, token)
        except (OSError, h2.exceptions.H2Error) as exc:  # ssl.SSLError is an OSError
            self._addresses.pop((host, port), None)  # a name may have moved: looked up again next time
            self._at = (self._at + 1) % len(self._endpoints)
            raise StoreError(f"etcd lease keepalive stream to {host}:{port} failed: {exc}") from exc
        reader = threading.Thread(target=self._read, args=(conn, self.generation + 1), name="lease-stream",
                                  daemon=True)
        self.generation += 1
        self._conn = conn
        self._sent_token = token
        try:
            reader.start()
        except RuntimeError as exc:  # "can't start new thread": nobody would ever read it
            self._conn = None
            conn.sock.close()
            raise StoreError(f"etcd lease keepalive stream: no reader thread: {exc}") from exc

    def _resolved(self, host: str, port: int) -> list[tuple[int, tuple[Any, ...]]]:
        """The endpoint's socket addresses (family, sockaddr), looked up once and kept until connecting to
        all of them fails: a name lookup has no timeout and this runs on the keeper's thread (every
        lease would wait for a slow DNS server). Endpoints are normally addresses."""
        if (host, port) not in self._addresses:
            self._addresses[(host, port)] = [(family, sockaddr) for family, _type, _proto, _name, sockaddr
                                             in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        return self._addresses[(host, port)]

    def _read(self, conn: _Connection, generation: int) -> None:
        pending = bytearray()
        try:
            while True:
                data = conn.sock.recv(65536)
                if not data:
                    raise _Ended("etcd closed the connection")
                for ev in conn.receive(data):
                    if generation != self.generation:
                        return  # given up on: none of its answers counts any more
                    if isinstance(ev, h2.events.DataReceived) and ev.stream_id == conn.stream_id:
                        pending += ev.data
                        self._answers(pending, generation)
                    else:
                        _check(ev, conn.stream_id)
        except _Ended as exc:
            if generation == self.generation:
                log.debug("lease keepalive stream ended: %s", exc)
                if exc.unauthenticated:
                    self._refused_token = self._sent_token
        except (OSError, h2.exceptions.H2Error) as exc:  # ssl.SSLError is an OSError
            if generation == self.generation:
                log.debug("lease keepalive stream failed: %s: %s", type(exc).__name__, exc)
        except Exception as exc:  # a bug: counted; the requests left unanswered make the keeper reset
            loops.record("keepalive-stream", exc, logger=log)
        finally:
            self._ended(generation, failed=True)
            conn.sock.close()

    def _answers(self, pending: bytearray, generation: int) -> None:
        """Report every whole message in `pending` and remove it."""
        while len(pending) >= PREFIX.size and generation == self.generation:
            compressed, length = PREFIX.unpack_from(pending)
            if compressed:
                raise _Ended("etcd sent a compressed message (none was negotiated)")
            end = PREFIX.size + length
            if len(pending) < end:
                return
            resp = rpc_pb2.LeaseKeepAliveResponse.FromString(bytes(pending[PREFIX.size:end]))
            del pending[:end]
            try:  # not loops.guarded: this is the hot path (hundreds a second), an error the exception
                self._on_answer(resp.ID, resp.TTL, generation)
            except Exception as exc:
                loops.record("keepalive-answer", exc, f"lease {resp.ID:x}", log)

    def _ended(self, generation: int, failed: bool) -> None:
        with self._lock:
            if generation != self.generation or self._conn is None:
                return
            conn, self._conn = self._conn, None
            self.generation += 1
            if failed:
                self._at = (self._at + 1) % len(self._endpoints)
        conn.shut()
        if failed:
            with loops.guarded("keepalive-stream", "end of a stream", log):
                self._on_ended(generation)

    def reset(self) -> None:
        """Give the current stream up (no answer in time): a new one, on the next endpoint, on the next send."""
        self._ended(self.generation, failed=True)

    def close(self) -> None:
        self._ended(self.generation, failed=False)


def _connect(addresses: list[tuple[int, tuple[Any, ...]]]) -> socket.socket:
    """A connected socket to the first of `addresses` that accepts within CONNECT_TIMEOUT each (as
    socket.create_connection, but with the addresses already looked up; the whole sockaddr, so an
    IPv6 scope id is kept)."""
    error: OSError = OSError("no address to connect to")
    for family, sockaddr in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(CONNECT_TIMEOUT)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _message(body: bytes) -> bytes:
    return PREFIX.pack(0, len(body)) + body


def _check(ev: h2.events.Event, stream_id: int) -> None:
    """Anything but data: raise _Ended if it ends the call (HTTP or gRPC error, stream or connection end)."""
    if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived) and ev.stream_id == stream_id:
        headers = dict(ev.headers)
        status, grpc_status = headers.get(b":status"), headers.get(b"grpc-status")
        if status not in (None, b"200") or grpc_status not in (None, b"0"):
            raise _Ended(f"HTTP status {status!r}, grpc-status {grpc_status!r}: {headers.get(b'grpc-message', b'')!r}",
                         unauthenticated=grpc_status == b"16")
    elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset) and ev.stream_id == stream_id:
        raise _Ended(f"the call ended ({type(ev).__name__})")
    elif isinstance(ev, h2.events.ConnectionTerminated):
        raise _Ended(f"etcd ended the connection (GOAWAY, error code {ev.error_code})")
