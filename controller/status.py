"""The status document of a VFS (`<prefix>/vfs/<vfs>/status`)."""

from __future__ import annotations

import json
import time
from typing import Any

PHASES = ("unplaced", "acquiring", "serving", "releasing", "fenced", "error")
VOLATILE = ("updated",)


def wall_clock() -> str:
    # Wall clock only for humans; no decision reads it back.
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def make_status(phase: str, node: str | None, epoch: int, error: str = "", **extra: Any) -> dict[str, Any]:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    doc = {"phase": phase, "node": node, "epoch": epoch, "error": error}
    doc.update(extra)
    return doc


def encode(doc: dict[str, Any]) -> str:
    return json.dumps({**doc, "updated": wall_clock()}, sort_keys=True)


def same(current: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
    """Whether writing `wanted` would change anything but the timestamp (avoids write loops)."""
    if current is None:
        return False
    strip = {k: v for k, v in current.items() if k not in VOLATILE}
    return strip == {k: v for k, v in wanted.items() if k not in VOLATILE}
