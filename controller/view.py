"""The agent's picture of the cluster: everything below the prefix, kept by the watch.

A ClusterView is a plain value: the watch loop builds a new one per batch of events and
hands it to the reconcilers, so they never see a half-applied batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

from controller.keyspace import Keyspace
from controller.spec import SpecError, VfsSpec, parse_intent, parse_spec


@dataclass(frozen=True)
class KeyRecord:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def json(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.value)
        except (ValueError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class Owner:
    node: str
    epoch: int
    lease: int
    value: dict[str, Any]


@dataclass(frozen=True)
class VfsConfig:
    """What operators asked for one VFS, validated. `errors` explain what was ignored."""

    name: str
    spec: VfsSpec | None
    intent: str | None
    errors: tuple[str, ...] = ()

    @property
    def error(self) -> str:
        return "; ".join(self.errors)


@dataclass(frozen=True)
class ClusterView:
    keyspace: Keyspace
    revision: int = 0
    keys: dict[str, KeyRecord] = field(default_factory=dict)

    def applied(self, revision: int, events: list[tuple[str, KeyRecord | None, int]]) -> ClusterView:
        """The view after a batch of watch events; events this view already reflects are skipped."""
        keys = dict(self.keys)
        for key, record, event_revision in events:
            if event_revision <= self.revision:
                continue
            if record is None:
                keys.pop(key, None)
            else:
                keys[key] = record
        return replace(self, revision=max(self.revision, revision), keys=keys)

    def _get(self, key: str) -> KeyRecord | None:
        return self.keys.get(key)

    def vfs_names(self) -> list[str]:
        names = set()
        for key in self.keys:
            parsed = self.keyspace.parse(key)
            if parsed and parsed[0] == "vfs":
                names.add(parsed[1])
        return sorted(names)

    def live_nodes(self) -> dict[str, dict[str, Any]]:
        nodes = {}
        for key, rec in self.keys.items():
            parsed = self.keyspace.parse(key)
            if parsed and parsed[0] == "node":
                nodes[parsed[1]] = rec.json() or {}
        return nodes

    def owner(self, vfs: str) -> Owner | None:
        rec = self._get(self.keyspace.owner(vfs))
        if rec is None:
            return None
        data = rec.json() or {}
        return Owner(node=str(data.get("node", "")), epoch=rec.create_revision, lease=rec.lease, value=data)

    def status(self, vfs: str) -> dict[str, Any] | None:
        rec = self._get(self.keyspace.status(vfs))
        return rec.json() if rec else None

    def raw_intent(self, vfs: str) -> str | None:
        rec = self._get(self.keyspace.intent(vfs))
        return rec.value.decode(errors="replace").strip() if rec else None

    def config(self, vfs: str) -> VfsConfig:
        """The validated spec and intent of one VFS, including cross-VFS checks."""
        spec_rec = self._get(self.keyspace.spec(vfs))
        if spec_rec is None:
            return VfsConfig(vfs, None, None, ("no spec",))
        try:
            spec = parse_spec(vfs, spec_rec.value)
        except SpecError as exc:
            return VfsConfig(vfs, None, None, (f"invalid spec: {exc}",))
        clash = self._vip_clash(spec, spec_rec)
        if clash:
            return VfsConfig(vfs, None, None, (clash,))
        intent_rec = self._get(self.keyspace.intent(vfs))
        if intent_rec is None:
            return VfsConfig(vfs, spec, None)
        try:
            return VfsConfig(vfs, spec, parse_intent(intent_rec.value, spec))
        except SpecError as exc:
            return VfsConfig(vfs, spec, None, (f"invalid intent ignored: {exc}",))

    def _vip_clash(self, spec: VfsSpec, spec_rec: KeyRecord) -> str | None:
        # A VIP that another VFS is being served with stays with it, whatever its spec says
        # now; otherwise the VFS whose spec was created first keeps a contested VIP.
        for other in self.vfs_names():
            other_owner = self.owner(other)
            if other != spec.name and other_owner and other_owner.value.get("vip", "").split("/")[0] == \
                    spec.vip_address:
                return f"invalid spec: VIP {spec.vip_address} is in use by VFS {other!r} on {other_owner.node}"
        for other in self.vfs_names():
            other_rec = self._get(self.keyspace.spec(other))
            if other == spec.name or other_rec is None:
                continue
            try:
                other_spec = parse_spec(other, other_rec.value)
            except SpecError:
                continue
            same_disk = spec.storage and other_spec.storage and spec.storage.device == other_spec.storage.device
            if other_spec.vip.ip != spec.vip.ip and not same_disk:
                continue
            if (other_rec.create_revision, other) < (spec_rec.create_revision, spec.name):
                if same_disk and spec.storage:
                    return f"invalid spec: device {spec.storage.device} is already used by VFS {other!r}"
                return f"invalid spec: VIP {spec.vip_address} is already used by VFS {other!r}"
        return None
