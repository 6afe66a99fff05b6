"""etcd TLS and authentication (controller/etcdaccess.py, controller/store.py, controller/leasestream.py).

The settings' checks need no etcd; the rest runs against a real etcd on loopback started with TLS,
--client-cert-auth and auth enabled, with certificates made at test time: a store and the lease
stream work over it, a token etcd calls invalid is renewed, and a wrong CA, a client certificate of
another CA, an expired certificate and a wrong password each give an error that says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from controller.etcdaccess import EtcdAccess, check_private, parse_endpoints
from controller.ownership import Holding, LeaseKeeper
from controller.store import EtcdStore, StoreError
from tests.unit.conftest import ETCD, TlsServer, etcd_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "compose"))
from labkit.tlscerts import CA

# --- the settings, without etcd ------------------------------------------------------------------


@pytest.mark.parametrize(("endpoints", "message"), [
    ("http://a:2379,https://b:2379", "mix http:// and https://"),
    ("https://root:secret@a:2379", "no credentials in the URL"),
    ("ftp://a:2379", "expected http://HOST:PORT"),
    ("http://a:99999", "port must be"),
    ("http://a:2379/v3", "expected http://HOST:PORT"),
    ("", "no etcd endpoints"),
])
def test_bad_endpoints_are_refused_with_the_reason(endpoints: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        parse_endpoints(endpoints)
    assert "secret" not in str(err.value)  # a password in a URL is never repeated back


def test_https_endpoints_mean_tls() -> None:
    assert parse_endpoints("https://10.0.0.1:2379, https://etcd2") == ([("10.0.0.1", 2379), ("etcd2", 2379)], True)
    assert parse_endpoints("10.0.0.1:2379") == ([("10.0.0.1", 2379)], False)


@given(st.text(max_size=80))
def test_any_endpoint_text_is_parsed_or_refused_with_a_value_error(text: str) -> None:
    try:
        eps, _tls = parse_endpoints(text)
    except ValueError:
        return
    assert eps and all(isinstance(h, str) and h and 0 < p < 65536 for h, p in eps)


@dataclass
class Certs:
    ca: CA
    other: CA
    server: TlsServer
    root: EtcdAccess
    node: tuple[str, str]  # cert, key of CN node-a
    foreign: tuple[str, str]  # CN node-a, signed by the other CA
    expired: tuple[str, str]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("tls")
    ca, other = CA(base / "ca"), CA(base / "other", name="someone else's CA")
    server = ca.issue("server", "etcd", ips=("127.0.0.1",), server=True)
    root = ca.issue("root", "root")
    node, foreign, expired = ca.issue("node-a", "node-a"), other.issue("node-a", "node-a"), \
        ca.issue("expired", "node-a", expired=True)
    root_access = EtcdAccess.from_settings("https://127.0.0.1:1", ca=str(ca.cert), cert=str(root.cert),
                                           key=str(root.key))
    return Certs(ca, other, TlsServer(server.cert, server.key, ca.cert, root_access), root_access,
                 (str(node.cert), str(node.key)), (str(foreign.cert), str(foreign.key)),
                 (str(expired.cert), str(expired.key)))


def test_tls_settings_are_checked_before_any_connection(certs: Certs, tmp_path: Path) -> None:
    ca = str(certs.ca.cert)
    cert, key = certs.node
    with pytest.raises(ValueError, match="etcd_ca set, but the etcd endpoints are http://"):
        EtcdAccess.from_settings("http://a:2379", ca=ca)
    with pytest.raises(ValueError, match="etcd_cert and etcd_key go together"):
        EtcdAccess.from_settings("https://a:2379", ca=ca, cert=cert)
    with pytest.raises(ValueError, match=r"etcd_cert .* expired on \d{4}-\d\d-\d\d"):
        EtcdAccess.from_settings("https://a:2379", ca=ca, cert=certs.expired[0], key=certs.expired[1])
    with pytest.raises(ValueError, match="does not belong to the certificate"):
        EtcdAccess.from_settings("https://a:2379", ca=ca, cert=cert, key=certs.foreign[1])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"etcd_ca .* cannot be loaded"):
        EtcdAccess.from_settings("https://a:2379", ca=str(garbage))
    with pytest.raises(ValueError, match=r"etcd_ca /nonexistent\.pem: cannot be loaded"):
        EtcdAccess.from_settings("https://a:2379", ca="/nonexistent.pem")
    loose = tmp_path / "loose-key.pem"
    loose.write_bytes(Path(key).read_bytes())
    loose.chmod(0o644)
    with pytest.raises(ValueError, match=r"etcd_key .* has mode 0644 and it holds a secret: chmod go-rwx"):
        EtcdAccess.from_settings("https://a:2379", ca=ca, cert=cert, key=str(loose))
    assert EtcdAccess.from_settings("https://a:2379", ca=ca, cert=cert, key=key).tls


def test_passwords_come_from_a_private_file_and_never_show(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o640)
    with pytest.raises(ValueError, match=r"etcd_password_file .* has mode 0640"):
        EtcdAccess.from_settings("https://a:2379", user="node-a", password_file=str(pw))
    pw.chmod(0o600)
    access = EtcdAccess.from_settings("https://a:2379", user="node-a", password_file=str(pw))
    assert access.password == "s3cret" and "s3cret" not in repr(access)
    with pytest.raises(ValueError, match="etcd_user needs a password"):
        EtcdAccess.from_settings("https://a:2379", user="node-a")
    with pytest.raises(ValueError, match="not both"):
        EtcdAccess.from_settings("https://a:2379", user="node-a", password="x", password_file=str(pw))
    with pytest.raises(ValueError, match="etcd_user needs https:// endpoints"):
        EtcdAccess.from_settings("http://a:2379", user="node-a", password="x")
    if os.geteuid() == 0:
        os.chown(pw, 65534, -1)
        with pytest.raises(ValueError, match="belongs to uid 65534"):
            check_private("etcd_password_file", str(pw))


# --- against a real etcd with TLS, client certificates and auth ----------------------------------


@pytest.fixture(scope="module")
def secure_etcd(certs: Certs) -> Iterator[str]:
    """etcd with TLS and --client-cert-auth; users root and node-a (password pw-a, role agent: read-write
    on /nfs-ha/ only) and auth enabled; tokens expire after 2 s without use."""
    if ETCD is None:
        pytest.skip("needs the etcd binary (make deps)")
    with etcd_server(certs.server, extra=("--auth-token-ttl", "2")) as url:
        cert, key = certs.root.cert, certs.root.key

        def ctl(*args: str) -> None:
            subprocess.run(["etcdctl", f"--endpoints={url}", f"--cacert={certs.ca.cert}", f"--cert={cert}",
                            f"--key={key}", *args], check=True, capture_output=True, timeout=20)

        ctl("user", "add", "root", "--new-user-password=root-pw")
        ctl("user", "grant-role", "root", "root")
        ctl("role", "add", "agent")
        ctl("role", "grant-permission", "agent", "--prefix=true", "readwrite", "/nfs-ha/")
        ctl("user", "add", "node-a", "--new-user-password=pw-a")
        ctl("user", "grant-role", "node-a", "agent")
        ctl("auth", "enable")
        yield url


def access(url: str, certs: Certs, ca: str | None = None, cert: tuple[str, str] | None = None,
           **kw: str) -> EtcdAccess:
    cert = cert or certs.node
    return EtcdAccess.from_settings(url, ca=ca or str(certs.ca.cert), cert=cert[0], key=cert[1], **kw)


def test_a_store_works_over_tls_with_a_password_and_renews_an_expired_token(secure_etcd: str, certs: Certs) -> None:
    store = EtcdStore(access(secure_etcd, certs, user="node-a", password="pw-a"))
    try:
        store.put("/nfs-ha/t/a", "1")
        first_token = store._client.metadata
        time.sleep(3.5)  # the token expires after 2 s without use (etcd --auth-token-ttl 2)
        assert store.get("/nfs-ha/t/a").value == b"1"  # logged in again, and the call retried
        assert store._client.metadata not in (None, first_token)  # a new token: the old one was refused
        with pytest.raises(StoreError, match="etcd RBAC: node-a lacks a role") as err:
            store.put("/elsewhere", "1")
        assert err.value.refused
    finally:
        store.close()


@pytest.mark.parametrize(("case", "message"), [
    ("wrong password", "etcd_user 'node-a': wrong user name or password"),
    ("wrong CA", "etcd's certificate is not signed by etcd_ca"),
    ("client certificate of another CA", "etcd refused our client certificate"),
])
def test_refusals_say_what_to_fix(secure_etcd: str, certs: Certs, case: str, message: str) -> None:
    settings = {
        "wrong password": access(secure_etcd, certs, user="node-a", password="nope"),
        "wrong CA": access(secure_etcd, certs, ca=str(certs.other.cert)),
        "client certificate of another CA": access(secure_etcd, certs, ca=str(certs.ca.cert), cert=certs.foreign),
    }[case]
    store = EtcdStore(settings, timeout=2.0)
    try:
        with pytest.raises(StoreError, match=message) as err:
            store.load("/nfs-ha/")
        assert err.value.refused  # the agent exits at start-up on these instead of retrying
    finally:
        store.close()


def test_the_lease_stream_renews_over_tls(secure_etcd: str, certs: Certs) -> None:
    """The h2 keepalive stream speaks TLS (ALPN h2, the client certificate) and sends the token."""
    settings = access(secure_etcd, certs, user="node-a", password="pw-a")
    grants, keeper_store = EtcdStore(settings), EtcdStore(settings)
    keeper = LeaseKeeper(keeper_store)
    try:
        holdings = []
        for i in range(5):
            sent = time.monotonic()
            lease, ttl = grants.grant(2)
            holdings.append(Holding(vfs=f"v{i}", lease_id=lease, ttl=ttl, granted_at=sent, drop=lambda: None))
            grants.put(f"/nfs-ha/t/lease/{i}", "x", lease=lease)
            keeper.add(holdings[-1])
        keeper.start()
        time.sleep(4.5)  # more than two TTLs
        assert [h.vfs for h in holdings if h.fenced] == []
        assert len(grants.load("/nfs-ha/t/lease/")[1]) == 5
        assert keeper._stream is not None and keeper._stream.generation == 1  # one TLS stream throughout
    finally:
        keeper.stop()
        grants.close()
        keeper_store.close()


def test_rotated_certificate_files_are_used_by_new_connections(secure_etcd: str, certs: Certs, tmp_path: Path) -> None:
    """The operator replaces the certificate and key files: after the next failed call the store's client
    is rebuilt from them (the old one is kept open for calls still running on it), and works."""
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    cert.write_bytes(Path(certs.node[0]).read_bytes())
    key.write_bytes(Path(certs.node[1]).read_bytes())
    key.chmod(0o600)
    store = EtcdStore(access(secure_etcd, certs, cert=(str(cert), str(key)), user="node-a", password="pw-a"))
    try:
        store.put("/nfs-ha/t/rot", "1")
        first = store._client
        fresh = certs.ca.issue("node-a-new", "node-a")
        cert.write_bytes(fresh.cert.read_bytes())
        key.write_bytes(fresh.key.read_bytes())
        assert store._client is first  # nothing failed yet: nothing rebuilt
        with pytest.raises(StoreError, match="RBAC"):
            store.put("/elsewhere", "1")  # any failure looks at the files
        assert store._client is not first and store._retired == [first]
        assert store.get("/nfs-ha/t/rot").value == b"1"  # the new client, with the new certificate
    finally:
        store.close()
