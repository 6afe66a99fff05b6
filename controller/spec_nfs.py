"""Validation of the storage, exports and nfs parts of a VFS spec (pure, like spec.py).

Every value that later reaches a command line or a server configuration is checked here
against a narrow pattern, so nothing from etcd can smuggle syntax into either.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from dataclasses import dataclass
from typing import Any

FSTYPES = ("xfs", "ext4")
ACCESS = ("rw", "ro", "none")
SQUASH = ("root", "all", "none")
BACKENDS = ("ganesha", "kernel")
DEVICE_RE = re.compile(r"^/dev/[A-Za-z0-9._:+@=/-]+$")
MOUNT_OPTION_RE = re.compile(r"^[a-z0-9_]+(=[A-Za-z0-9_.:]+)?$")
FORBIDDEN_MOUNT_OPTIONS = {"remount", "bind", "rbind", "move", "defaults", "loop", "owner", "user", "users"}
PATH_PART_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
STORAGE_FIELDS = {"device", "fstype", "options"}
EXPORT_FIELDS = {"path", "pseudo", "access", "clients", "squash"}
NFS_FIELDS = {"backend", "grace_seconds", "lease_seconds"}


class NfsSpecError(ValueError):
    pass


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
    clients: tuple[str, ...]  # CIDRs, normalised ("10.77.0.0/24", "10.77.0.50/32")
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
        raise NfsSpecError(f"{what} has unknown fields {unknown}; allowed: {sorted(allowed)}")
    return value


def _word(value: Any, what: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise NfsSpecError(f"{what} must be one of {list(choices)}, got {value!r}")
    return str(value)


def _seconds(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise NfsSpecError(f"{what} must be an integer from {low} to {high}, got {value!r}")
    return value


def clean_path(value: Any, what: str) -> str:
    """An absolute, normalised path of plain name parts (no '..', no odd characters)."""
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 1024:
        raise NfsSpecError(f"{what} must be an absolute path, got {value!r}")
    parts = [p for p in value.split("/") if p]
    for part in parts:
        if part in (".", "..") or not PATH_PART_RE.match(part):
            raise NfsSpecError(f"{what} {value!r}: path parts may only use A-Z a-z 0-9 . _ + - (no '..')")
    return posixpath.join("/", *parts)


def parse_storage(value: Any) -> StorageSpec:
    data = _object(value, "storage", STORAGE_FIELDS)
    device = data.get("device")
    if not isinstance(device, str) or not DEVICE_RE.match(device) or "/../" in device or device.endswith("/.."):
        raise NfsSpecError(f"storage.device must be a device path under /dev/, got {device!r}")
    fstype = _word(data.get("fstype"), "storage.fstype", FSTYPES)
    raw_options = data.get("options", "")
    if not isinstance(raw_options, str):
        raise NfsSpecError("storage.options must be a comma-separated string")
    options = tuple(o for o in raw_options.split(",") if o)
    for option in options:
        if not MOUNT_OPTION_RE.match(option) or option.split("=")[0] in FORBIDDEN_MOUNT_OPTIONS:
            raise NfsSpecError(f"storage.options: {option!r} is not an allowed mount option")
    return StorageSpec(device=device, fstype=fstype, options=options)


def _clients(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise NfsSpecError(f"{what} must be a non-empty list of CIDRs")
    result = []
    for item in value:
        try:
            net = ipaddress.ip_network(item, strict=False) if isinstance(item, str) else None
        except ValueError:
            net = None
        if net is None:
            raise NfsSpecError(f"{what}: {item!r} is not an IP network (e.g. 10.0.0.0/24 or 10.0.0.5)")
        result.append(net.with_prefixlen)
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
        raise NfsSpecError(f"exports use a pseudo path twice: {pseudos}")
    return tuple(exports)


def parse_nfs(value: Any) -> NfsSpec:
    data = _object(value if value is not None else {}, "nfs", NFS_FIELDS)
    return NfsSpec(
        backend=_word(data.get("backend", "ganesha"), "nfs.backend", BACKENDS),
        grace_seconds=_seconds(data.get("grace_seconds", 10), "nfs.grace_seconds", 0, 600),
        lease_seconds=_seconds(data.get("lease_seconds", 10), "nfs.lease_seconds", 1, 600),
    )
