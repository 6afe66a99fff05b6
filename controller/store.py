"""The etcd store: a thin, typed layer over the python-etcd3 API (`pyetcd`).

All etcd traffic of nfs-ha goes through here, so the client's pitfalls are handled once:
- each endpoint's `time_retry` is lowered (the default shuns an endpoint for 300 s after
  one error, which turns a brief etcd hiccup into a five-minute outage);
- every call has a timeout, and every failure becomes a StoreError that says what it likely
  means (controller/etcdaccess.py: TLS, authentication, RBAC);
- TLS and authentication as controller/etcdaccess.py says; the token is fetched on first use and
  fetched again once when etcd calls it invalid, then the call is retried (a request refused for its
  token was not applied);
- gRPC keepalive pings (no more often than etcd allows) detect a dead connection;
- lease keepalives of all of a node's leases share one LeaseKeepAlive stream, as etcd's own
  client does, spoken with h2 rather than grpcio (controller/leasestream.py says why).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pyetcd
from pyetcd import etcdrpc
from pyetcd.client import Endpoint, EtcdTokenCallCredentials, MultiEndpointEtcd3Client

from controller import loops, metrics
from controller.etcdaccess import EtcdAccess
from controller.view import KeyRecord

if TYPE_CHECKING:
    from controller.leasestream import H2LeaseStream

log = logging.getLogger(__name__)

ENDPOINT_RETRY_SECONDS = 1.0
# etcd's answers to a request whose token it no longer takes: expired or lost with a restart (simple
# tokens), issued before a user or role change (JWT), or none sent.
TOKEN_REFUSED = ("invalid auth token", "revision of auth store is old", "user name is empty")
GRPC_OPTIONS = [
    ("grpc.keepalive_time_ms", 10000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


class StoreError(RuntimeError):
    """etcd could not be reached or refused the request.

    `refused`: etcd or its TLS refused who we are (wrong password, untrusted certificate, no role):
    retrying will not help until the settings or etcd's users are fixed."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: (key, record or None for a delete, revision of the change).

    `revision` is the response header's: the store's revision when it was sent, which during
    a catch-up is ahead of the events; track the events' revisions (controller/view.py).
    """

    revision: int
    events: list[tuple[str, KeyRecord | None, int]]


@dataclass(frozen=True)
class OwnerCreated:
    epoch: int  # the owner key's create_revision
    read: bytes | None = None  # the value of the key create_owner was asked to read, None if absent


def _record(kv: Any) -> KeyRecord:
    return KeyRecord(value=bytes(kv.value), create_revision=kv.create_revision,
                     mod_revision=kv.mod_revision, lease=kv.lease)


def _detail(exc: BaseException) -> str:
    """The gRPC status of a failure (pyetcd replaces some by exceptions without a message)."""
    for err in (exc, exc.__context__, exc.__cause__):
        if isinstance(err, grpc.RpcError) and hasattr(err, "code") and hasattr(err, "details"):
            return f"{err.code().name}: {err.details()}"
    return f"{type(exc).__name__} {exc}".strip()


class EtcdStore:
    def __init__(self, access: EtcdAccess | str | Iterable[str], timeout: float = 2.0) -> None:
        self.access = access if isinstance(access, EtcdAccess) else EtcdAccess.from_settings(access)
        self._endpoints = list(self.access.endpoints)
        self.timeout = timeout
        # Set by close(): grpc 1.85 segfaults when pyetcd makes its first stub of a kind on a closed
        # channel, so every later call must fail here, as a StoreError, before reaching it.
        self._closed = False
        self._lock = threading.Lock()
        self._login_lock = threading.Lock()  # one login at a time: etcd pays a bcrypt for each
        self._files = self.access.files_stamp()
        self._client = self.new_client(timeout)
        self._retired: list[MultiEndpointEtcd3Client] = []  # replaced after a certificate rotation
        self._watch_client: MultiEndpointEtcd3Client | None = None

    def new_client(self, timeout: float) -> MultiEndpointEtcd3Client:
        self._check_open()
        creds = self.access.grpc_credentials()
        eps = [Endpoint(host, port, secure=self.access.tls, creds=creds, time_retry=ENDPOINT_RETRY_SECONDS,
                        opts=GRPC_OPTIONS) for host, port in self._endpoints]
        # No user here: pyetcd would log in at once, and a store is made before etcd need be up.
        return MultiEndpointEtcd3Client(endpoints=eps, timeout=timeout, failover=True)

    def _login(self, client: MultiEndpointEtcd3Client, refused: Any) -> None:
        """Fetch a token for `client` unless another thread already replaced the `refused` metadata."""
        with self._login_lock:
            if client.metadata is not refused:
                return
            request = etcdrpc.AuthenticateRequest(name=self.access.user, password=self.access.password)
            try:
                resp = client.authstub.Authenticate(request, self.timeout)
            except grpc.RpcError as exc:
                client._manage_grpc_errors(exc)  # an unreachable endpoint is skipped next time, as for any call
                raise
            client.call_credentials = grpc.metadata_call_credentials(EtcdTokenCallCredentials(resp.token))
            client.metadata = (("token", resp.token),)

    def stream_token(self, refused: str | None = None) -> str | None:
        """The auth token the lease stream sends (None without a user or before the first login).

        Never logs in itself: it runs on the keeper's thread, where a login (up to the store timeout)
        would hold up every lease's keepalive. `refused`: a token etcd refused on the stream; if it is
        still the current one, the next call of any other thread logs in again (etcd 3.4 and 3.5 do not
        check LeaseKeepAlive's token; later ones may).
        """
        if not self.access.user:
            return None
        client = self._client
        metadata = client.metadata
        token = metadata[0][1] if metadata else None
        if refused is not None and token == refused:
            with self._login_lock:
                if client.metadata is metadata:
                    client.metadata = None
            return None
        return token

    def _certificates_rotated(self) -> None:
        """After a failure: if the TLS files changed, later calls use a client built from the new ones.
        The old client is not closed (calls may still run on it; grpc crashes on a closed channel)."""
        stamp = self.access.files_stamp()
        if stamp == self._files:
            return
        with self._lock:
            if self._closed or stamp == self._files:
                return
            try:
                client = self.new_client(self.timeout)
            except (ValueError, OSError) as exc:  # files mid-rotation: the next failure looks again
                log.warning("etcd TLS files changed but cannot be loaded yet: %s", exc)
                return
            self._files = stamp
            self._retired.append(self._client)
            self._client = client
        log.warning("etcd TLS files changed: new connections use them")

    def endpoint_in_use(self) -> str:
        """host:port of the endpoint the main client talks to now."""
        endpoint = self._client.endpoint_in_use
        return endpoint.netloc if endpoint is not None else ""

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("etcd store is closed")

    def _call(self, what: str, fn: Callable[[], Any], client: MultiEndpointEtcd3Client | None = None) -> Any:
        self._check_open()
        c = client or self._client
        stale: Any = None  # the token etcd refused on the first attempt
        for attempt in (1, 2):
            used = c.metadata
            try:
                if self.access.user and (used is None or used is stale):
                    self._login(c, used)
                return fn()
            except (grpc.RpcError, pyetcd.exceptions.Etcd3Exception, ValueError) as exc:
                detail = _detail(exc)
                if attempt == 1 and self.access.user and used is not None and any(s in detail for s in TOKEN_REFUSED):
                    # Refused for its token alone: etcd applied nothing, so the call is retried once.
                    log.debug("etcd %s: the auth token is no longer valid (%s); logging in again", what, detail)
                    stale = used
                    continue
                metrics.ETCD_ERRORS.labels(what).inc()
                if self.access.tls:
                    self._certificates_rotated()
                raise StoreError(f"etcd {what} failed: {self.access.explain(detail)}",
                                 refused=self.access.refused(detail)) from exc
        raise AssertionError("unreachable")

    # --- reads -------------------------------------------------------------------------

    def load(self, prefix: str) -> tuple[int, dict[str, KeyRecord]]:
        resp = self._call("range", lambda: self._client.get_prefix_response(prefix))
        return resp.header.revision, {kv.key.decode(): _record(kv) for kv in resp.kvs}

    def get(self, key: str) -> KeyRecord | None:
        resp = self._call("get", lambda: self._client.get_response(key))
        return _record(resp.kvs[0]) if resp.kvs else None

    # --- watch ---------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int,
              on_batch: Callable[[WatchBatch | Exception], None]) -> int:
        """Watch a prefix from a revision; `on_batch` gets batches, or the error that ended it.

        The caller re-creates the watch from its last revision + 1 after an error.
        """
        with self._lock:
            self._check_open()  # under the lock: a watch started after close() would never be closed
            old, self._watch_client = self._watch_client, self.new_client(self.timeout)
            client = self._watch_client
        if old is not None:
            old.close()  # after the swap: the error this ends the old stream with is dropped below

        def callback(resp: Any) -> None:
            if self._watch_client is not client:  # a plain read: never wait for a lock close() may hold
                # Closing the old client (just above, on the next re-creation) ends its stream with an
                # error: passed on, it would make the caller re-create the current watch too, forever.
                return
            if isinstance(resp, Exception):
                on_batch(resp)
                return
            events = []
            for ev in resp.events:
                kv = ev._event.kv
                deleted = isinstance(ev, pyetcd.events.DeleteEvent)
                # For a delete, etcd sets kv.mod_revision to the revision of the delete itself
                # (checked against etcd 3.4), so every event carries the revision it happened at.
                events.append((kv.key.decode(), None if deleted else _record(kv), kv.mod_revision))
            # resp.header.revision is the store's current revision, not that of these events.
            on_batch(WatchBatch(resp.header.revision, events))

        return self._call("watch", lambda: client.add_watch_prefix_callback(
            prefix, callback, start_revision=start_revision), client)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            old, self._watch_client = self._watch_client, None
        if old is not None:
            old.close()
        for client in [*self._retired, self._client]:
            client.close()

    # --- leases --------------------------------------------------------------------------

    def lease_stream(self, on_answer: Callable[[int, int, int], None],
                     on_ended: Callable[[int], None]) -> H2LeaseStream:
        """A keepalive stream for many leases; `on_answer(lease_id, ttl, generation)`, `on_ended(generation)`
        (see controller/leasestream.py)."""
        from controller.leasestream import H2LeaseStream  # it imports StoreError from here

        self._check_open()
        return H2LeaseStream(self._endpoints, on_answer, on_ended,
                             tls=self.access.ssl_context if self.access.tls else None,  # read at each connection
                             token=self.stream_token if self.access.user else None)

    def grant(self, ttl: int) -> tuple[int, int]:
        lease = self._call("lease grant", lambda: self._client.lease(ttl))
        return lease.id, lease.ttl

    def keepalive(self, lease_id: int, client: MultiEndpointEtcd3Client | None = None) -> int:
        """One keepalive; returns the TTL etcd granted anew (<= 0: the lease is gone)."""
        c = client or self._client
        responses = self._call("lease keepalive", lambda: list(c.refresh_lease(lease_id)), c)
        if not responses:
            raise StoreError("etcd lease keepalive got no answer")
        return int(responses[0].TTL)

    def revoke(self, lease_id: int) -> None:
        try:
            self._call("lease revoke", lambda: self._client.revoke_lease(lease_id))
        except StoreError as exc:
            if "NotFound" in str(exc) or "not found" in str(exc):
                return
            raise

    # --- writes --------------------------------------------------------------------------

    def put(self, key: str, value: str | bytes, lease: int | None = None) -> None:
        self._call("put", lambda: self._client.put(key, value, lease=lease))

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self._client.delete(key))

    def create_owner(self, owner_key: str, owner_value: str, lease_id: int,
                     also: dict[str, str], read: str | None = None,
                     unchanged: dict[str, int] | None = None) -> OwnerCreated | None:
        """Create the owner key bound to a lease, iff it does not exist and every key in `unchanged`
        still has the mod_revision given (0: absent); also put `also`.

        Returns the owner key's create_revision (the new epoch) and the value of `read` as of that
        same revision (so it is consistent with the epoch), or None if a condition failed.
        """
        c = self._client
        success = [c.transactions.put(owner_key, owner_value, lease=lease_id)]
        success += [c.transactions.put(k, v) for k, v in also.items()]
        if read is not None:
            success.append(c.transactions.get(read))
        success.append(c.transactions.get(owner_key))
        compare = [c.transactions.create(owner_key) == 0]
        compare += [c.transactions.mod(k) == rev for k, rev in (unchanged or {}).items()]
        ok, responses = self._call("owner create", lambda: c.transaction(
            compare=compare, success=success, failure=[]))
        if not ok:
            return None
        _value, meta = responses[-1][0]
        value = None
        if read is not None and responses[-2]:
            value = bytes(responses[-2][0][0])
        return OwnerCreated(int(meta.create_revision), value)

    def delete_if_no_owner(self, owner_key: str, keys: Iterable[str], absent: Iterable[str] = ()) -> bool:
        """Delete `keys` iff the owner key does not exist, nor any key in `absent`.

        Used to remove the status of a deleted VFS: it must never go while somebody owns the
        VFS (or, with its spec key in `absent`, once an operator has written a spec again).
        """
        c = self._client
        compare = [c.transactions.create(k) == 0 for k in (owner_key, *absent)]
        ops = [c.transactions.delete(k) for k in keys]
        ok, _ = self._call("guarded delete", lambda: c.transaction(compare=compare, success=ops, failure=[]))
        return bool(ok)

    def put_if_epoch(self, owner_key: str, epoch: int, puts: dict[str, str],
                     delete_owner: bool = False) -> bool:
        """Write `puts` (and optionally delete the owner key) iff the owner's epoch is `epoch`.

        epoch 0 means "iff there is no owner". This is how status can never be
        overwritten by a node that lost ownership in the meantime.
        """
        c = self._client
        ops = [c.transactions.put(k, v) for k, v in puts.items()]
        if delete_owner:
            ops.append(c.transactions.delete(owner_key))
        ok, _ = self._call("guarded put", lambda: c.transaction(
            compare=[c.transactions.create(owner_key) == epoch], success=ops, failure=[]))
        return bool(ok)

    def put_if_unchanged(self, key: str, value: str, seen: KeyRecord | None) -> bool:
        """Put iff the key is still as `seen` (same mod_revision; absent if None): compare-and-set."""
        return self.put_all_if_unchanged([(key, value, seen)])

    def put_all_if_unchanged(self, items: Sequence[tuple[str, str, KeyRecord | None]]) -> bool:
        """put_if_unchanged of several keys in one transaction: all or none."""
        c = self._client
        compare = [c.transactions.mod(key) == seen.mod_revision if seen is not None
                   else c.transactions.create(key) == 0 for key, _value, seen in items]
        success = [c.transactions.put(key, value) for key, value, _seen in items]
        ok, _ = self._call("compare-and-set", lambda: c.transaction(compare=compare, success=success, failure=[]))
        return bool(ok)


class CallingLeaseStream:
    """The LeaseStream interface made of one keepalive() call per send(), answered before send()
    returns: for stores that have no stream (the in-memory one, test doubles)."""

    def __init__(self, keepalive: Callable[[int], int], on_answer: Callable[[int, int, int], None],
                 on_ended: Callable[[int], None]) -> None:
        self._keepalive = keepalive
        self._on_answer = on_answer
        self._on_ended = on_ended
        self.generation = 1

    def send(self, lease_id: int, sending: Callable[[int], None]) -> None:
        self.send_many([lease_id], sending)

    def send_many(self, lease_ids: Sequence[int], sending: Callable[[int], None]) -> None:
        """A lease whose keepalive fails fails alone: the others are answered, then the generation ends
        (as a real stream's would), so the failed requests count as lost and are retried soon."""
        generation = self.generation
        sending(generation)
        failed = False
        for lease_id in lease_ids:
            try:
                ttl = self._keepalive(lease_id)
            except StoreError as exc:
                log.debug("keepalive of lease %x failed: %s", lease_id, exc)
                failed = True
                continue
            except Exception as exc:
                loops.record("keepalive", exc, f"lease {lease_id:x}", log)
                failed = True
                continue
            self._on_answer(lease_id, ttl, generation)
        if failed:
            self.reset()

    def reset(self) -> None:
        self.generation += 1
        self._on_ended(self.generation - 1)

    def close(self) -> None:
        pass
