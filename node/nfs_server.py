"""The interface every NFS server backend offers the agent (one server per VFS).

A backend serves one VFS's exports from that VFS's mounted filesystem, bound to its VIP,
and keeps that VFS's client recovery state on the VFS's own disk (`recovery_dir`), so
that state moves with the disk and only this VFS is affected by a takeover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controller.spec_nfs import ExportSpec


@dataclass(frozen=True)
class NfsInstance:
    vfs: str
    vip: str  # address only, e.g. "10.77.0.100"
    mountpoint: Path  # where the VFS filesystem is mounted on this node
    workdir: Path  # local, per VFS: config, pid file, log
    exports: tuple[ExportSpec, ...]
    grace_seconds: int
    lease_seconds: int
    epoch: int

    @property
    def recovery_dir(self) -> Path:
        """Client recovery records, on the VFS's own filesystem."""
        return self.mountpoint / ".nfs-ha" / "nfs-recovery"

    def export_dir(self, export: ExportSpec) -> Path:
        return self.mountpoint / export.path.lstrip("/") if export.path != "/" else self.mountpoint


class NfsServerError(RuntimeError):
    pass


class NfsServer(Protocol):
    """One backend; methods take the VFS name so one object can serve many VFS."""

    name: str

    def start(self, inst: NfsInstance, timeout: float) -> None:
        """Start serving (idempotent); raise NfsServerError with a readable reason."""

    def stop(self, vfs: str, timeout: float) -> None:
        """Stop serving this VFS only, and release the filesystem (idempotent)."""

    def alive(self, vfs: str) -> bool:
        """Whether the server of this VFS is running."""

    def pid(self, vfs: str) -> int | None:
        """The server's process id, where there is one process per VFS."""

    def on_exit(self, callback: Callable[[str], None]) -> None:
        """Call `callback(vfs)` when a server dies without being asked to."""

    def remove_leftovers(self, vfs: str) -> bool:
        """Stop a server of this VFS left by an earlier run of the agent. True if one was found."""
