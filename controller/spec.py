"""Parsing and validation of operator input: VFS specs and intents.

Everything here is pure. Invariants:
- parse_spec and parse_intent raise SpecError and nothing else, whatever bytes they get (too
  large, nested too deeply, not UTF-8, a bug in a validator): one bad spec is that VFS's status
  error, never an exception that could take an agent, or `nfs-ha status`, down;
- raw input is size-capped before it is decoded (MAX_SPEC_BYTES, MAX_INTENT_BYTES);
- messages name the offending field and quote at most a short excerpt of the value;
- a VIP is a usable unicast IPv4 address with a prefix of at least /MIN_VIP_PREFIX; whether it fits
  the interface it is raised on is host knowledge, checked by vip_fits.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from controller.keyspace import InvalidName, check_name
from controller.spec_nfs import (
    ExportSpec,
    NfsSpec,
    NfsSpecError,
    StorageSpec,
    check_backend,
    parse_exports,
    parse_nfs,
    parse_storage,
    short,
)

MIN_LEASE_TTL = 1
MAX_LEASE_TTL = 300
SPEC_FIELDS = {"vip", "candidates", "lease_ttl", "storage", "exports", "nfs"}
MAX_SPEC_BYTES = 64 * 1024
MAX_INTENT_BYTES = 256
MAX_CANDIDATES = 64  # far more nodes than one VFS fails over between; a longer list is a mistake
MIN_VIP_PREFIX = 8  # shorter prefixes install a route over a large part of the address space
NAME_RULE = "must match [a-z0-9][a-z0-9-]{0,62}"


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


def _check_name(value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except InvalidName:
        raise SpecError(f"invalid {what} {short(value)}: {NAME_RULE}") from None


def parse_vip(value: Any) -> ipaddress.IPv4Interface:
    if not isinstance(value, str) or "/" not in value:
        raise SpecError(f"vip must be a string 'A.B.C.D/LEN', got {short(value)}")
    try:
        iface = ipaddress.ip_interface(value)
    except ValueError as exc:
        raise SpecError(f"vip {short(value)} is not an IP address with prefix length: {short(str(exc))}") from None
    if not isinstance(iface, ipaddress.IPv4Interface):
        raise SpecError(f"vip {short(value)}: only IPv4 VIPs are supported (gratuitous ARP)")
    ip = iface.ip
    if (ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local or ip.is_reserved
            or ip in ipaddress.IPv4Network("0.0.0.0/8")):
        raise SpecError(f"vip {short(value)} is not a usable unicast address")
    net = iface.network
    if net.prefixlen < MIN_VIP_PREFIX:
        raise SpecError(f"vip {short(value)}: prefix /{net.prefixlen} is too short (at least /{MIN_VIP_PREFIX}; "
                        "use the interface's own prefix or /32): raising it installs a route that can cut "
                        "the node off from etcd and its peers")
    if net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
        raise SpecError(f"vip {short(value)} is the network or broadcast address of {net}")
    return iface


def vip_fits(vip: ipaddress.IPv4Interface | str,
             interface_networks: Iterable[ipaddress.IPv4Interface | ipaddress.IPv4Network | str]) -> str | None:
    """Whether `vip` may be raised on an interface with these networks: None if so, else why not.

    Raising an address with a prefix adds a route for the whole prefix through that interface,
    so a VIP whose prefix does not match the interface's subnet can steal traffic for other
    hosts (the etcd peers among them) from the route they need. A VIP fits when it is a /32
    (no route at all) or its network equals one of the interface's IPv4 networks.

    `interface_networks`: the interface's addresses (IPv4Interface, e.g. from node.vip
    addresses()) or networks, *without* VIPs nfs-ha raised there itself, or a VIP would vouch
    for itself. Entries that do not parse, and IPv6 ones, are ignored: they can only make a VIP
    not fit. Pure; the takeover calls it before the VIP is raised.
    """
    try:
        iface = vip if isinstance(vip, ipaddress.IPv4Interface) else ipaddress.IPv4Interface(vip)
    except (ValueError, TypeError):
        return f"VIP {short(vip)} is not an IPv4 address with prefix length"
    if iface.network.prefixlen == 32:
        return None
    networks: list[ipaddress.IPv4Network] = []
    for item in interface_networks:
        try:
            if isinstance(item, ipaddress.IPv4Interface):
                net = item.network
            elif isinstance(item, ipaddress.IPv4Network):
                net = item
            elif isinstance(item, str):
                net = ipaddress.IPv4Interface(item).network
            else:
                continue
        except ValueError:
            continue
        if net == iface.network:
            return None
        networks.append(net)
    have = ", ".join(sorted({str(n) for n in networks})) or "no IPv4 network"
    return (f"VIP {iface.with_prefixlen} does not fit the interface (it has {have}): its prefix must be /32 or "
            "equal one of the interface's subnets, else raising it adds a route that can cut this node off")


def parse_candidates(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError("candidates must be a non-empty list of node names")
    if len(value) > MAX_CANDIDATES:
        raise SpecError(f"candidates lists {len(value)} nodes; at most {MAX_CANDIDATES} are allowed")
    names = [_check_name(item, "candidate node name") for item in value]
    if len(set(names)) != len(names):
        raise SpecError(f"candidates list a node twice: {short(names)}")
    return tuple(names)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SpecError(f"spec has the key(s) {short(twice)} more than once in one object")
    return dict(pairs)


def _load_json(raw: Any) -> Any:
    if isinstance(raw, str):
        size = len(raw.encode("utf-8", "replace")) if len(raw) <= MAX_SPEC_BYTES else len(raw)
    elif isinstance(raw, bytes | bytearray):
        size = len(raw)
    else:
        raise SpecError(f"spec must be JSON text, got {type(raw).__name__}")
    if size > MAX_SPEC_BYTES:
        raise SpecError(f"spec is {size} bytes; at most {MAX_SPEC_BYTES} are allowed")
    try:
        # NaN and Infinity parse as floats, which every numeric field refuses by name.
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise SpecError("spec is not valid JSON: nested too deeply") from None
    except SpecError:
        raise
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ints beyond the digit limit
        raise SpecError(f"spec is not valid JSON: {str(exc)[:200]}") from None


def parse_spec(name: str, raw: bytes | str) -> VfsSpec:
    """The validated spec of VFS `name`; SpecError (and only SpecError) otherwise."""
    try:
        return _parse_spec(name, raw)
    except SpecError:
        raise
    except NfsSpecError as exc:
        raise SpecError(str(exc)) from None
    except RecursionError:
        raise SpecError("spec is nested too deeply") from None
    except Exception as exc:  # containment: a validator bug is this VFS's error, never an agent crash
        raise SpecError(f"spec could not be validated ({type(exc).__name__}: {short(str(exc))})") from None


def _parse_spec(name: str, raw: bytes | str) -> VfsSpec:
    _check_name(name, "VFS name")
    data = _load_json(raw)
    if not isinstance(data, dict):
        raise SpecError("spec must be a JSON object")
    unknown = sorted(set(data) - SPEC_FIELDS)
    if unknown:
        raise SpecError(f"spec has unknown fields {short(unknown)}; allowed: {sorted(SPEC_FIELDS)}")
    if "vip" not in data or "candidates" not in data:
        raise SpecError("spec needs 'vip' and 'candidates'")
    ttl = data.get("lease_ttl")
    if ttl is not None and (
        not isinstance(ttl, int) or isinstance(ttl, bool) or not MIN_LEASE_TTL <= ttl <= MAX_LEASE_TTL
    ):
        raise SpecError(f"lease_ttl must be an integer from {MIN_LEASE_TTL} to {MAX_LEASE_TTL}, got {short(ttl)}")
    vip = parse_vip(data["vip"])
    candidates = parse_candidates(data["candidates"])
    storage, exports, nfs = _parse_fileserver(data)
    return VfsSpec(name=name, vip=vip, candidates=candidates, lease_ttl=ttl, storage=storage, exports=exports,
                   nfs=nfs)


def _parse_fileserver(data: dict[str, Any]) -> tuple[StorageSpec | None, tuple[ExportSpec, ...], NfsSpec | None]:
    """storage + exports (+ nfs, defaulted) together, or none of them."""
    if "storage" not in data:
        if "exports" in data or "nfs" in data:
            raise SpecError("'exports' and 'nfs' need 'storage' (the filesystem they export)")
        return None, (), None
    if "exports" not in data:
        raise SpecError("'storage' needs 'exports' (what to serve from it)")
    try:
        storage, exports = parse_storage(data["storage"]), parse_exports(data["exports"])
        nfs = parse_nfs(data.get("nfs"))
        check_backend(exports, nfs)
    except NfsSpecError as exc:
        raise SpecError(str(exc)) from None
    return storage, exports, nfs


def parse_intent(raw: bytes | str, spec: VfsSpec) -> str:
    """The intent's node name, if it is a valid candidate of the spec; SpecError (only) otherwise."""
    try:
        return _parse_intent(raw, spec)
    except SpecError:
        raise
    except Exception as exc:  # containment, as in parse_spec
        raise SpecError(f"intent could not be validated ({type(exc).__name__}: {short(str(exc))})") from None


def _parse_intent(raw: bytes | str, spec: VfsSpec) -> str:
    if isinstance(raw, str):
        if len(raw) > MAX_INTENT_BYTES:
            raise SpecError(f"intent is longer than {MAX_INTENT_BYTES} bytes")
        text = raw
    elif isinstance(raw, bytes | bytearray):
        if len(raw) > MAX_INTENT_BYTES:
            raise SpecError(f"intent is longer than {MAX_INTENT_BYTES} bytes")
        try:
            text = bytes(raw).decode()
        except UnicodeDecodeError:
            raise SpecError("intent is not UTF-8 text") from None
    else:
        raise SpecError(f"intent must be text, got {type(raw).__name__}")
    node = _check_name(text.strip(), "intent node name")
    if node not in spec.candidates:
        raise SpecError(f"intent names {node!r}, which is not a candidate of this VFS {list(spec.candidates)}")
    return node
