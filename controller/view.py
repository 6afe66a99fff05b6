"""The agent's picture of the cluster: everything below the prefix, kept by the watch.

A ClusterView is a plain value: the watch loop builds a new one per batch of events and
hands it to the reconcilers, so they never see a half-applied batch.

Its `revision` is the revision up to which it reflects etcd: the header revision of a full
load, then the highest revision of a watch event applied. Never a watch response's header
revision: during a catch-up (a watch re-created after a reconnect) etcd sends the missed
events in batches of up to 1000 revisions, each with the header revision of the *current*
store, and a view at that revision would skip every event of the later batches (and the
watch would be re-created past them).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from controller.keyspace import Keyspace
from controller.spec import SpecError, VfsSpec, parse_intent, parse_spec


def parsed_spec(name: str, raw: bytes) -> VfsSpec:
    """parse_spec, parsed once per distinct (name, value): every reconciler's config() checks its spec
    against every other spec (VIP and device clashes), so without this one event costs O(VFS^2)
    parses, and a large valid spec made that enough to starve the keepalive thread (chaos run)."""
    if len(raw) > MAX_SPEC_MEMO:
        return parse_spec(name, raw)  # refused at once by its size; not worth keeping in memory
    result = _parse_memo(name, raw)
    if isinstance(result, SpecError):
        raise SpecError(str(result))  # a fresh one: re-raising one object would grow its traceback
    return result


MAX_SPEC_MEMO = 64 * 1024  # controller/spec.py refuses larger specs before parsing them


@functools.lru_cache(maxsize=1024)  # VfsSpec is frozen; raw is capped at 64 KiB before parsing
def _parse_memo(name: str, raw: bytes) -> VfsSpec | SpecError:
    try:
        return parse_spec(name, raw)
    except SpecError as exc:
        return exc


MAX_JSON_VALUE = 64 * 1024  # far above any status or registration nfs-ha writes


@dataclass(frozen=True)
class KeyRecord:
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int

    def json(self) -> dict[str, Any] | None:
        """The value as a JSON object, or None: agent-written keys are untrusted too (a junk owner,
        status or node key must not take down a reconciler or `nfs-ha status`)."""
        if len(self.value) > MAX_JSON_VALUE:
            return None
        try:
            data = json.loads(self.value)
        except (ValueError, UnicodeDecodeError, RecursionError):
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

    def applied(self, header_revision: int, events: list[tuple[str, KeyRecord | None, int]]) -> ClusterView:
        """The view after a batch of watch events; events this view already reflects are skipped.

        The revision advances to the highest event revision applied. `header_revision` (the
        response header's) is deliberately unused, see the module docstring; a batch without
        events (a progress notification) leaves the view as it is.
        """
        del header_revision
        keys = dict(self.keys)
        revision = self.revision
        for key, record, event_revision in events:
            if event_revision <= self.revision:
                continue  # compared with the revision before this batch: a transaction's events share one
            if record is None:
                keys.pop(key, None)
            else:
                keys[key] = record
            revision = max(revision, event_revision)
        if revision == self.revision:
            return self
        return replace(self, revision=revision, keys=keys)

    def junk_keys(self) -> list[str]:
        """Keys below the prefix that are neither a VFS field nor a node (see keyspace): ignored."""
        return sorted(k for k in self.keys if self.keyspace.is_junk(k))

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

    def epoch_base(self) -> int:
        """The storage epoch base (0 when unset or not a plain non-negative integer: a lower base
        only makes a takeover refuse a disk, never accept a stale one)."""
        rec = self._get(self.keyspace.epoch_base)
        text = rec.value.decode(errors="replace").strip() if rec else ""
        return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else 0

    def status(self, vfs: str) -> dict[str, Any] | None:
        rec = self._get(self.keyspace.status(vfs))
        return rec.json() if rec else None

    def raw_intent(self, vfs: str) -> str | None:
        rec = self._get(self.keyspace.intent(vfs))
        return rec.value.decode(errors="replace").strip() if rec else None

    def config(self, vfs: str) -> VfsConfig:
        """The validated spec and intent of one VFS, including cross-VFS checks.

        Never raises: whatever goes wrong with one VFS's keys is that VFS's error (parse_spec and
        parse_intent already raise only SpecError; this holds even if they did not).
        """
        try:
            spec_rec = self._get(self.keyspace.spec(vfs))
            if spec_rec is None:
                return VfsConfig(vfs, None, None, ("no spec",))
            try:
                spec = parsed_spec(vfs, spec_rec.value)
            except Exception as exc:
                return VfsConfig(vfs, None, None, (f"invalid spec: {exc}",))
            clash = self._vip_clash(spec, spec_rec)
            if clash:
                return VfsConfig(vfs, None, None, (clash,))
            intent_rec = self._get(self.keyspace.intent(vfs))
            if intent_rec is None:
                return VfsConfig(vfs, spec, None)
            try:
                return VfsConfig(vfs, spec, parse_intent(intent_rec.value, spec))
            except Exception as exc:
                return VfsConfig(vfs, spec, None, (f"invalid intent ignored: {exc}",))
        except Exception as exc:  # containment: one VFS's bad keys must not stop the others
            return VfsConfig(vfs, None, None, (f"invalid spec: {type(exc).__name__}: {str(exc)[:200]}",))

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
                other_spec = parsed_spec(other, other_rec.value)
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
