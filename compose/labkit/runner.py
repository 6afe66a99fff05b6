"""Run one argv (never through a shell) and capture its text output."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from .errors import CommandError, LabError

DEFAULT_TIMEOUT = 30.0


def run(
    argv: list[str],
    check: bool = True,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, capture stdout/stderr as text; raise CommandError if ``check`` and it fails."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command {argv!r} timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout, proc.stderr)
    return proc
