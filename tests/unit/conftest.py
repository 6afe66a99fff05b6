"""A real etcd on loopback for the unit tests that check EtcdStore against it.

Only on 127.0.0.1, on free ports, with its data in a temporary directory; stopped by its PID and
the directory removed whatever happens (and etcd killed with the test process if that dies). Fast
raft timings (50 ms heartbeat, 500 ms election): it is up in about a second, and a lease TTL of
1 s is honoured (FACTS.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from controller.etcdaccess import EtcdAccess
from controller.store import EtcdStore, StoreError

ETCD = shutil.which("etcd")
# setpriv execs etcd with a parent-death signal: if pytest dies without cleaning up (a grpc segfault
# did that here), its etcd goes too instead of living on as an orphan. Same PID: etcd's own.
DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
needs_etcd = pytest.mark.skipif(ETCD is None, reason="needs the etcd binary (make deps)")
START_SECONDS = 20.0
START_ATTEMPTS = 3  # a free port can be taken by someone else before etcd binds it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(url: str, proc: subprocess.Popen[bytes], deadline: float, access: EtcdAccess | None = None) -> bool:
    """Wait until etcd answers a read; False if it exited first (a port clash: try other ports)."""
    store = EtcdStore(access or url, timeout=1.0)
    try:
        while proc.poll() is None:
            try:
                store.load("/")
                return True
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        return False
    finally:
        store.close()


@dataclass(frozen=True)
class TlsServer:
    """What a TLS etcd member needs: its certificate and key, and the CA its clients' certificates
    must be signed by (--client-cert-auth); `root`: a client certificate with CN root, for set-up."""

    cert: Path
    key: Path
    ca: Path
    root: EtcdAccess | None = None

    def args(self) -> list[str]:
        return ["--cert-file", str(self.cert), "--key-file", str(self.key), "--trusted-ca-file", str(self.ca),
                "--client-cert-auth"]


@contextlib.contextmanager
def etcd_server(tls: TlsServer | None = None, extra: tuple[str, ...] = ()) -> Iterator[str]:
    """Run one etcd member; yields its client URL (https:// with `tls`)."""
    assert ETCD is not None
    with tempfile.TemporaryDirectory(prefix="nfs-ha-etcd-") as tmp:
        log = Path(tmp) / "etcd.log"
        for attempt in range(1, START_ATTEMPTS + 1):
            client, peer = _free_port(), _free_port()
            url = f"{'https' if tls else 'http'}://127.0.0.1:{client}"
            peer_url = f"http://127.0.0.1:{peer}"
            data = Path(tmp) / f"data{attempt}"
            with log.open("ab") as out:
                proc = subprocess.Popen(
                    [*DIE_WITH_PARENT, ETCD, "--name", "t", "--data-dir", str(data),
                     "--listen-client-urls", url, "--advertise-client-urls", url,
                     "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                     "--initial-cluster", f"t={peer_url}",
                     "--heartbeat-interval", "50", "--election-timeout", "500",
                     *(tls.args() if tls else ()), *extra],
                    stdout=out, stderr=out)
            try:
                access = replace(tls.root, endpoints=((("127.0.0.1", client),))) if tls and tls.root else None
                if _ready(url, proc, time.monotonic() + START_SECONDS, access):
                    yield url
                    return
            finally:
                proc.kill()  # by PID; etcd starts no children
                proc.wait()
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"etcd did not start in {START_ATTEMPTS} attempts:\n{tail}")


@pytest.fixture
def etcd() -> Iterator[str]:
    """A fresh etcd for one test."""
    if ETCD is None:
        pytest.skip("needs the etcd binary (make deps)")
    with etcd_server() as url:
        yield url


@pytest.fixture(scope="module")
def etcd_module() -> Iterator[str]:
    """One etcd for all tests of a module (each test keeps to its own key prefix). With
    NFS_HA_TEST_ETCD set (comma-separated endpoints), that etcd instead: tests/lab runs the
    coordination contract against the lab's three members that way."""
    given = os.environ.get("NFS_HA_TEST_ETCD")
    if given:
        yield given
        return
    if ETCD is None:
        pytest.skip("needs the etcd binary (make deps)")
    with etcd_server() as url:
        yield url
