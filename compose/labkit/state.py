"""Layout of the lab's state directory, so a later CLI call can find what `up` made."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .topology import DEFAULT_STATE_DIR, STATE_ENV


def resolve_state_dir(state_dir: str | os.PathLike[str] | None) -> Path:
    """Explicit argument, else $NFSHA_LAB_DIR, else /run/nfsha-lab (always absolute)."""
    chosen = state_dir if state_dir is not None else os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR
    return Path(chosen).absolute()


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def mntns_dir(self) -> Path:
        # Bind-mounted onto itself and made private: `unshare --mount=FILE` needs that.
        return self.root / "mntns"

    def mntns_file(self, node: str) -> Path:
        return self.mntns_dir / node

    def etcd_data(self, name: str) -> Path:
        return self.root / "etcd" / name

    def etcd_log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def etcd_pidfile(self, name: str) -> Path:
        return self.root / "pids" / f"{name}.pid"

    def procs_dir(self, name: str) -> Path:
        """Records of processes started with Lab.spawn in host ``name`` (one file per pid)."""
        return self.root / "procs" / name

    @property
    def config_file(self) -> Path:
        return self.root / "lab.json"

    def make(self) -> None:
        for sub in ("mntns", "etcd", "logs", "pids", "procs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        self.config_file.write_text(json.dumps(config, indent=2) + "\n")

    def read_config(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.config_file.read_text()))
        except (OSError, ValueError):
            return {}


def write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{pid}\n")


def read_pidfile(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def record_proc(directory: Path, pid: int, info: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(pid)).write_text(json.dumps(info) + "\n")


def forget_proc(state: StateDir, pid: int) -> None:
    """Drop the spawn record of ``pid`` wherever it is (missing is fine)."""
    procs = state.root / "procs"
    if procs.is_dir():
        for host in procs.iterdir():
            (host / str(pid)).unlink(missing_ok=True)


def recorded_procs(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
