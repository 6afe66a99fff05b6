"""The VFS filesystem on this node: mount, unmount, and the storage epoch file.

One mount point per VFS, `<state-dir>/<node>/mnt/<vfs>`. Commands are argv lists with
validated values (controller/spec_nfs.py) and a timeout each; nothing runs in a shell.

Unmounted means released (docs/safety.md, "3a. The disk bound"). `unmount(vfs, device)` first
unmounts the mount point in the agent's mount namespace, then confirms the kernel no longer uses
the block device at all: `open(device, O_EXCL)` fails with EBUSY while any superblock of it is
alive, a copy of the mount in another mount namespace or a lazily detached one that something
still uses included (checked on a loop device with xfs, kernel 6.18). Only then may a release tell
etcd the disk is free. A device path that no longer exists (ENOENT, or ENXIO/ENODEV: no such
device) counts as released: the kernel has no block device by that name through which this node
could still write (a disk that vanished); it is logged. A path that is not a block device cannot be
checked and is an error. The check takes the device exclusively for an instant: a mount of it on
this kernel at that very moment fails (busy) and is retried by its takeover. Every other exclusive
user of the device (a device-mapper or md layer on it) also counts as "in use".

The namespace lab runs every node in one kernel, so there O_EXCL also sees the disk mounted by the
node that took over (after this node's guard released it, e.g. when a frozen agent wakes up). With
NFS_HA_LAB_SHARED_KERNEL=1 in the agent's environment (the lab only; never on a real node), a busy
device still counts as released when a process of another node (another mount AND network
namespace, as node/guard.py tells nodes apart) has it mounted and no process of this node, the
agent included, has it mounted or holds a file, cwd, root or mapping on it. Kernel-internal users
of a detached superblock are invisible to that fallback.

The epoch file `.nfs-ha/epoch` is the fencing token on the disk. An export of the filesystem's
root also exposes `.nfs-ha/`, so the agent keeps the file and the directory immutable
(FS_IMMUTABLE_FL, as `chattr +i`) except for the moment it rewrites the file: no NFS client,
not even root without squash, can then change, delete or rename them (NFS has no way to clear
the flag). The directories the NFS servers write into (`nfs-recovery`, `statd`) are created
before the directory is locked, and stay writable. Exports of paths inside `.nfs-ha` are
refused by the spec validator.

Nothing under the mount point is trusted to be what its name says: on a disk served by an older
version (no immutable flags) or never served yet, a client may have made `.nfs-ha` a symlink or a
file, `epoch` a directory, a symlink or a device node. So, as root, the agent:
- never follows a symlink below the mount point: it works from a directory fd of the mount root
  (O_DIRECTORY|O_NOFOLLOW) with dir_fd= and no-follow calls only;
- never opens anything but a regular file or a directory there: an entry is first opened O_PATH
  (which opens nothing) and checked, then reopened through /proc/self/fd (no device node or FIFO
  is ever opened, and nothing can be swapped in between);
- moves an entry of the wrong type (`.nfs-ha` not a directory; `epoch`, `nfs-recovery`, `statd`,
  `epoch.tmp` not what they should be) aside into the mount root as `.nfs-ha.invalid-<unix time>`
  (rename never follows a symlink), logs a warning, and creates its own;
- refuses a `.nfs-ha` (or subdirectory) on another filesystem than the mount (mounted over it);
- creates the new epoch with O_CREAT|O_EXCL|O_NOFOLLOW, sets the immutable flags through its
  own fds, and, once the directory is immutable (from then on nothing in it can be renamed or
  replaced), checks that `.nfs-ha` and `.nfs-ha/epoch` are still the very inodes it wrote; if a
  client swapped one in the window while they were writable, the write fails and is retried by
  the next takeover.
read_epoch reads an `.nfs-ha` that is not a directory, or an `epoch` that is not a regular file,
as "no epoch" (0) and logs it. This lets no stale node pass that could not pass anyway: such an
entry can exist only on a disk this version never wrote successfully (what it writes is immutable
and checked in place), and on such a disk a client can already delete the epoch file, which reads
as 0 too. Refusing instead would refuse that disk forever (the read comes before the write that
would repair it). An epoch file whose content is not a number is still refused.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

META_DIR = ".nfs-ha"
EPOCH_NAME = "epoch"
EPOCH_TMP = "epoch.tmp"
EPOCH_FILE = f"{META_DIR}/{EPOCH_NAME}"
INVALID_PREFIX = f"{META_DIR}.invalid-"  # where entries of the wrong type are moved aside
METADATA_SUBDIRS = ("nfs-recovery", "statd")  # written by the NFS servers (node/nfs_server.py, kernel_nfsd.py)
EPOCH_MAX_BYTES = 64  # an epoch is a decimal number and a newline; a longer file is not one
EPOCH_RE = re.compile(rb"[0-9]+")
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IMMUTABLE_FL = 0x00000010
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 20.0
UMOUNT_TRIES = 5
# A umount that just returned may still be dropping the superblock: look again a few times (~1.5 s).
RELEASE_CHECK_PAUSES = (0.05, 0.1, 0.2, 0.4, 0.8)
DEVICE_GONE = (errno.ENOENT, errno.ENXIO, errno.ENODEV)
SHARED_KERNEL_ENV = "NFS_HA_LAB_SHARED_KERNEL"  # the lab only, see the module docstring
RENAME_TRIES = 3  # a client racing us for a name: give up (and fail the step) after this many


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


class MountRefused(StorageError):
    """Refused before mounting anything, so there is nothing to undo (controller.takeover.MountStep)."""

    mounted_nothing = True


class DeviceBusy(MountRefused):
    """The device was busy before the mount."""


def device_in_use(device: str) -> bool:
    """Whether the kernel still holds block device `device` exclusively: a superblock of it in any
    mount namespace, lazily detached or not (or another exclusive user). False if the device does
    not exist (see the module docstring); StorageError if it cannot be checked."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return True
        if exc.errno in DEVICE_GONE:
            log.warning("%s is not there (%s): no superblock of it can be in use on this node", device,
                        os.strerror(exc.errno))
            return False
        raise StorageError(f"cannot check whether the kernel still uses {device}: {exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
    finally:
        os.close(fd)
    if not stat.S_ISBLK(mode):
        # O_EXCL means nothing for other files: "free" would be a guess.
        raise StorageError(f"{device} is not a block device: cannot check whether the kernel still uses the disk")
    return False


def used_by_other_nodes_only(device: str) -> bool:
    """Lab only (SHARED_KERNEL_ENV): whether a busy `device` is explained by another node's mount
    and nothing of this node uses it (module docstring)."""
    from node import guard  # the guard's notion of "this node"; imported here: only the lab needs it

    try:
        rdev = os.stat(device).st_rdev
    except OSError:
        return False
    devs = frozenset({rdev})
    mine = [(os.getpid(), False), *guard.node_pids()]
    if any(guard.holds(pid, devs, other_ns) for pid, other_ns in mine):
        return False
    if any(dev == rdev for _point, dev in guard.mountinfo_devices(Path("/proc/self/mountinfo"))):
        return False
    pids = {pid for pid, _other in mine}
    for entry in guard.PROC.iterdir():
        if entry.name.isdigit() and int(entry.name) not in pids and any(
                dev == rdev for _point, dev in guard.mountinfo_devices(entry / "mountinfo")):
            return True
    return False


class Storage:
    def __init__(self, state_dir: Path, sleep: Callable[[float], None] = time.sleep) -> None:
        self.root = state_dir / "mnt"
        self.sleep = sleep
        self.shared_kernel = os.environ.get(SHARED_KERNEL_ENV) == "1"
        if self.shared_kernel:
            log.warning("%s=1: the disk release check accepts a device other nodes of this kernel mount "
                        "(the namespace lab only)", SHARED_KERNEL_ENV)

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
        try:
            busy = device_in_use(device)
        except StorageError as exc:  # e.g. not a block device here: this node has no path to the disk
            raise MountRefused(f"not mounting {device}: {exc}") from exc
        if busy:
            # Mounted elsewhere (another node in the lab's shared kernel, a stray mount here) or held by
            # another exclusive user: never join it. Nothing was mounted, so nothing needs undoing.
            raise DeviceBusy(f"{device} is in use by the kernel (mounted elsewhere or held): not mounting it")
        argv = ["mount", "-t", fstype]
        if options:
            argv += ["-o", ",".join(options)]
        argv += ["--", device, str(target)]
        _run(argv, MOUNT_TIMEOUT, f"mounting {device}")
        return target

    def unmount(self, vfs: str, device: str | None = None) -> None:
        """Unmount the VFS's mount point; with `device`, then also confirm the kernel no longer uses
        that block device anywhere (module docstring). Without it (leftover cleanup at start-up,
        where the device is not known) only the mount point is checked."""
        target = self.mountpoint(vfs)
        last = ""
        for attempt in range(UMOUNT_TRIES):
            if mounted_at(target) is None:
                break
            try:
                _run(["umount", "--", str(target)], UMOUNT_TIMEOUT, f"unmounting {target}")
            except StorageError as exc:
                last = str(exc)
                self.sleep(0.2 * (attempt + 1))  # "target is busy" clears once the server has exited
        if mounted_at(target) is not None:
            raise StorageError(last or f"{target} is still mounted")
        if device is None:
            return
        # Checked on every call, also when nothing was mounted here any more: a retried release
        # must not pass because the first try got the mount point off and then failed this check.
        for pause in (*RELEASE_CHECK_PAUSES, None):
            if not device_in_use(device):
                return
            if self.shared_kernel and used_by_other_nodes_only(device):
                log.info("%s is in use, by other nodes of this (lab) kernel only: released here", device)
                return
            if pause is not None:
                self.sleep(pause)
        raise StorageError(f"{target} is unmounted but {device} is still in use by the kernel "
                           "(mounted elsewhere or lazily detached)")

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
        """The epoch on the disk; 0 if there is none (also for entries of the wrong type, see the
        module docstring)."""
        root = self.mountpoint(vfs)
        path = root / EPOCH_FILE
        root_fd = _open_root(root)
        try:
            try:
                meta_fd = _open_meta(root_fd, root)
            except _WrongType as odd:
                log.warning("%s is %s, not nfs-ha's directory: no storage epoch on this disk (read as 0)",
                            root / META_DIR, odd.kind)
                return 0
            if meta_fd is None:
                return 0
            try:
                fd = _open_checked(EPOCH_NAME, meta_fd, stat.S_ISREG, os.O_RDONLY)
            except _WrongType as odd:
                log.warning("%s is %s, not an epoch file written by nfs-ha (read as 0)", path, odd.kind)
                return 0
            finally:
                os.close(meta_fd)
            if fd is None:
                return 0
            try:
                data = os.read(fd, EPOCH_MAX_BYTES + 1)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc
        finally:
            os.close(root_fd)
        text = data.strip()
        if len(data) > EPOCH_MAX_BYTES or not EPOCH_RE.fullmatch(text):
            raise StorageError(f"{path} holds {data[:40].decode(errors='replace')!r}, not an epoch")
        return int(text)

    def write_epoch(self, vfs: str, epoch: int) -> None:
        root = self.mountpoint(vfs)
        root_fd = _open_root(root)
        try:
            _write_epoch(root_fd, root, epoch)
        except OSError as exc:
            raise StorageError(f"cannot write the storage epoch under {root}: {exc}") from exc
        finally:
            os.close(root_fd)


# --- safe access below the mount point (see the module docstring) --------------------------------


class _WrongType(Exception):
    """The entry exists but is not of the expected type."""

    def __init__(self, st: os.stat_result) -> None:
        super().__init__(_kind(st))
        self.kind = _kind(st)


def _kind(st: os.stat_result) -> str:
    mode = st.st_mode
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return f"of type {stat.S_IFMT(mode):o}"


def _open_root(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"cannot open the mount point {root}: {exc}") from exc


def _open_checked(name: str, dir_fd: int | None, is_type: Callable[[int], bool], flags: int) -> int | None:
    """Open `name` in `dir_fd` if it is of the type `is_type` accepts: None if it does not exist,
    _WrongType if it is of another type. A symlink is never followed and nothing but the checked
    inode is ever opened: an O_PATH handle (which opens nothing, a device node included) is
    checked, then that very inode is reopened through /proc/self/fd."""
    try:
        handle = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(handle)
        if not is_type(st.st_mode):
            raise _WrongType(st)
        return os.open(f"/proc/self/fd/{handle}", flags | os.O_CLOEXEC)
    finally:
        os.close(handle)


def _open_meta(root_fd: int, root: Path) -> int | None:
    """A directory fd of `.nfs-ha`, None if there is none, _WrongType if it is not a directory;
    StorageError if it is on another filesystem than the mount."""
    fd = _open_checked(META_DIR, root_fd, stat.S_ISDIR, os.O_RDONLY | os.O_DIRECTORY)
    if fd is not None and os.fstat(fd).st_dev != os.fstat(root_fd).st_dev:
        os.close(fd)
        raise StorageError(f"{root / META_DIR} is on another filesystem than {root} (mounted over?): "
                           "not using it")
    return fd


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _move_aside(name: str, dir_fd: int, root_fd: int, shown: Path, kind: str) -> None:
    """Rename an entry nfs-ha did not make out of the way, into the mount root (rename does not
    follow a symlink, and moves the link itself). A client creating the chosen name at the same
    moment could have it replaced: in an export of "/" clients can do that to each other anyway."""
    base = f"{INVALID_PREFIX}{int(time.time())}"
    for n in range(100):
        new = base if n == 0 else f"{base}-{n}"
        if _lstat(new, root_fd) is None:
            os.rename(name, new, src_dir_fd=dir_fd, dst_dir_fd=root_fd)
            log.warning("%s was %s, not made by nfs-ha (an NFS client?): moved aside to %s", shown, kind, new)
            return
    raise StorageError(f"cannot move {shown} aside: every {base}-N name is taken")


def _ensure_dir(name: str, dir_fd: int, root_fd: int, shown: Path) -> None:
    root_dev = os.fstat(root_fd).st_dev
    for _ in range(RENAME_TRIES):
        st = _lstat(name, dir_fd)
        if st is None:
            with contextlib.suppress(FileExistsError):  # made meanwhile: look at it again
                os.mkdir(name, 0o755, dir_fd=dir_fd)
            continue
        if not stat.S_ISDIR(st.st_mode):
            _move_aside(name, dir_fd, root_fd, shown, _kind(st))
            continue
        if st.st_dev != root_dev:
            raise StorageError(f"{shown} is on another filesystem than the mount (mounted over?): not using it")
        return
    raise StorageError(f"{shown} keeps changing while nfs-ha sets it up")


def _write_epoch(root_fd: int, root: Path, epoch: int) -> None:
    meta_path = root / META_DIR
    meta_fd = None
    for _ in range(RENAME_TRIES):
        try:
            meta_fd = _open_meta(root_fd, root)
        except _WrongType as odd:
            _move_aside(META_DIR, root_fd, root_fd, meta_path, odd.kind)
            continue
        if meta_fd is not None:
            break
        with contextlib.suppress(FileExistsError):  # made meanwhile: look at it again
            os.mkdir(META_DIR, 0o755, dir_fd=root_fd)
    if meta_fd is None:
        raise StorageError(f"{meta_path} keeps changing while nfs-ha sets it up")
    try:
        _set_flag(meta_fd, False, meta_path)
        _rewrite(meta_fd, root_fd, meta_path, epoch)
    except BaseException:
        # Best effort: do not leave the directory open to clients after a failed write.
        with contextlib.suppress(StorageError):
            _set_flag(meta_fd, True, meta_path)
        raise
    finally:
        os.close(meta_fd)


def _rewrite(meta_fd: int, root_fd: int, meta_path: Path, epoch: int) -> None:
    """The write itself, with `.nfs-ha` (meta_fd) writable: see the module docstring."""
    for sub in METADATA_SUBDIRS:
        _ensure_dir(sub, meta_fd, root_fd, meta_path / sub)
    _unlock_epoch(meta_fd, root_fd, meta_path / EPOCH_NAME)
    leftover = _lstat(EPOCH_TMP, meta_fd)
    if leftover is not None:
        if stat.S_ISDIR(leftover.st_mode):
            _move_aside(EPOCH_TMP, meta_fd, root_fd, meta_path / EPOCH_TMP, _kind(leftover))
        else:
            os.unlink(EPOCH_TMP, dir_fd=meta_fd)  # a symlink goes itself, its target is untouched
    fd = os.open(EPOCH_TMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                 dir_fd=meta_fd)
    try:
        os.write(fd, f"{epoch}\n".encode())
        os.fsync(fd)
        os.replace(EPOCH_TMP, EPOCH_NAME, src_dir_fd=meta_fd, dst_dir_fd=meta_fd)
        _set_flag(fd, True, meta_path / EPOCH_NAME)  # through our fd: the inode we wrote
        os.fsync(fd)
        written = os.fstat(fd)
    finally:
        os.close(fd)
    _set_flag(meta_fd, True, meta_path)
    os.fsync(meta_fd)  # the rename and the flags must be on disk before we serve
    os.fsync(root_fd)  # and a new or moved `.nfs-ha`
    # From here nothing in `.nfs-ha` can be renamed or replaced, nor `.nfs-ha` itself: check
    # that a client did not swap either while they were writable.
    in_root, in_meta = _lstat(META_DIR, root_fd), _lstat(EPOCH_NAME, meta_fd)
    if not _same(in_root, os.fstat(meta_fd)) or not _same(in_meta, written):
        raise StorageError(f"{meta_path} was changed while the epoch was written (by an NFS client?); "
                           "not trusting it")


def _same(st: os.stat_result | None, other: os.stat_result) -> bool:
    return st is not None and (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def _unlock_epoch(meta_fd: int, root_fd: int, shown: Path) -> None:
    """Clear the immutable flag of the current epoch file, so it can be replaced; move an entry
    of another type aside."""
    for _ in range(RENAME_TRIES):
        try:
            fd = _open_checked(EPOCH_NAME, meta_fd, stat.S_ISREG, os.O_RDONLY | os.O_NONBLOCK)
        except _WrongType as odd:
            _move_aside(EPOCH_NAME, meta_fd, root_fd, shown, odd.kind)
            continue
        if fd is not None:
            try:
                _set_flag(fd, False, shown)
            finally:
                os.close(fd)
        return
    raise StorageError(f"{shown} keeps changing while nfs-ha sets it up")


def _set_flag(fd: int, on: bool, shown: Path | str) -> None:
    try:
        buf = array.array("i", [0])
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
        flags = (buf[0] | FS_IMMUTABLE_FL) if on else (buf[0] & ~FS_IMMUTABLE_FL)
        if flags != buf[0]:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, array.array("i", [flags]))
    except OSError as exc:
        raise StorageError(f"cannot {'set' if on else 'clear'} the immutable flag of {shown}: {exc}") from exc


def set_immutable(path: Path, on: bool) -> None:
    """Set or clear FS_IMMUTABLE_FL (chattr +i / -i) of a regular file or directory with the ioctl,
    no shell, never through a symlink. xfs and ext4 (the only filesystems a spec may name) support
    it; StorageError on any failure."""
    try:
        fd = _open_checked(str(path), None, lambda m: stat.S_ISREG(m) or stat.S_ISDIR(m), os.O_RDONLY | os.O_NONBLOCK)
    except _WrongType as odd:
        raise StorageError(f"not setting the immutable flag of {path}: it is {odd.kind}") from None
    except OSError as exc:
        raise StorageError(f"cannot open {path}: {exc}") from exc
    if fd is None:
        raise StorageError(f"cannot set the immutable flag of {path}: it does not exist")
    try:
        _set_flag(fd, on, path)
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
