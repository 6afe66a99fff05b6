"""How nfs-ha reaches etcd and proves who it is: endpoints, TLS files, user and password.

Rules kept here (the agent's and the CLI's settings both end up in an EtcdAccess):
- Endpoints are all http:// or all https://. Credentials in a URL (`user:pw@host`) are refused:
  they would end up in logs and argv (and were silently dropped before).
- TLS files only with https:// endpoints; a client certificate and its key come together; without
  etcd_ca the system's CAs are trusted (as etcdctl does).
- Secrets must not be readable by anyone but their owner (the client key, the password file),
  as ssh requires of its keys; the agent's config file gets the same check (node/config.py).
- Everything is checked before the first connection and each error names the setting: a CA, key
  or certificate that does not load, a key that does not match its certificate, a client
  certificate that is expired or not yet valid (etcd's refusal of it reaches a gRPC client only
  as "Unwrap failed", so it is found here first).
- With a user, etcd's token is fetched on first use and fetched again whenever etcd calls it
  invalid (it expires after --auth-token-ttl of disuse, 300 s by default, and with every etcd
  restart): controller/store.py. With TLS client certificates and no user, etcd takes the
  certificate's CN as the user name (etcd --client-cert-auth).
- Rotation: the lease stream reads the files at each new connection; the main gRPC client is rebuilt
  from them when a call fails after they changed (their inode, mtime or size); a watch at its next
  re-creation. So replace the files before the old certificate expires.
Not guaranteed: the files are not watched; a certificate that expires while connected is noticed
when etcd closes the connection, and one that etcd stops trusting only when a call fails.
"""

from __future__ import annotations

import datetime
import os
import ssl
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from cryptography import x509

SETTINGS = ("etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password", "etcd_password_file")


def parse_endpoints(spec: str | Iterable[str]) -> tuple[list[tuple[str, int]], bool]:
    """(host, port) of each endpoint, and whether they use TLS; ValueError naming the bad one."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    result, schemes = [], set()
    for item in items:
        item = item.strip()
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.username is not None or url.password is not None:
            raise ValueError(f"etcd endpoint {_redacted(item)!r}: no credentials in the URL; use etcd_user and "
                             "etcd_password_file (or a client certificate)")
        try:
            port = url.port or 2379
        except ValueError:
            raise ValueError(f"etcd endpoint {item!r}: the port must be 1..65535") from None
        if url.scheme not in ("http", "https") or not url.hostname or url.path not in ("", "/") \
                or url.query or url.fragment:
            raise ValueError(f"etcd endpoint {item!r}: expected http://HOST:PORT or https://HOST:PORT")
        schemes.add(url.scheme)
        result.append((url.hostname, port))
    if not result:
        raise ValueError("no etcd endpoints given")
    if len(schemes) > 1:
        raise ValueError("etcd endpoints mix http:// and https://: use one for all")
    return result, schemes == {"https"}


def _redacted(item: str) -> str:
    url = urlsplit(item)
    return item.replace(url.netloc, url.netloc.rsplit("@", 1)[-1]) if "@" in url.netloc else item


@dataclass(frozen=True)
class EtcdAccess:
    endpoints: tuple[tuple[str, int], ...]
    tls: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    user: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def from_settings(cls, endpoints: str | Iterable[str], ca: str = "", cert: str = "", key: str = "",
                      user: str = "", password: str = "", password_file: str = "") -> EtcdAccess:
        """Check the settings and their files; ValueError naming the setting otherwise."""
        eps, tls = parse_endpoints(endpoints)
        if not tls and (ca or cert or key):
            given = [n for n, v in (("etcd_ca", ca), ("etcd_cert", cert), ("etcd_key", key)) if v]
            raise ValueError(f"{', '.join(given)} set, but the etcd endpoints are http://: use https://")
        if bool(cert) != bool(key):
            raise ValueError("etcd_cert and etcd_key go together: set both or neither")
        if password and password_file:
            raise ValueError("set etcd_password or etcd_password_file, not both")
        if password_file:
            password = _read_secret("etcd_password_file", password_file).decode(errors="replace").strip()
            if not password:
                raise ValueError(f"etcd_password_file {password_file}: empty")
        if bool(user) != bool(password):
            raise ValueError("etcd_user needs a password (etcd_password_file) and a password needs etcd_user")
        if user and not tls:
            # gRPC sends no credentials over a plain channel, and the password would cross the network in clear.
            raise ValueError("etcd_user needs https:// endpoints (the password and token go over TLS only)")
        if any(c in user for c in "\0\n\r") or any(c in password for c in "\0\n\r"):
            raise ValueError("etcd_user and the password must be one line without NUL")
        access = cls(tuple(eps), tls, ca, cert, key, user, password)
        access.check_files()
        return access

    def check_files(self, now: datetime.datetime | None = None) -> None:
        """Load every TLS file as a connection would; ValueError naming the setting otherwise."""
        if not self.tls:
            return
        self.ssl_context()  # CA, certificate and key load, and the key matches the certificate
        if self.cert:
            cert = x509.load_pem_x509_certificate(_read("etcd_cert", self.cert))
            now = now or datetime.datetime.now(datetime.UTC)
            if now > cert.not_valid_after_utc:
                raise ValueError(f"etcd_cert {self.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
            if now < cert.not_valid_before_utc:
                raise ValueError(f"etcd_cert {self.cert} is not valid before "
                                 f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC (check the clock)")

    def ssl_context(self) -> ssl.SSLContext:
        """For the lease stream (controller/leasestream.py): verifies etcd, offers HTTP/2."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca or None)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"etcd_ca {self.ca}: cannot be loaded as PEM certificates: {exc}") from None
        if self.key:
            _read_secret("etcd_key", self.key)
        if self.cert:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"etcd_cert {self.cert} / etcd_key {self.key}: cannot be loaded, or the key "
                                 f"does not belong to the certificate: {exc}") from None
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def files_stamp(self) -> tuple[tuple[str, int, int, int] | None, ...]:
        """What identifies the TLS files' contents now (a changed stamp: they were rotated)."""
        stamps: list[tuple[str, int, int, int] | None] = []
        for path in (self.ca, self.cert, self.key):
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            stamps.append((path, st.st_ino, st.st_mtime_ns, st.st_size) if st else None)
        return tuple(stamps)

    def grpc_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        # Without etcd_ca, the system's CAs, as the lease stream's ssl context uses (gRPC's own
        # default is a bundle of its own, which may differ).
        ca = self.ca or _system_ca_file()
        return grpc.ssl_channel_credentials(
            _read("etcd_ca", ca) if ca else None,
            _read_secret("etcd_key", self.key) if self.key else None,
            _read("etcd_cert", self.cert) if self.cert else None)

    def refused(self, detail: str) -> bool:
        """Whether a failure means etcd (or its TLS) refused who we are: settings to fix, not an outage."""
        text = detail.lower()
        return any(s in text for s in ("authentication failed", "permission denied", "user name is empty",
                                       "handshake failed", "unwrap failed"))

    def explain(self, detail: str) -> str:
        """A gRPC failure's detail with what it most likely means for these settings."""
        text = detail.lower()
        if self.tls and ("handshake" in text or "certificate" in text or "ssl" in text):
            return (f"{detail} (TLS: etcd's certificate is not signed by etcd_ca {self.ca or '(system CAs)'}, "
                    "or does not name the endpoint's address)")
        if self.tls and "unwrap failed" in text:
            return (f"{detail} (TLS: etcd refused our client certificate etcd_cert {self.cert or '(none)'}: "
                    "not signed by a CA etcd trusts (--trusted-ca-file), or missing)")
        if "authentication failed" in text:
            return f"{detail} (etcd_user {self.user!r}: wrong user name or password)"
        if "permission denied" in text:
            who = self.user or (f"the CN of {self.cert}" if self.cert else "this client")
            return f"{detail} (etcd RBAC: {who} lacks a role for this key; docs/operations.md)"
        if "user name is empty" in text:
            return f"{detail} (etcd has auth enabled: set etcd_user and a password, or a client certificate)"
        return detail


def _system_ca_file() -> str:
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and os.path.isfile(path):
            return path
    return ""


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting} {path}: cannot be read: {exc.strerror or exc}") from None


def _read_secret(setting: str, path: str) -> bytes:
    """A secret file: refused if group or others may read it (as ssh refuses such keys)."""
    check_private(setting, path)
    return _read(setting, path)


def check_private(setting: str, path: str, forbidden: int = 0o077, why: str = "it holds a secret") -> None:
    """ValueError if `path` has a mode bit of `forbidden` (by default: group or others have any access),
    or belongs to someone but root and this user."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{setting} {path}: cannot be read: {exc.strerror or exc}") from None
    if st.st_mode & forbidden:
        raise ValueError(f"{setting} {path} has mode {stat.S_IMODE(st.st_mode):04o} and {why}: "
                         f"chmod {_chmod(forbidden)} {path}")
    if st.st_uid not in (0, os.geteuid()):
        raise ValueError(f"{setting} {path} belongs to uid {st.st_uid}, not to root or this user, and {why}")


def _chmod(bits: int) -> str:
    who = ("g" if bits & 0o070 else "") + ("o" if bits & 0o007 else "")
    what = ("r" if bits & 0o044 else "") + ("w" if bits & 0o022 else "") + ("x" if bits & 0o011 else "")
    return f"{who}-{what}"
