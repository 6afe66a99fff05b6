"""Node policy: what this node agrees to serve, whatever a spec asks. Pure; set in the agent's config.

Anyone who may write a spec key decides which device root agents mount and to whom they export
it; etcd RBAC (docs/operations.md) limits who that is, and this limits what even they can ask of
this node. The policy lives in the node's own config file, never in etcd.

Rules kept here:
- `devices`: shell patterns (fnmatch, case-sensitive, `*` also matches `/`) the spec's storage.device
  must match, e.g. "/dev/disk/by-id/*"; the spec grammar already refuses '.' and '..' parts, so a
  pattern cannot be escaped. Empty: any device under /dev/ (the agent warns at start-up).
- `client_networks`: every export client network must lie inside one of these networks. Empty: any.
- `backends`: the NFS backends this node runs; ganesha only by default (the kernel nfsd backend
  is one server for the whole node and is enabled explicitly).
- A VIP-only spec (no storage, no exports) is never refused: it mounts and exports nothing.
A refusal is this node's alone: it does not take the VFS (and releases it if it holds it), says
why in its registration, and the other candidates go on without it (placement.preference);
`nfs-ha status` shows the reason.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from controller.spec import VfsSpec
from controller.spec_nfs import BACKENDS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class NodePolicy:
    devices: tuple[str, ...] = ()
    client_networks: tuple[Network, ...] = ()
    backends: tuple[str, ...] = ("ganesha",)

    @classmethod
    def from_settings(cls, devices: Iterable[str] = (), client_networks: Iterable[str] = (),
                      backends: Iterable[str] = ("ganesha",)) -> NodePolicy:
        """ValueError naming the setting for a value that cannot be used."""
        devices = tuple(devices)
        for pattern in devices:
            if not pattern.startswith("/dev/"):
                raise ValueError(f"allowed_devices: {pattern!r} must start with /dev/")
        networks = []
        for text in client_networks:
            try:
                networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                raise ValueError(f"allowed_client_networks: {text!r} is not a network in normal form ({exc})") \
                    from None
        backends = tuple(backends)
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise ValueError(f"nfs_backends must be a non-empty list of {list(BACKENDS)}, got {list(backends)}")
        return cls(devices, tuple(networks), backends)

    def refuses(self, spec: VfsSpec) -> str | None:
        """Why this node will not serve `spec`, or None."""
        if spec.storage is not None and self.devices and \
                not any(fnmatch.fnmatchcase(spec.storage.device, p) for p in self.devices):
            return f"storage.device {spec.storage.device} is not in this node's allowed_devices"
        if spec.nfs is not None and spec.nfs.backend not in self.backends:
            return f"nfs.backend {spec.nfs.backend} is not in this node's nfs_backends {list(self.backends)}"
        if self.client_networks:
            for export in spec.exports:
                for client in export.clients:
                    net = ipaddress.ip_network(client, strict=False)
                    if not any(net.version == allowed.version and net.subnet_of(allowed)  # type: ignore[arg-type]
                               for allowed in self.client_networks):
                        return (f"export {export.pseudo}: clients {client} are not inside this node's "
                                "allowed_client_networks")
        return None
