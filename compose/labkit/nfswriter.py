"""A client that keeps writing new files through a VIP and logs which writes were acknowledged.

    python -m labkit.nfswriter --vip 10.77.0.100 --pseudo /home --log W.jsonl --duration 60

Run in the client namespace (LabCluster.start_writer does that). Each attempt creates a new
file ``w-<seq>-<attempt>`` holding b"seq=<n> attempt=<k> random=<hex>\\n" with ``nfs-cp`` (one
name per attempt: nfs-cp cannot overwrite, and a failed attempt may leave an empty file). A
write that fails is retried under the next attempt number; once acknowledged, seq moves on.

"Acknowledged" = nfs-cp exited 0: the server answered OPEN and an UNSTABLE4 WRITE, and nfs-cp
waited for the reply to its COMMIT+CLOSE compound but did not check it (see labkit.nfsclient
for what that means; Ganesha's VFS backend fsyncs on COMMIT).

The JSON-lines log (one line per event, flushed at once, times are CLOCK_MONOTONIC, shared by
all namespaces, so they compare with time.monotonic() in the test):
  {"event": "start", "t": ..., "vip": ..., "pseudo": ...}
  {"name": "w-3-0", "sha256": ..., "bytes": 61, "seq": 3, "attempt": 0, "t0": ..., "t": ...}   acknowledged
  {"failed": "w-4-0", "error": "<stderr tail>", "rc": 10, "seq": 4, "attempt": 0, "t0": ..., "t": ...}
  {"event": "stop", "t": ..., "n_acked": N, "n_failed": M}
It stops by itself after --duration seconds, and on SIGTERM once the write in flight has
finished (at most --attempt-timeout), so the outcome of every attempt is logged.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from .nfsclient import NFS_CP, TIMEOUT_RC, run_tool, sha256, url

ERROR_TAIL = 300


class _Log:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


def _attempt(vip: str, pseudo: str, name: str, data: bytes, tmpdir: Path,
             timeout: float) -> subprocess.CompletedProcess[bytes]:
    src = tmpdir / f".nfswriter-{os.getpid()}-{name}"
    src.write_bytes(data)
    try:
        return run_tool([NFS_CP, str(src), url(vip, pseudo, name)], timeout)
    finally:
        src.unlink(missing_ok=True)


def run(opts: argparse.Namespace, log: _Log, stop: threading.Event) -> tuple[int, int]:
    """The write loop; returns (acknowledged, failed) counts."""
    tmpdir = Path(opts.tmpdir or Path(opts.log).parent)
    end = time.monotonic() + opts.duration
    seq = attempt = acked = failed = 0
    log.write({"event": "start", "t": time.monotonic(), "vip": opts.vip, "pseudo": opts.pseudo})
    while not stop.is_set() and time.monotonic() < end:
        name = f"w-{seq}-{attempt}"
        data = f"seq={seq} attempt={attempt} random={secrets.token_hex(16)}\n".encode()
        t0 = time.monotonic()
        proc = _attempt(opts.vip, opts.pseudo, name, data, tmpdir, opts.attempt_timeout)
        t = time.monotonic()
        base = {"seq": seq, "attempt": attempt, "t0": t0, "t": t}
        if proc.returncode == 0:
            log.write({"name": name, "sha256": sha256(data), "bytes": len(data), **base})
            seq, attempt, acked = seq + 1, 0, acked + 1
        else:
            error = proc.stderr.decode(errors="replace").strip()[-ERROR_TAIL:]
            if proc.returncode == TIMEOUT_RC:
                error = f"timed out after {opts.attempt_timeout}s: {error}"
            log.write({"failed": name, "error": error, "rc": proc.returncode, **base})
            attempt, failed = attempt + 1, failed + 1
        stop.wait(opts.interval)
    log.write({"event": "stop", "t": time.monotonic(), "n_acked": acked, "n_failed": failed})
    return acked, failed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m labkit.nfswriter", description=__doc__.split("\n")[0])
    parser.add_argument("--vip", required=True)
    parser.add_argument("--pseudo", required=True, help="export pseudo path, e.g. /home")
    parser.add_argument("--log", required=True, help="JSON-lines log (appended)")
    parser.add_argument("--duration", type=float, required=True, help="seconds, then stop")
    parser.add_argument("--interval", type=float, default=0.05, help="pause between attempts (s)")
    parser.add_argument("--attempt-timeout", type=float, default=5.0, help="kill a hung nfs-cp after (s)")
    parser.add_argument("--tmpdir", help="where source files are staged (default: the log's dir)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        # Only flag: the nfs-cp in flight finishes and its outcome is logged.
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    with open(opts.log, "a", encoding="utf-8") as out:
        run(opts, _Log(out), stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
