"""The VIPs this node raised, remembered on local disk so a restarted agent can remove
what a crashed predecessor left behind, even for a VIP no spec mentions any more."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class RaisedVips:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "raised-vips.json"
        self._lock = threading.Lock()

    def load(self) -> set[str]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return set()
        return {str(v) for v in data} if isinstance(data, list) else set()

    def add(self, vip: str) -> None:
        with self._lock:
            self._save(self.load() | {vip})

    def discard(self, vip: str) -> None:
        with self._lock:
            current = self.load()
            if vip in current:
                self._save(current - {vip})

    def _save(self, vips: set[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(vips)))
        os.replace(tmp, self.path)
