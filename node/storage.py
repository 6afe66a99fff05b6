"""The VFS filesystem on this node: mount, unmount, and the storage epoch file.

One mount point per VFS, `<state-dir>/<node>/mnt/<vfs>`. Commands are argv lists with
validated values (controller/spec_nfs.py) and a timeout each; nothing runs in a shell.

The epoch file `.nfs-ha/epoch` is the fencing token on the disk. An export of the filesystem's
root also exposes `.nfs-ha/`, so the agent keeps the file and the directory immutable
(FS_IMMUTABLE_FL, as `chattr +i`) except for the moment it rewrites the file: no NFS client,
not even root without squash, can then change, delete or rename them (NFS has no way to clear
the flag). The directories the NFS servers write into (`nfs-recovery`, `statd`) are created
before the directory is locked, and stay writable. Exports of paths inside `.nfs-ha` are
refused by the spec validator.
"""

from __future__ import annotations

import array
import fcntl
import os
import subprocess
import time
from pathlib import Path

EPOCH_FILE = ".nfs-ha/epoch"
METADATA_SUBDIRS = ("nfs-recovery", "statd")  # written by the NFS servers (node/nfs_server.py, kernel_nfsd.py)
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 20.0
UMOUNT_TRIES = 5


class StorageError(RuntimeError):
    pass


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    return field.encode().decode("unicode_escape")


def mounted_at(path: Path) -> str | None:
    """The source device mounted at `path` in this mount namespace, or None."""
    target = str(path)
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    source = None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) > 4 and _unescape(fields[4]) == target:
            source = right.split()[1] if len(right.split()) > 1 else ""
    return source  # the last one wins: it is the one on top


class Storage:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "mnt"

    def mountpoint(self, vfs: str) -> Path:
        return self.root / vfs

    def mount(self, vfs: str, device: str, fstype: str, options: tuple[str, ...]) -> Path:
        target = self.mountpoint(vfs)
        target.mkdir(parents=True, exist_ok=True)
        current = mounted_at(target)
        if current is not None:
            if os.path.realpath(current) == os.path.realpath(device):
                return target  # already ours (idempotent)
            raise StorageError(f"{target} already has {current} mounted, not {device}")
        argv = ["mount", "-t", fstype]
        if options:
            argv += ["-o", ",".join(options)]
        argv += ["--", device, str(target)]
        _run(argv, MOUNT_TIMEOUT, f"mounting {device}")
        return target

    def unmount(self, vfs: str) -> None:
        target = self.mountpoint(vfs)
        last = ""
        for attempt in range(UMOUNT_TRIES):
            if mounted_at(target) is None:
                return
            try:
                _run(["umount", "--", str(target)], UMOUNT_TIMEOUT, f"unmounting {target}")
            except StorageError as exc:
                last = str(exc)
                time.sleep(0.2 * (attempt + 1))  # "target is busy" clears once the server has exited
        if mounted_at(target) is not None:
            raise StorageError(last or f"{target} is still mounted")

    def check_mounted(self, vfs: str, device: str) -> None:
        """StorageError unless ``device`` is what is mounted at the VFS's mount point.

        Checked before every NFS server start: after a lazy unmount (`umount -l`, by an operator;
        the fence guard never does one) the mount point is an empty directory on the node's own disk, and a server
        started on it would acknowledge writes that never reach the shared disk."""
        target = self.mountpoint(vfs)
        if mounted_at(target) is None:
            raise StorageError(f"{target} is not mounted: not exporting the empty mount point")
        try:
            wanted, found = os.stat(device).st_rdev, os.stat(target).st_dev
        except OSError as exc:
            raise StorageError(f"cannot check what is mounted at {target}: {exc}") from exc
        if wanted != found:
            raise StorageError(f"{target} is not the filesystem of {device}: not exporting it")

    def mounted(self, vfs: str) -> bool:
        return mounted_at(self.mountpoint(vfs)) is not None

    def leftover_mounts(self) -> list[str]:
        """VFS names with something mounted at their mount point (from an earlier run)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if mounted_at(p) is not None)

    # --- the storage epoch: the fencing token written on the disk itself ---------------------

    def read_epoch(self, vfs: str) -> int:
        path = self.mountpoint(vfs) / EPOCH_FILE
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc
        if not text.isdigit():
            raise StorageError(f"{path} holds {text[:40]!r}, not an epoch")
        return int(text)

    def write_epoch(self, vfs: str, epoch: int) -> None:
        path = self.mountpoint(vfs) / EPOCH_FILE
        meta = path.parent
        meta.mkdir(parents=True, exist_ok=True)
        set_immutable(meta, False)
        for sub in METADATA_SUBDIRS:
            (meta / sub).mkdir(exist_ok=True)
        if path.exists():
            set_immutable(path, False)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as fh:
            fh.write(f"{epoch}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        set_immutable(path, True)
        set_immutable(meta, True)
        dir_fd = os.open(meta, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename and the flags must be on disk before we serve
        finally:
            os.close(dir_fd)


def set_immutable(path: Path, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL (chattr +i / -i) with the ioctl, no shell. xfs and ext4 (the
    only filesystems a spec may name) support it; StorageError on any failure."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        flags = (buf[0] | FS_IMMUTABLE_FL) if on else (buf[0] & ~FS_IMMUTABLE_FL)
        if flags != buf[0]:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags]))
    except OSError as exc:
        raise StorageError(f"cannot {'set' if on else 'clear'} the immutable flag of {path}: {exc}") from exc
    finally:
        os.close(fd)


def _run(argv: list[str], timeout: float, what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise StorageError(f"{what}: no answer after {timeout:.0f}s") from None
    except OSError as exc:
        raise StorageError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        raise StorageError(f"{what} failed: {(proc.stderr or proc.stdout).strip()[-300:]}")
