"""JSON-lines files the lab's helpers append to while others read them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_lines(path: Path) -> list[Any]:
    """Every complete record, oldest first; a missing file is empty and a half-written line is skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # the last line may be being written right now
    return out
