"""Parsing and validation of operator input: VFS specs and intents.

Everything here is pure: a bad spec or intent becomes a SpecError with a message an
operator can act on, never an exception that could take an agent down.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from controller.keyspace import InvalidName, check_name
from controller.spec_nfs import (
    ExportSpec,
    NfsSpec,
    NfsSpecError,
    StorageSpec,
    parse_exports,
    parse_nfs,
    parse_storage,
)

MIN_LEASE_TTL = 1
MAX_LEASE_TTL = 300
SPEC_FIELDS = {"vip", "candidates", "lease_ttl", "storage", "exports", "nfs"}


class SpecError(ValueError):
    """Operator input that cannot be acted upon; the message is shown in status."""


@dataclass(frozen=True)
class VfsSpec:
    name: str
    vip: ipaddress.IPv4Interface
    candidates: tuple[str, ...]
    lease_ttl: int | None = None
    storage: StorageSpec | None = None  # None: a VIP-only VFS (no disk, no NFS server)
    exports: tuple[ExportSpec, ...] = ()
    nfs: NfsSpec | None = None

    @property
    def vip_address(self) -> str:
        return str(self.vip.ip)

    @property
    def vip_cidr(self) -> str:
        return self.vip.with_prefixlen


def parse_vip(value: Any) -> ipaddress.IPv4Interface:
    if not isinstance(value, str) or "/" not in value:
        raise SpecError(f"vip must be a string 'A.B.C.D/LEN', got {value!r}")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise SpecError(f"vip {value!r} is not an IP address with prefix length: {exc}") from None
    if not isinstance(iface, ipaddress.IPv4Interface):
        raise SpecError(f"vip {value!r}: only IPv4 VIPs are supported (gratuitous ARP)")
    ip = iface.ip
    if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local or ip.is_reserved:
        raise SpecError(f"vip {value!r} is not a usable unicast address")
    net = iface.network
    if net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
        raise SpecError(f"vip {value!r} is the network or broadcast address of {net}")
    return iface


def parse_candidates(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError("candidates must be a non-empty list of node names")
    names: list[str] = []
    for item in value:
        try:
            names.append(check_name(item, "candidate node name"))
        except InvalidName as exc:
            raise SpecError(str(exc)) from None
    if len(set(names)) != len(names):
        raise SpecError(f"candidates list a node twice: {names}")
    return tuple(names)


def parse_spec(name: str, raw: bytes | str) -> VfsSpec:
    try:
        check_name(name, "VFS name")
    except InvalidName as exc:
        raise SpecError(str(exc)) from None
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpecError(f"spec is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError("spec must be a JSON object")
    unknown = sorted(set(data) - SPEC_FIELDS)
    if unknown:
        raise SpecError(f"spec has unknown fields {unknown}; allowed: {sorted(SPEC_FIELDS)}")
    if "vip" not in data or "candidates" not in data:
        raise SpecError("spec needs 'vip' and 'candidates'")
    ttl = data.get("lease_ttl")
    if ttl is not None and (
        not isinstance(ttl, int) or isinstance(ttl, bool) or not MIN_LEASE_TTL <= ttl <= MAX_LEASE_TTL
    ):
        raise SpecError(f"lease_ttl must be an integer from {MIN_LEASE_TTL} to {MAX_LEASE_TTL}, got {ttl!r}")
    storage, exports, nfs = _parse_fileserver(data)
    return VfsSpec(name=name, vip=parse_vip(data["vip"]), candidates=parse_candidates(data["candidates"]),
                   lease_ttl=ttl, storage=storage, exports=exports, nfs=nfs)


def _parse_fileserver(data: dict[str, Any]) -> tuple[StorageSpec | None, tuple[ExportSpec, ...], NfsSpec | None]:
    """storage + exports (+ nfs, defaulted) together, or none of them."""
    if "storage" not in data:
        if "exports" in data or "nfs" in data:
            raise SpecError("'exports' and 'nfs' need 'storage' (the filesystem they export)")
        return None, (), None
    if "exports" not in data:
        raise SpecError("'storage' needs 'exports' (what to serve from it)")
    try:
        return parse_storage(data["storage"]), parse_exports(data["exports"]), parse_nfs(data.get("nfs"))
    except NfsSpecError as exc:
        raise SpecError(str(exc)) from None


def parse_intent(raw: bytes | str, spec: VfsSpec) -> str:
    """The intent's node name, if it is a valid candidate of the spec."""
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise SpecError("intent is not UTF-8 text") from None
    node = text.strip()
    try:
        check_name(node, "intent node name")
    except InvalidName as exc:
        raise SpecError(str(exc)) from None
    if node not in spec.candidates:
        raise SpecError(f"intent names {node!r}, which is not a candidate of this VFS {list(spec.candidates)}")
    return node
