"""Per-node lock around replacing a node's mount namespace (crash, reset).

A crash or reset holds it exclusively from the process scan until the fresh mount namespace is
pinned. The dual-mount sampler holds it shared (without waiting) while it is inside a node's
mount namespace, so a crash or reset never finds the sampler in there (its scan would SIGKILL
it) and the sampler never reads a namespace that is being replaced. Locks are flock(2) on
STATE/locks/<node>.lock, so they work across processes (a reset runs as `compose/lab reset`,
started by a node's fence guard).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .state import StateDir


def lock_path(state: StateDir, node: str) -> Path:
    return state.root / "locks" / f"{node}.lock"


@contextlib.contextmanager
def exclusive(state: StateDir, node: str) -> Iterator[None]:
    """Hold the node's lock exclusively (waits for shared holders, which hold it for < 1 ms)."""
    path = lock_path(state, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def try_shared(fd: int) -> bool:
    """Take the lock on an open lock file shared, without waiting; False if a crash/reset holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
