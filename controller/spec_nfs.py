"""Validation of the storage, exports and nfs parts of a VFS spec (pure, like spec.py).

Invariants:
- every value that later reaches a command line or a server configuration is checked here
  against a narrow grammar (an allow-list, never a deny-list), so nothing from etcd can smuggle
  syntax into either; the renderers call the `check_*` functions below again before use;
- export clients are IPv4/IPv6 networks in normal form, made only of hex digits, '.', ':' and
  '/': no hostnames, wildcards, netgroups or scope ids ('%');
- no export path or pseudo path has a '.nfs-ha' part (nfs-ha's own metadata on the disk: the
  storage epoch and the NFS recovery records);
- mount options come from a per-fstype allow-list; options that weaken crash safety
  (`nobarrier`, `barrier=0`, `errors=continue`, ...) or make the filesystem read-only are refused;
- grace_seconds is 0 (no grace) or at least lease_seconds;
- error messages name the offending field and show at most a short excerpt of the value.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FSTYPES = ("xfs", "ext4")
ACCESS = ("rw", "ro", "none")
SQUASH = ("root", "all", "none")
BACKENDS = ("ganesha", "kernel")
DEVICE_RE = re.compile(r"^/dev/[A-Za-z0-9._:+@=/-]+$")
PATH_PART_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
CLIENT_CHARS_RE = re.compile(r"^[0-9A-Fa-f.:/]+$")
METADATA_DIR = ".nfs-ha"  # on the VFS disk: epoch file, NFS recovery records, NSM state
MAX_PATH = 1024
MAX_PART = 255
MAX_DEVICE = 255
MAX_OPTIONS = 1024
MAX_CLIENT = 64
STORAGE_FIELDS = {"device", "fstype", "options"}
EXPORT_FIELDS = {"path", "pseudo", "access", "clients", "squash"}
NFS_FIELDS = {"backend", "grace_seconds", "lease_seconds"}
MIN_GRACE, MAX_GRACE = 0, 600
MIN_LEASE, MAX_LEASE = 1, 600


class NfsSpecError(ValueError):
    pass


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: error messages end up in status keys."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- mount options ------------------------------------------------------------------------

def _digits(low: int, high: int) -> Callable[[str], bool]:
    return lambda v: v.isascii() and v.isdigit() and len(v) <= 10 and low <= int(v) <= high


def _one_of(*choices: str) -> Callable[[str], bool]:
    return lambda v: v in choices


_SIZE_RE = re.compile(r"^[0-9]{1,10}[kmg]?$")


def _size(v: str) -> bool:
    return bool(_SIZE_RE.match(v))


# Flags (no value) and valued options each filesystem may be mounted with. Anything else is refused.
COMMON_FLAGS = frozenset({"rw", "noatime", "relatime", "nodiratime", "lazytime", "nolazytime", "strictatime",
                          "discard", "nodiscard", "noquota", "quota", "usrquota", "grpquota", "prjquota",
                          "grpid", "bsdgroups", "nogrpid", "sysvgroups"})
MOUNT_FLAGS: dict[str, frozenset[str]] = {
    "xfs": COMMON_FLAGS | {"inode32", "inode64", "largeio", "nolargeio", "filestreams", "swalloc", "wsync",
                           "uquota", "gquota", "pquota", "uqnoenforce", "gqnoenforce", "pqnoenforce",
                           "qnoenforce"},
    "ext4": COMMON_FLAGS | {"barrier", "journal_checksum", "nojournal_checksum", "auto_da_alloc",
                            "noauto_da_alloc", "delalloc", "nodelalloc", "dioread_nolock", "dioread_lock",
                            "block_validity", "noblock_validity", "i_version", "acl", "user_xattr",
                            "init_itable", "noinit_itable", "nombcache", "prefetch_block_bitmaps",
                            "no_prefetch_block_bitmaps"},
}
MOUNT_VALUES: dict[str, dict[str, Callable[[str], bool]]] = {
    "xfs": {"logbufs": _digits(2, 8), "logbsize": _one_of("16k", "32k", "64k", "128k", "256k", "16384", "32768",
                                                          "65536", "131072", "262144"),
            "allocsize": _size, "sunit": _digits(0, 2**31 - 1), "swidth": _digits(0, 2**31 - 1)},
    "ext4": {"data": _one_of("ordered", "journal"), "barrier": _one_of("1"), "commit": _digits(1, 300),
             "errors": _one_of("remount-ro", "panic"), "stripe": _digits(0, 2**31 - 1),
             "inode_readahead_blks": _digits(0, 2**30), "max_batch_time": _digits(0, 10**7),
             "min_batch_time": _digits(0, 10**7), "journal_ioprio": _digits(0, 7), "init_itable": _digits(0, 1000),
             "resuid": _digits(0, 2**32 - 2), "resgid": _digits(0, 2**32 - 2), "max_dir_size_kb": _digits(0, 2**31)},
}
# Options refused with a reason, because an operator may well try them.
MOUNT_REFUSED = {
    "ro": "the NFS server needs the filesystem read-write",
    "nobarrier": "it turns write barriers off: writes acknowledged to clients can be lost on a crash",
    "barrier=0": "it turns write barriers off: writes acknowledged to clients can be lost on a crash",
    "errors=continue": "it keeps serving a filesystem that has found errors",
    "data=writeback": "after a crash, files can show stale data from other files",
    "norecovery": "it skips journal replay, so the next owner serves what a crashed owner left half-written",
    "noload": "it skips journal replay, so the next owner serves what a crashed owner left half-written",
    "nouuid": "it allows mounting a copy of a filesystem that is already mounted",
}


def check_mount_option(fstype: str, option: str) -> str:
    """One mount option, if the allow-list of `fstype` has it (NfsSpecError naming it otherwise)."""
    if not isinstance(option, str) or not option:
        raise NfsSpecError(f"storage.options: {short(option)} is not a mount option")
    if option in MOUNT_REFUSED:
        raise NfsSpecError(f"storage.options: {option!r} is refused: {MOUNT_REFUSED[option]}")
    name, eq, value = option.partition("=")
    allowed = option in MOUNT_FLAGS.get(fstype, ()) if not eq else \
        name in MOUNT_VALUES.get(fstype, {}) and MOUNT_VALUES[fstype][name](value)
    if not allowed:
        raise NfsSpecError(f"storage.options: {short(option)} is not an allowed mount option for {fstype} "
                           "(see the allow-list in docs/keyspace.md)")
    return option


# --- specs --------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageSpec:
    device: str
    fstype: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportSpec:
    path: str  # absolute path *inside* the VFS filesystem: "/" or "/sub/dir"
    pseudo: str  # NFSv4 pseudo path, absolute
    access: str  # rw | ro | none
    clients: tuple[str, ...]  # CIDRs, normalised ("10.77.0.0/24", "10.77.0.50/32", "fd00::/64")
    squash: str  # root | all | none


@dataclass(frozen=True)
class NfsSpec:
    backend: str = "ganesha"
    grace_seconds: int = 10
    lease_seconds: int = 10


def _object(value: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NfsSpecError(f"{what} must be a JSON object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise NfsSpecError(f"{what} has unknown fields {short(unknown)}; allowed: {sorted(allowed)}")
    return value


def _word(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise NfsSpecError(f"{what} must be one of {list(choices)}, got {short(value)}")
    return value


def _seconds(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise NfsSpecError(f"{what} must be an integer from {low} to {high}, got {short(value)}")
    return value


def clean_path(value: Any, what: str) -> str:
    """An absolute, normalised path of plain name parts (no '..', no '.nfs-ha', no odd characters)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > MAX_PATH:
        raise NfsSpecError(f"{what} must be an absolute path (at most {MAX_PATH} characters), got {short(value)}")
    parts = [p for p in value.split("/") if p]
    for part in parts:
        if part in (".", "..") or not PATH_PART_RE.match(part) or len(part) > MAX_PART:
            raise NfsSpecError(f"{what} {short(value)}: path parts may only use A-Z a-z 0-9 . _ + - "
                               f"(at most {MAX_PART} each, no '..')")
        if part == METADATA_DIR:
            raise NfsSpecError(f"{what} {short(value)}: '{METADATA_DIR}' is nfs-ha's own metadata directory "
                               "(storage epoch, NFS recovery records) and cannot be exported")
    return posixpath.join("/", *parts)


def check_client(item: Any, what: str = "client") -> str:
    """A client network in normal form ("10.0.0.0/24", "10.0.0.5/32", "fd00::/64").

    Only IPv4/IPv6 networks or addresses: no hostnames, wildcards, netgroups, scope ids ('%')
    or IPv4-mapped IPv6 forms, so the result is a bare token no NFS server reads as syntax.
    """
    if not isinstance(item, str) or not 0 < len(item) <= MAX_CLIENT or not CLIENT_CHARS_RE.match(item):
        raise NfsSpecError(f"{what}: {short(item)} is not an IP network (e.g. 10.0.0.0/24, 10.0.0.5 or fd00::/64; "
                           "no host names, wildcards or scope ids)")
    try:
        net = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise NfsSpecError(f"{what}: {short(item)} is not an IP network (e.g. 10.0.0.0/24 or 10.0.0.5)") from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        raise NfsSpecError(f"{what}: {short(item)} is an IPv4-mapped IPv6 network; write the IPv4 network instead")
    text = net.with_prefixlen
    if not CLIENT_CHARS_RE.match(text):  # normal form only ever has these; refuse rather than render
        raise NfsSpecError(f"{what}: {short(item)} has no plain normal form")
    return text


def parse_storage(value: Any) -> StorageSpec:
    data = _object(value, "storage", STORAGE_FIELDS)
    device = data.get("device")
    if (not isinstance(device, str) or len(device) > MAX_DEVICE or not DEVICE_RE.match(device)
            or any(p in (".", "..") for p in device.split("/"))):
        raise NfsSpecError(f"storage.device must be a device path under /dev/ (no '.' or '..' parts), "
                           f"got {short(device)}")
    fstype = _word(data.get("fstype"), "storage.fstype", FSTYPES)
    raw_options = data.get("options", "")
    if not isinstance(raw_options, str) or len(raw_options) > MAX_OPTIONS:
        raise NfsSpecError(f"storage.options must be a comma-separated string of at most {MAX_OPTIONS} characters")
    options = tuple(check_mount_option(fstype, o) for o in raw_options.split(",") if o)
    names = [o.partition("=")[0] for o in options]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise NfsSpecError(f"storage.options: {twice} given more than once")
    return StorageSpec(device=device, fstype=fstype, options=options)


def _clients(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise NfsSpecError(f"{what} must be a non-empty list of CIDRs")
    result: list[str] = []
    for item in value:
        net = check_client(item, what)
        if net not in result:  # "10.0.0.5/24" and "10.0.0.0/24" are one client
            result.append(net)
    return tuple(result)


def parse_exports(value: Any) -> tuple[ExportSpec, ...]:
    if not isinstance(value, list) or not value:
        raise NfsSpecError("exports must be a non-empty list")
    exports = []
    for i, item in enumerate(value):
        what = f"exports[{i}]"
        data = _object(item, what, EXPORT_FIELDS)
        pseudo = clean_path(data.get("pseudo"), f"{what}.pseudo")
        if pseudo == "/":
            raise NfsSpecError(f"{what}.pseudo must not be '/' (that is the NFSv4 pseudo root)")
        exports.append(ExportSpec(
            path=clean_path(data.get("path", "/"), f"{what}.path"),
            pseudo=pseudo,
            access=_word(data.get("access", "rw"), f"{what}.access", ACCESS),
            clients=_clients(data.get("clients"), f"{what}.clients"),
            squash=_word(data.get("squash", "root"), f"{what}.squash", SQUASH),
        ))
    pseudos = [e.pseudo for e in exports]
    if len(set(pseudos)) != len(pseudos):
        raise NfsSpecError(f"exports[].pseudo: a pseudo path is used twice: {short(pseudos)}")
    return tuple(exports)


def check_grace(grace: Any, lease: Any) -> tuple[int, int]:
    """grace and lease seconds in range, and grace 0 (graceless) or at least one lease."""
    grace = _seconds(grace, "nfs.grace_seconds", MIN_GRACE, MAX_GRACE)
    lease = _seconds(lease, "nfs.lease_seconds", MIN_LEASE, MAX_LEASE)
    if 0 < grace < lease:
        raise NfsSpecError(f"nfs.grace_seconds ({grace}) must be at least nfs.lease_seconds ({lease}), so clients "
                           "have a full lease to reclaim; or 0 for no grace (unsafe for lock holders)")
    return grace, lease


def parse_nfs(value: Any) -> NfsSpec:
    data = _object(value if value is not None else {}, "nfs", NFS_FIELDS)
    backend = _word(data.get("backend", "ganesha"), "nfs.backend", BACKENDS)
    grace, lease = check_grace(data.get("grace_seconds", 10), data.get("lease_seconds", 10))
    return NfsSpec(backend=backend, grace_seconds=grace, lease_seconds=lease)


def ganesha_client_problem(client: str) -> str | None:
    """Why NFS-Ganesha 4.3 cannot read this (normalised) client network, or None.

    Its config lexer takes a prefix length of one or two digits, not 0 (measured against
    ganesha.nfsd 4.3: "10.0.0.0/0" becomes a path, "fd00::/100" a syntax error). A /128
    is written as a plain address, which it reads.
    """
    net = ipaddress.ip_network(client)
    if net.prefixlen == 0:
        return ("NFS-Ganesha 4.3 cannot read a /0 network; write it as two /1 networks "
                "(0.0.0.0/1 and 128.0.0.0/1, or ::/1 and 8000::/1)")
    if net.version == 6 and 100 <= net.prefixlen <= 127:
        return "NFS-Ganesha 4.3 cannot read IPv6 prefixes /100 to /127; use /99 or shorter, or single addresses"
    return None


def check_backend(exports: tuple[ExportSpec, ...], nfs: NfsSpec) -> None:
    """What a backend cannot serve is refused in the spec, not found at takeover time."""
    if nfs.backend != "ganesha":
        return
    for i, export in enumerate(exports):
        for client in export.clients:
            problem = ganesha_client_problem(client)
            if problem:
                raise NfsSpecError(f"exports[{i}].clients: {client!r}: {problem}")


# --- re-checks for the renderers (defence in depth) ---------------------------------------

def check_export(export: ExportSpec) -> ExportSpec:
    """An ExportSpec exactly as parse_exports would have produced it; NfsSpecError otherwise."""
    what = f"export {short(getattr(export, 'pseudo', None))}"
    if not isinstance(export, ExportSpec):
        raise NfsSpecError(f"{what}: not an ExportSpec")
    if clean_path(export.path, f"{what}: path") != export.path:
        raise NfsSpecError(f"{what}: path {short(export.path)} is not in normal form")
    if clean_path(export.pseudo, f"{what}: pseudo") != export.pseudo or export.pseudo == "/":
        raise NfsSpecError(f"{what}: pseudo {short(export.pseudo)} is not a normal pseudo path other than '/'")
    _word(export.access, f"{what}: access", ACCESS)
    _word(export.squash, f"{what}: squash", SQUASH)
    if not isinstance(export.clients, tuple) or not export.clients:
        raise NfsSpecError(f"{what}: clients must be a non-empty tuple")
    for client in export.clients:
        if check_client(client, f"{what}: clients") != client:
            raise NfsSpecError(f"{what}: client {short(client)} is not in normal form")
    return export


def check_storage(storage: StorageSpec) -> StorageSpec:
    """A StorageSpec exactly as parse_storage would have produced it; NfsSpecError otherwise."""
    if not isinstance(storage, StorageSpec) or not isinstance(storage.options, tuple):
        raise NfsSpecError("storage: not a StorageSpec")
    if any(not isinstance(o, str) or "," in o for o in storage.options):
        raise NfsSpecError(f"storage.options: {short(storage.options)} are not single options")
    again = parse_storage({"device": storage.device, "fstype": storage.fstype, "options": ",".join(storage.options)})
    if again != storage:
        raise NfsSpecError(f"storage: {short(storage)} is not in normal form")
    return storage
