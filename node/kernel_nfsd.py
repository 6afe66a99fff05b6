"""Kernel nfsd backend: exports a VFS through the host's in-kernel NFS server (nfs-utils).

Design
------
The kernel has one NFS server per host (per network namespace), not one per VFS. So
"starting the server of a VFS" here means adding that VFS's exports to the host's
export table, and "stopping" it means removing them again:

- start:  ``exportfs -i -o <options> <client>:<dir>`` for every client of every export
          (``-i``: never read /etc/exports; the exports exist only in the kernel and
          /var/lib/nfs/etab), then NFSv3 lock recovery: ``sm-notify -f -v <VIP> -P <dir>``
          with an NSM state directory kept on the VFS's own disk
          (``<mountpoint>/.nfs-ha/statd``), run only when that directory holds clients to
          notify.
- stop:   ``exportfs -u <client>:<dir>`` for everything start exported ("not exported"
          is not an error, so stop is idempotent), ``exportfs -f`` to flush the kernel's
          export caches, then the mountpoint is written to /proc/fs/nfsd/unlock_filesystem
          so nfsd drops its locks (and, on Linux >= 6.9, NFSv4 state) on the filesystem
          and the unmount that follows is not refused as busy.

Every export gets ``fsid=<uuid>``, a UUID derived from the VFS name and the export path,
so file handles are the same on every node and survive a takeover.

What is written down: ``<workdir>/exports`` (exports(5) syntax, for operators, and the
record that lets ``remove_leftovers`` undo the exports after an agent restart).

Limits (see docs/kernel-nfsd.md)
--------------------------------
Per VFS: the exports, their fsids, the NSM state directory and its state number.
Host-wide, whatever this backend does: the rpc.statd daemon (nfs-utils refuses to run a
second one), lockd's and nfsd's grace periods (a takeover starts none; starting one means
restarting the host's NFS server, which puts every export of the host into grace), the
NFSv4 client records (/var/lib/nfs/nfsdcld or v4recovery), lease and grace times, and
the addresses: the kernel serves every export on every address of the host, not only on
the VFS's VIP. NFSv4 pseudo paths do not exist in the kernel server: clients mount
``<VIP>:<export dir>`` (the real path). This is why Ganesha is the default backend.

Every command is an argv list run through an injectable runner, never a shell; every
value in an argv or in the exports file comes from a validated ExportSpec/NfsInstance
and is checked again here before use.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from controller.keyspace import InvalidName, check_name
from controller.spec_nfs import METADATA_DIR, ExportSpec, NfsSpecError, short
from controller.spec_nfs import check_client as check_spec_client
from controller.spec_nfs import check_export as check_spec_export
from node.nfs_server import NfsInstance, NfsServerError

log = logging.getLogger(__name__)

Runner = Callable[[list[str], float], None]

EXPORTFS = "exportfs"
SM_NOTIFY = "sm-notify"
SYSCTL = "sysctl"
HOST_STATD_DIR = Path("/var/lib/nfs/statd")
NFSD_DIR = Path("/proc/fs/nfsd")
EXPORTS_FILE = "exports"
STATD_SUBDIR = Path(".nfs-ha") / "statd"
LEFTOVER_TIMEOUT = 30.0
MIN_COMMAND_TIMEOUT = 2.0  # stop must still try every unexport when its budget is spent

# Never change: fsids derived from it are in the file handles every client holds.
FSID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "nfs-ha:kernel-nfsd:fsid")

ACCESS_OPTION = {"rw": "rw", "ro": "ro"}  # "none": not exported at all
SQUASH_OPTION = {"root": "root_squash", "all": "all_squash", "none": "no_root_squash"}

# exportfs prints this (and exits 1) for `-u` of something that is not exported.
NOT_EXPORTED = "Could not find"

# What may appear in an exported path, an option or a statd record name: nothing that
# exports(5) or exportfs would read as syntax (blanks, parentheses, quotes, '#', ',').
SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._+/-]*$")
OPTION_RE = re.compile(r"^[a-z_]+(=[0-9a-f-]+)?$")
RECORD_NAME_RE = re.compile(r"^[A-Za-z0-9._:@-]+$")
MOUNTPOINT_PREFIX = "# mountpoint="


@dataclass(frozen=True)
class KernelExport:
    """One exportfs call: a directory exported to one client network."""

    client: str
    directory: str
    options: str = ""

    @property
    def target(self) -> str:
        return exportfs_target(self.client, self.directory)


# --- pure helpers -------------------------------------------------------------------------


def run_command(argv: list[str], timeout: float) -> None:
    """The default runner: run argv (no shell), raise NfsServerError with its stderr."""
    command = shlex.join(argv)
    try:
        subprocess.run(argv, check=True, timeout=timeout, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or exc.stdout or "").strip()
        raise NfsServerError(f"{command} failed with exit {exc.returncode}: {detail}") from exc
    except subprocess.TimeoutExpired as exc:
        raise NfsServerError(f"{command} timed out after {timeout:.0f}s") from exc
    except OSError as exc:  # not installed, not executable
        raise NfsServerError(f"{command} could not run: {exc}") from exc


def check_client(client: str) -> str:
    """A client as exportfs gets it: a network exactly as the spec validator normalises it
    (hex digits, '.', ':', '/' only: no '*', blanks, '(', hostnames or scope ids)."""
    try:
        normal = check_spec_client(client)
    except NfsSpecError as exc:
        raise NfsServerError(f"refusing client {short(client)}: not a plain CIDR ({exc})") from None
    if normal != client:
        raise NfsServerError(f"refusing client {short(client)}: not in normal form ({normal})")
    return client


def check_path(path: str, what: str) -> str:
    if not SAFE_PATH_RE.match(path) or "/../" in path + "/" or "//" in path:
        raise NfsServerError(f"refusing {what} {path!r}: only absolute paths of A-Z a-z 0-9 . _ + - /")
    return path


def check_vip(vip: str) -> str:
    try:
        if isinstance(vip, str) and "%" not in vip and str(ipaddress.ip_address(vip)) == vip:
            return vip
    except ValueError:
        pass
    raise NfsServerError(f"refusing VIP {short(vip)}: not a plain IP address")


def check_export(export: ExportSpec) -> ExportSpec:
    """The export exactly as the spec validator would have produced it (defence in depth)."""
    for client in getattr(export, "clients", None) or ():
        check_client(client)
    try:
        return check_spec_export(export)
    except NfsSpecError as exc:
        raise NfsServerError(f"refusing export: {exc}") from None


def exportfs_target(client: str, directory: str) -> str:
    """`client:dir` as exportfs parses it; IPv6 networks go in brackets: `[fd00::]/64:/dir`."""
    check_client(client)
    check_path(directory, "export directory")
    net = ipaddress.ip_network(client)
    if net.version == 6:
        return f"[{net.network_address}]/{net.prefixlen}:{directory}"
    return f"{client}:{directory}"


def fsid_for(vfs: str, export: ExportSpec) -> str:
    """A stable fsid for an export: same VFS and path, same UUID, on every node, forever.

    Derived from the path rather than the pseudo path because the fsid names the
    exported directory: two exports of one directory must not disagree on it.
    """
    return str(uuid.uuid5(FSID_NAMESPACE, f"{vfs}:{export.path}"))


def export_options(vfs: str, export: ExportSpec) -> str:
    """The exportfs -o value of an export (access must not be "none")."""
    options = [
        ACCESS_OPTION[export.access],
        "sync",  # acknowledged writes are on the shared disk before a takeover
        "no_subtree_check",  # handles stay valid across renames and across nodes
        SQUASH_OPTION[export.squash],
        f"fsid={fsid_for(vfs, export)}",  # not the device number, which differs per node
    ]
    for option in options:
        if not OPTION_RE.match(option):
            raise NfsServerError(f"refusing export option {option!r}")
    return ",".join(options)


def _check_inside(path: Path, root: Path) -> str:
    # exportfs resolves symlinks itself: one on the shared disk must not export a host path.
    path.mkdir(parents=True, exist_ok=True)
    real, top = os.path.realpath(path), os.path.realpath(root)
    if real != top and not real.startswith(top + os.sep):
        raise NfsServerError(f"export path {path} resolves to {real}, outside the VFS filesystem")
    return real


def plan_exports(inst: NfsInstance) -> list[KernelExport]:
    """Every (client, directory, options) to export for this VFS, validated, in spec order."""
    check_path(str(inst.mountpoint), "mountpoint")
    plan: list[KernelExport] = []
    seen: set[tuple[str, str]] = set()
    for export in inst.exports:
        check_export(export)
        if export.access == "none":
            continue  # nobody may use it: the kernel must not even know it
        directory = check_path(_check_inside(inst.export_dir(export), inst.mountpoint), "export directory")
        if METADATA_DIR in Path(os.path.relpath(directory, os.path.realpath(inst.mountpoint))).parts:
            # A symlink on the disk (which an NFS client may have made) must not export nfs-ha's own files.
            raise NfsServerError(f"export path {export.path} resolves to {directory}, inside {METADATA_DIR}")
        options = export_options(inst.vfs, export)
        for client in export.clients:
            key = (check_client(client), directory)
            if key in seen:
                raise NfsServerError(f"{directory} is exported twice to {client} (exports {export.pseudo} "
                                     "and another); the kernel keeps one set of options per client and path")
            seen.add(key)
            plan.append(KernelExport(client, directory, options))
    return plan


def render_exports_file(inst: NfsInstance, plan: Iterable[KernelExport]) -> str:
    """exports(5) text of the plan, one line per directory; a record, never read by exportfs."""
    try:
        check_name(inst.vfs, "VFS name")
    except InvalidName as exc:
        raise NfsServerError(f"refusing to write an exports file: {exc}") from None
    check_vip(inst.vip)
    check_path(str(inst.mountpoint), "mountpoint")
    if not isinstance(inst.epoch, int) or isinstance(inst.epoch, bool):
        raise NfsServerError(f"refusing epoch {short(inst.epoch)}: not an integer")
    plan = list(plan)
    for item in plan:
        check_client(item.client)
        check_path(item.directory, "export directory")
        if not all(OPTION_RE.match(o) for o in item.options.split(",")):
            raise NfsServerError(f"refusing export options {short(item.options)}")
    lines = [
        f"# nfs-ha: kernel nfsd exports of VFS {inst.vfs} (VIP {inst.vip}, epoch {inst.epoch}).",
        "# Exported with `exportfs -i`, not from /etc/exports; `exportfs -r` would drop them. Do not edit.",
        f"{MOUNTPOINT_PREFIX}{inst.mountpoint}",
    ]
    by_dir: dict[str, list[KernelExport]] = {}
    for item in plan:
        by_dir.setdefault(item.directory, []).append(item)
    for directory, items in by_dir.items():
        lines.append(" ".join([directory, *(f"{i.client}({i.options})" for i in items)]))
    return "\n".join(lines) + "\n"


def parse_exports_file(text: str) -> tuple[Path | None, list[KernelExport]]:
    """The mountpoint and the (client, directory) pairs of an exports file written above.

    Lines that do not parse as ours are skipped with a warning, never passed on.
    """
    mountpoint: Path | None = None
    exports: list[KernelExport] = []
    for line in text.splitlines():
        if line.startswith(MOUNTPOINT_PREFIX):
            mountpoint = Path(line[len(MOUNTPOINT_PREFIX):])
            continue
        if not line.strip() or line.startswith("#"):
            continue
        directory, *entries = line.split()
        for entry in entries:
            client, paren, rest = entry.partition("(")
            try:
                if not paren or not rest.endswith(")"):
                    raise NfsServerError(f"{entry!r} is not client(options)")
                exports.append(KernelExport(check_client(client), check_path(directory, "export directory"),
                                            rest[:-1]))
            except NfsServerError as exc:
                log.warning("ignoring exports file entry %r: %s", entry, exc)
    return mountpoint, exports


# --- the backend --------------------------------------------------------------------------


@dataclass
class _Served:
    mountpoint: Path
    workdir: Path
    exports: list[KernelExport]


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        return max(MIN_COMMAND_TIMEOUT, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end


class KernelNfsd:
    """NfsServer on the host's kernel nfsd; one object serves every VFS of the node."""

    name = "kernel"

    def __init__(
        self,
        workroot: Path,
        run: Runner = run_command,
        host_statd_dir: Path = HOST_STATD_DIR,
        nfsd_dir: Path = NFSD_DIR,
        is_mountpoint: Callable[[Path], bool] = os.path.ismount,
    ) -> None:
        self.workroot = workroot
        self.run = run
        self.host_statd_dir = host_statd_dir
        self.nfsd_dir = nfsd_dir
        self.is_mountpoint = is_mountpoint
        self._served: dict[str, _Served] = {}
        self._callbacks: list[Callable[[str], None]] = []
        self._lock = threading.Lock()

    def workdir(self, vfs: str) -> Path:
        return self.workroot / vfs

    @staticmethod
    def statd_dir(mountpoint: Path) -> Path:
        """This VFS's NSM state directory (sm/, sm.bak/, state), on the VFS's own disk."""
        return mountpoint / STATD_SUBDIR

    # --- NfsServer -----------------------------------------------------------------------

    def start(self, inst: NfsInstance, timeout: float) -> None:
        if self.alive(inst.vfs):
            return
        check_vip(inst.vip)
        if not self.is_mountpoint(inst.mountpoint):
            # Exporting the empty directory under it would hand out our fsids for the wrong fs.
            raise NfsServerError(f"{inst.mountpoint} is not a mount point; refusing to export it")
        deadline = _Deadline(timeout)
        try:
            plan = plan_exports(inst)
            statd = self._prepare_statd_dir(inst.mountpoint)
            # Record first: an agent crash in the middle must still leave a trace to undo.
            _write_atomic(inst.workdir / EXPORTS_FILE, render_exports_file(inst, plan))
        except OSError as exc:
            raise NfsServerError(f"preparing the exports of {inst.vfs} failed: {exc}") from exc
        done: list[KernelExport] = []
        try:
            for item in plan:
                if deadline.expired():
                    raise NfsServerError(f"exporting {inst.vfs} took longer than {timeout:.0f}s")
                self.run([EXPORTFS, "-i", "-o", item.options, item.target], deadline.left())
                done.append(item)
        except Exception:
            errors = self._unexport(done, _Deadline(timeout))
            if not errors:
                (inst.workdir / EXPORTS_FILE).unlink(missing_ok=True)
            raise
        with self._lock:
            self._served[inst.vfs] = _Served(inst.mountpoint, inst.workdir, plan)
        try:
            self._notify_lock_holders(inst.vip, statd, deadline)
        except NfsServerError as exc:
            # The exports serve; only NFSv3 lock reclaim is lost. Failing the takeover for it
            # would leave every client without a server instead.
            log.warning("%s: NFSv3 lock holders not notified: %s", inst.vfs, exc)

    def stop(self, vfs: str, timeout: float) -> None:
        with self._lock:
            served = self._served.get(vfs)
        if served is None:
            # Not started by this object (or a start that failed half-way): use the record.
            self._undo_record(vfs, timeout)
            return
        if self.is_mountpoint(served.mountpoint):
            self._mirror_quietly(vfs, served.mountpoint)
        errors = self._unexport(served.exports, _Deadline(timeout))
        if errors:
            # Keep the record (memory and file): a retry or remove_leftovers finishes the job.
            raise NfsServerError(f"unexporting {vfs} failed: {'; '.join(errors)}")
        self._unlock_filesystem(served.mountpoint)
        (served.workdir / EXPORTS_FILE).unlink(missing_ok=True)
        with self._lock:
            self._served.pop(vfs, None)

    def alive(self, vfs: str) -> bool:
        # Tracked state: the kernel server has no per-VFS process that could die.
        with self._lock:
            return vfs in self._served

    def pid(self, vfs: str) -> int | None:
        return None

    def on_exit(self, callback: Callable[[str], None]) -> None:
        # Kept for the interface; never called, as there is no per-VFS process to exit.
        self._callbacks.append(callback)

    def remove_leftovers(self, vfs: str) -> bool:
        """Unexport what an earlier run of the agent exported for this VFS (from its exports file)."""
        return self._undo_record(vfs, LEFTOVER_TIMEOUT)

    # --- unexporting ---------------------------------------------------------------------

    def _undo_record(self, vfs: str, timeout: float) -> bool:
        path = self.workdir(vfs) / EXPORTS_FILE
        try:
            text = path.read_text()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise NfsServerError(f"cannot read {path}: {exc}") from exc
        mountpoint, exports = parse_exports_file(text)
        errors = self._unexport(exports, _Deadline(timeout))
        if errors:
            raise NfsServerError(f"unexporting leftovers of {vfs} failed: {'; '.join(errors)}")
        if mountpoint is not None:
            self._unlock_filesystem(mountpoint)
        path.unlink(missing_ok=True)
        with self._lock:
            self._served.pop(vfs, None)
        return bool(exports)

    # --- NFSv3 lock recovery (NSM) -------------------------------------------------------

    def mirror_statd_records(self, vfs: str) -> int:
        """Copy the host's NSM monitor records into this VFS's statd dir; return how many.

        The host's one rpc.statd records every NFSv3 lock holder of the host in
        <host statd dir>/sm, without saying which VIP a client used. A copy on the VFS disk
        lets the next owner notify them (over-notifying is harmless: a client that holds no
        lock on this VIP ignores the notification). Call it while the VFS is served; stop()
        does, and the agent may call it periodically so a crash loses little.
        """
        with self._lock:
            served = self._served.get(vfs)
        if served is None or not self.is_mountpoint(served.mountpoint):
            return 0
        source, target = self.host_statd_dir / "sm", self.statd_dir(served.mountpoint) / "sm"
        target.mkdir(parents=True, exist_ok=True)
        wanted = {p.name: p for p in _records(source)}
        for stale in _records(target):
            if stale.name not in wanted:
                stale.unlink(missing_ok=True)
        for name, record in wanted.items():
            tmp = target / f".{name}.tmp"
            shutil.copyfile(record, tmp)
            os.replace(tmp, target / name)
        return len(wanted)

    def _mirror_quietly(self, vfs: str, mountpoint: Path) -> None:
        try:
            self.mirror_statd_records(vfs)
        except OSError as exc:  # never a reason not to unexport
            log.warning("%s: copying NSM records to %s failed: %s", vfs, self.statd_dir(mountpoint), exc)

    def _prepare_statd_dir(self, mountpoint: Path) -> Path:
        statd = self.statd_dir(mountpoint)
        for sub in ("sm", "sm.bak"):
            (statd / sub).mkdir(parents=True, exist_ok=True)
        return statd

    def _notify_lock_holders(self, vip: str, statd: Path, deadline: _Deadline) -> None:
        # sm-notify with no one to notify writes /proc/fs/lockd/nlm_end_grace, ending lockd's
        # (host-wide) grace period for every other VFS here: only run it with work to do.
        if not any(_records(statd / "sm")) and not any(_records(statd / "sm.bak")):
            log.info("no NFSv3 lock holders recorded in %s; not running sm-notify", statd)
            return
        version = ipaddress.ip_address(vip).version
        # sm-notify binds its socket to the VIP, which is raised only after start() returns.
        self.run([SYSCTL, "-q", "-w", f"net.ipv{version}.ip_nonlocal_bind=1"], deadline.left())
        # -f: notify even if this state dir was used before; -v: send from and as the VIP;
        # -P: this VFS's records and state number, not the host's.
        self.run([SM_NOTIFY, "-f", "-v", vip, "-P", str(statd)], deadline.left())

    def _unexport(self, exports: Iterable[KernelExport], deadline: _Deadline) -> list[str]:
        """Unexport each; go on past failures and return them ("not exported" is success)."""
        errors: list[str] = []
        for item in exports:
            try:
                self.run([EXPORTFS, "-u", item.target], deadline.left())
            except NfsServerError as exc:
                if NOT_EXPORTED not in str(exc):
                    errors.append(str(exc))
        try:
            # Drop the kernel's cached export and file handle entries, which pin the filesystem.
            self.run([EXPORTFS, "-f"], deadline.left())
        except NfsServerError as exc:
            errors.append(str(exc))
        return errors

    def _unlock_filesystem(self, mountpoint: Path) -> None:
        # Release nfsd's locks (and NFSv4 state, Linux >= 6.9) on the filesystem so that
        # umount is not refused. Only on a mount point: on the empty directory below it,
        # this would unlock the parent filesystem instead.
        if not self.is_mountpoint(mountpoint):
            return
        target = self.nfsd_dir / "unlock_filesystem"
        try:
            with open(target, "w") as fh:
                fh.write(f"{check_path(str(mountpoint), 'mountpoint')}\n")
        except (OSError, NfsServerError) as exc:
            log.warning("releasing nfsd state on %s via %s failed: %s", mountpoint, target, exc)


def _records(directory: Path) -> list[Path]:
    """NSM monitor records in an sm/ or sm.bak/ directory: plain files with plain names."""
    try:
        entries = list(directory.iterdir())
    except FileNotFoundError:
        return []
    return [p for p in entries
            if RECORD_NAME_RE.match(p.name) and not p.name.startswith(".") and p.is_file() and not p.is_symlink()]


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
