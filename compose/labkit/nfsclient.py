"""NFSv4 client side of the lab: libnfs-utils (nfs-cp, nfs-cat, nfs-ls) run in the client namespace.

There is no kernel NFS client here, so every access is one short-lived libnfs process (its own
TCP connection, its own NFSv4 client id). Facts about these tools (libnfs 4.0.0, Debian 12):

* ``nfs-cp FILE nfs://VIP/PSEUDO/NAME?version=4`` creates NAME (OPEN with create) and never
  overwrites: an existing NAME fails with NFS4ERR_EXIST. While the server is in grace the OPEN
  fails at once with NFS4ERR_GRACE; retry. A failed copy can leave an empty NAME behind.
* It cannot write more than 3932 bytes over NFSv4: libnfs sizes the RPC buffer without the
  payload, so a bigger WRITE is never sent ("Failed to write to dest file").
* What exit code 0 ("acknowledged") means: the server answered OPEN, SETATTR and one WRITE
  with stable=UNSTABLE4 (the server may keep the data in memory). nfs-cp then sends COMMIT and
  CLOSE in one compound and waits for the reply, but ignores its result, and does not compare
  write verifiers: a COMMIT failure still exits 0. Ganesha's VFS FSAL answers COMMIT with
  fsync() of the file (checked with strace), so on a live server an acknowledged write has
  been fsynced. In this lab no failure loses the kernel page cache (kill_node kills processes,
  the machine stays up), so UNSTABLE-vs-COMMIT makes no difference to what tests can observe;
  it would on a real power loss.
* Exit codes: 0 ok, 10 any failure (the error text is on stderr).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CommandError

NFS_CP = "nfs-cp"
NFS_CAT = "nfs-cat"
NFS_LS = "nfs-ls"
MAX_WRITE_BYTES = 3932  # libnfs 4.0.0 nfs-cp over NFSv4, see above
TIMEOUT_RC = 124  # like timeout(1): the tool was killed after the timeout
_BAD_NAME_CHARS = set("/?#&%\\") | {chr(c) for c in range(33)}


@dataclass(frozen=True)
class ReadResult:
    """Outcome of one nfs-cat: ``data`` is None when it failed (then see ``stderr``)."""

    ok: bool
    data: bytes | None
    stderr: str
    returncode: int
    t: float  # monotonic time when the read finished


def check_name(name: str) -> None:
    if not name or name in (".", "..") or _BAD_NAME_CHARS & set(name):
        raise ValueError(f"bad NFS file name {name!r}: no '/', '?', '#', '&', '%', '\\', spaces or controls")


def url(vip: str, pseudo: str, name: str = "") -> str:
    """nfs://VIP/PSEUDO[/NAME]?version=4 (the export's pseudo path, e.g. "/home")."""
    path = pseudo.strip("/")
    if name:
        check_name(name)
        path = f"{path}/{name}" if path else name
    return f"nfs://{vip}/{path}?version=4"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
    """Run one libnfs tool, bytes captured; a timeout kills it and returns TIMEOUT_RC."""
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        err = (exc.stderr or b"") + f"\ntimed out after {timeout}s".encode()
        return subprocess.CompletedProcess(argv, TIMEOUT_RC, exc.stdout or b"", err)


def _text(data: bytes | None) -> str:
    return (data or b"").decode(errors="replace")


def write(prefix: list[str], vip: str, pseudo: str, name: str, data: bytes, tmpdir: Path,
          timeout: float) -> subprocess.CompletedProcess[str]:
    """Create NAME with ``data`` via nfs-cp (run under ``prefix``, e.g. ip netns exec ...).

    The source is a temp file in ``tmpdir``: `ip netns exec` keeps the root mount namespace's
    files, so the client namespace reads it at the same path."""
    if len(data) > MAX_WRITE_BYTES:
        raise ValueError(f"nfs-cp (libnfs 4.0.0) cannot write more than {MAX_WRITE_BYTES} bytes over NFSv4")
    target = url(vip, pseudo, name)
    tmpdir.mkdir(parents=True, exist_ok=True)
    fd, src = tempfile.mkstemp(prefix=".nfs-write-", dir=tmpdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        proc = run_tool([*prefix, NFS_CP, src, target], timeout)
    finally:
        os.unlink(src)
    return subprocess.CompletedProcess(proc.args, proc.returncode, _text(proc.stdout), _text(proc.stderr))


def read(prefix: list[str], vip: str, pseudo: str, name: str, timeout: float) -> ReadResult:
    proc = run_tool([*prefix, NFS_CAT, url(vip, pseudo, name)], timeout)
    ok = proc.returncode == 0
    return ReadResult(ok, proc.stdout if ok else None, _text(proc.stderr), proc.returncode, time.monotonic())


def ls(prefix: list[str], vip: str, pseudo: str, timeout: float) -> list[str]:
    """Names in the export's top directory (nfs-ls prints `ls -l`-like lines); CommandError
    if nfs-ls fails."""
    argv = [*prefix, NFS_LS, url(vip, pseudo)]
    proc = run_tool(argv, timeout)
    if proc.returncode != 0:
        raise CommandError(argv, proc.returncode, _text(proc.stdout), _text(proc.stderr))
    names = []
    for line in _text(proc.stdout).splitlines():
        fields = line.split(None, 5)  # mode nlink uid gid size name
        if len(fields) == 6:
            names.append(fields[5])
    return sorted(names)


def definitive(result: ReadResult) -> bool:
    """True when a read settles the question: it returned data, or the file does not exist.
    Anything else (NFS4ERR_GRACE or NFS4ERR_DELAY from a server that just took over, a
    timeout, a refused connection while the VIP moves) says nothing about the data."""
    return result.data is not None or "NFS4ERR_NOENT" in result.stderr


def verify(prefix: list[str], vip: str, pseudo: str, records: Iterable[dict[str, Any]], timeout: float,
           workers: int = 8, settle: float = 60.0, retry_every: float = 0.5) -> list[str]:
    """Names of acknowledged writes (records with "name" and "sha256") that read back missing
    or with other content. Reads run a few at a time: each nfs-cat is its own process. A read
    that is not definitive (see above) is tried again until ``settle`` seconds after the start,
    so a takeover during the check (grace period) is waited out, not counted as lost data."""
    acked = [r for r in records if "name" in r and "sha256" in r]
    deadline = time.monotonic() + settle

    def bad(record: dict[str, Any]) -> str | None:
        while True:
            result = read(prefix, vip, pseudo, str(record["name"]), timeout)
            if definitive(result) or time.monotonic() >= deadline:
                break
            time.sleep(retry_every)
        if result.data is None or sha256(result.data) != record["sha256"]:
            return str(record["name"])
        return None

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [name for name in pool.map(bad, acked) if name is not None]
