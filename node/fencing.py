"""The fencing hook: an operator's command that makes sure a lost node is really gone
(e.g. powers it off through its BMC) before another node takes over its VFS.

The command is an argv list from the agent's own configuration (never from etcd), with
`{node}` replaced by the lost node's (validated) name in each argument. It never runs
through a shell and has a timeout.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

from controller.keyspace import check_name


@dataclass(frozen=True)
class FenceResult:
    ok: bool
    argv: tuple[str, ...]
    returncode: int | None
    output: str  # the tail of stdout+stderr, for status and the trace
    seconds: float

    def describe(self) -> str:
        what = f"exit {self.returncode}" if self.returncode is not None else "timed out"
        return f"fence command {' '.join(self.argv)} {what} after {self.seconds:.1f}s: {self.output or '(no output)'}"


class FenceCommand:
    def __init__(self, argv: tuple[str, ...], timeout: float = 60.0) -> None:
        if not argv or not argv[0].startswith("/"):
            raise ValueError("fence command must be a non-empty argv list starting with an absolute path")
        self.argv = argv
        self.timeout = timeout

    def __call__(self, node: str) -> FenceResult:
        check_name(node, "node name")  # only a valid name ever reaches the command line
        argv = tuple(arg.replace("{node}", node) for arg in self.argv)
        started = time.monotonic()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or "") if isinstance(exc.stdout, str) else ""
            return FenceResult(False, argv, None, out[-300:].strip(), time.monotonic() - started)
        except OSError as exc:
            return FenceResult(False, argv, None, str(exc), time.monotonic() - started)
        output = (proc.stdout + proc.stderr).strip()[-300:]
        return FenceResult(proc.returncode == 0, argv, proc.returncode, output, time.monotonic() - started)
