"""The agent's picture of the cluster: everything below the prefix, kept by the watch.

A ClusterView is a plain value: the watch loop builds a new one per batch of events and
hands it to the reconcilers, so they never see a half-applied batch.

Its `revision` is the revision up to which it reflects etcd: the header revision of a full
load, then the highest revision of a watch event applied. Never a watch response's header
revision: during a catch-up (a watch re-created after a reconnect) etcd sends the missed
events in batches of up to 1000 revisions, each with the header revision of the *current*
store, and a view at that revision would skip every event of the later batches (and the
watch would be re-created past them).

Cost grows with what changed (issue 9): a view carries a ViewIndex (VFS names and their fields,
node registrations, parsed specs, and who uses which VIP and device), updated per watch event
for the keys that event touched only. A batch copies the view's maps once (a C-level dict copy,
microseconds at 1000 VFS) and parses only the specs it changed; `config()` of one VFS is
O(1) plus the VFS that share its VIP or device, and `affected()` tells the agent which
reconcilers a batch concerns. A full load (start-up, resync) reuses the previous view's parsed
specs whose key has the same mod_revision, so a resync parses nothing that did not change.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterable
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
    paused: bool = False  # nothing moves (controller/placement.py)

    @property
    def error(self) -> str:
        return "; ".join(self.errors)



def _spec_or_error(name: str, raw: bytes) -> VfsSpec | str:
    """The parsed spec, or why it is invalid (never raises: one spec's junk stays that VFS's error)."""
    try:
        return parsed_spec(name, raw)
    except Exception as exc:
        return f"invalid spec: {exc}"


def _add(index: dict[str, frozenset[str]], key: str, name: str) -> None:
    index[key] = index.get(key, frozenset()) | {name}


def _discard(index: dict[str, frozenset[str]], key: str, name: str) -> None:
    left = index.get(key, frozenset()) - {name}
    if left:
        index[key] = left
    else:
        index.pop(key, None)


def _owner_vip(record: KeyRecord) -> str | None:
    """The VIP address an owner key records; None when absent or junk (a junk owner key must not
    make every spec clash with it)."""
    vip = (record.json() or {}).get("vip")
    return vip.split("/")[0] if isinstance(vip, str) and vip else None


def _owner_device(record: KeyRecord) -> str | None:
    """The device an owner key records (owners since the device clash rule; older ones record none)."""
    device = (record.json() or {}).get("device")
    return device if isinstance(device, str) and device.startswith("/dev/") else None


def _reusable(key: str, name: str, record: KeyRecord | None, previous: ViewIndex | None,
              previous_keys: dict[str, KeyRecord] | None) -> VfsSpec | str | None:
    """The spec `previous` parsed from this very record (same mod_revision), if any."""
    if record is None or previous is None or previous_keys is None:
        return None
    seen = previous_keys.get(key)
    if seen is None or seen.mod_revision != record.mod_revision or seen.value != record.value:
        return None
    return previous.specs.get(name)


class ViewIndex:
    """Lookups derived from a view's keys, kept per key as events arrive (copy on write: a new view
    gets a copy, an existing one is never changed). Values are frozensets so copies share them."""

    __slots__ = ("backlog", "by_device", "by_vip", "drained", "fields", "intents", "junk", "nodes", "owner_device",
                 "owner_vip", "owners_by_device", "owners_by_vip", "paused_all", "specs", "waiting_on")

    def __init__(self) -> None:
        self.fields: dict[str, frozenset[str]] = {}  # VFS -> which of its keys exist
        # node name -> its registration, parsed once per change (every reconcile pass reads them all;
        # decoding them per pass was the largest cost of a node with 100 VFS): read-only for callers
        self.nodes: dict[str, dict[str, Any]] = {}
        self.specs: dict[str, VfsSpec | str] = {}  # VFS -> its parsed spec, or why it is invalid
        self.by_vip: dict[str, frozenset[str]] = {}  # VIP address -> VFS whose valid spec names it
        self.by_device: dict[str, frozenset[str]] = {}  # device -> VFS whose valid spec names it
        self.owner_vip: dict[str, str] = {}  # VFS -> the VIP address its owner key records
        self.owners_by_vip: dict[str, frozenset[str]] = {}  # VIP address -> VFS owned with it
        self.owner_device: dict[str, str] = {}  # VFS -> the device its owner key records
        self.owners_by_device: dict[str, frozenset[str]] = {}  # device -> VFS owned with it
        self.junk: dict[str, None] = {}  # keys nfs-ha does not understand (an ordered set)
        self.intents: dict[str, bytes] = {}  # VFS -> its raw intent
        # Unowned VFS with a valid spec by the node they wait for (the intent node, if a candidate, else
        # the first candidate): how much a node has still to take over (placement's backlog wait).
        self.waiting_on: dict[str, str] = {}
        self.backlog: dict[str, int] = {}
        self.drained: dict[str, None] = {}  # nodes an operator drained (an ordered set)
        self.paused_all: dict[str, None] = {}  # {"": None} while the cluster-wide pause key exists

    @classmethod
    def build(cls, ks: Keyspace, keys: dict[str, KeyRecord], previous: ViewIndex | None = None,
              previous_keys: dict[str, KeyRecord] | None = None) -> ViewIndex:
        """The index of a full load; specs unchanged since `previous` (same mod_revision) are not parsed again."""
        index = cls()
        for key, record in keys.items():
            index.set(ks, key, record, reuse=(previous, previous_keys), bulk=True)
        for vfs in list(index.specs):  # once every node is known
            index._count_waiting(vfs)
        return index

    def copy(self) -> ViewIndex:
        new = ViewIndex.__new__(ViewIndex)
        for name in self.__slots__:
            setattr(new, name, dict(getattr(self, name)))
        return new

    def set(self, ks: Keyspace, key: str, record: KeyRecord | None,
            reuse: tuple[ViewIndex | None, dict[str, KeyRecord] | None] = (None, None), bulk: bool = False) -> None:
        """Account for `key` now being `record` (None: deleted)."""
        parsed = ks.parse(key)
        if parsed is None:
            if ks.is_junk(key):
                if record is None:
                    self.junk.pop(key, None)
                else:
                    self.junk[key] = None
            return
        kind, name, field_name = parsed
        if kind == "pause":
            if record is None:
                self.paused_all.pop("", None)
            else:
                self.paused_all[""] = None
            return
        if kind == "drain":
            if record is None:
                self.drained.pop(name, None)
            else:
                self.drained[name] = None
            if not bulk:  # who each VFS waits for skips drained nodes
                for vfs in list(self.specs):
                    self._count_waiting(vfs)
            return
        if kind == "node":
            joined_or_left = (record is None) == (name in self.nodes)
            if record is None:
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = record.json() or {}
            if joined_or_left and not bulk:  # who each VFS waits for depends on who is live
                for vfs in list(self.specs):
                    self._count_waiting(vfs)
            return
        present = self.fields.get(name, frozenset())
        present = present | {field_name} if record is not None else present - {field_name}
        if present:
            self.fields[name] = present
        else:
            self.fields.pop(name, None)
        if field_name == "spec":
            self._set_spec(name, record, _reusable(key, name, record, *reuse))
        elif field_name == "owner":
            self._set_owner(name, record)
        elif field_name == "intent":
            if record is None:
                self.intents.pop(name, None)
            else:
                self.intents[name] = record.value
        self._count_waiting(name)

    def _count_waiting(self, name: str) -> None:
        old = self.waiting_on.pop(name, None)
        if old is not None:
            left = self.backlog[old] - 1
            if left:
                self.backlog[old] = left
            else:
                del self.backlog[old]
        spec = self.specs.get(name)
        if not isinstance(spec, VfsSpec) or "owner" in self.fields.get(name, frozenset()):
            return
        order = list(spec.candidates)
        raw = self.intents.get(name)
        if raw is not None:
            with contextlib.suppress(Exception):  # a bad intent is the spec's error, reported elsewhere
                order.insert(0, parse_intent(raw, spec))
        head = next((n for n in order if n in self.nodes and n not in self.drained), None)  # placement's order
        if head is None:
            return
        self.waiting_on[name] = head
        self.backlog[head] = self.backlog.get(head, 0) + 1

    def _set_spec(self, name: str, record: KeyRecord | None, reused: VfsSpec | str | None) -> None:
        old = self.specs.pop(name, None)
        if isinstance(old, VfsSpec):
            _discard(self.by_vip, old.vip_address, name)
            if old.storage is not None:
                _discard(self.by_device, old.storage.device, name)
        if record is None:
            return
        spec = reused if reused is not None else _spec_or_error(name, record.value)
        self.specs[name] = spec
        if isinstance(spec, VfsSpec):
            _add(self.by_vip, spec.vip_address, name)
            if spec.storage is not None:
                _add(self.by_device, spec.storage.device, name)

    def _set_owner(self, name: str, record: KeyRecord | None) -> None:
        _reindex(name, _owner_vip(record) if record is not None else None, self.owner_vip, self.owners_by_vip)
        _reindex(name, _owner_device(record) if record is not None else None, self.owner_device,
                 self.owners_by_device)

    def rivals(self, name: str) -> frozenset[str]:
        """VFS whose spec shares a VIP or device with `name`'s spec (itself included)."""
        spec = self.specs.get(name)
        if not isinstance(spec, VfsSpec):
            return frozenset()
        found = self.by_vip.get(spec.vip_address, frozenset())
        if spec.storage is not None:
            found |= self.by_device.get(spec.storage.device, frozenset())
        return found


def _reindex(name: str, value: str | None, of: dict[str, str], by: dict[str, frozenset[str]]) -> None:
    """`name` now has `value` (None: none): `of` maps names to values, `by` values to names."""
    old = of.pop(name, None)
    if old is not None:
        _discard(by, old, name)
    if value is not None:
        of[name] = value
        _add(by, value, name)


def parse_epoch_base(value: bytes | None) -> int:
    """An epoch-base value: 0 when unset or not a plain non-negative integer of at most 18 digits."""
    text = value.decode(errors="replace").strip() if value else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else 0


@dataclass(frozen=True)
class ClusterView:
    keyspace: Keyspace
    revision: int = 0
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    index: ViewIndex = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.index is None:  # a full load: index every key
            object.__setattr__(self, "index", ViewIndex.build(self.keyspace, self.keys))

    @classmethod
    def loaded(cls, keyspace: Keyspace, revision: int, keys: dict[str, KeyRecord],
               previous: ClusterView | None = None) -> ClusterView:
        """The view of a full load; specs `previous` already parsed (same mod_revision) are reused."""
        index = ViewIndex.build(keyspace, keys, previous.index if previous else None,
                                previous.keys if previous else None)
        return cls(keyspace, revision, keys, index)

    def applied(self, header_revision: int, events: list[tuple[str, KeyRecord | None, int]]) -> ClusterView:
        """The view after a batch of watch events; events this view already reflects are skipped.

        The revision advances to the highest event revision applied. `header_revision` (the
        response header's) is deliberately unused, see the module docstring; a batch without
        events (a progress notification) leaves the view as it is.
        """
        del header_revision
        keys = dict(self.keys)
        index = self.index.copy()
        revision = self.revision
        for key, record, event_revision in events:
            if event_revision <= self.revision:
                continue  # compared with the revision before this batch: a transaction's events share one
            if record is None:
                keys.pop(key, None)
            else:
                keys[key] = record
            index.set(self.keyspace, key, record)
            revision = max(revision, event_revision)
        if revision == self.revision:
            return self
        return replace(self, revision=revision, keys=keys, index=index)

    def affected(self, before: ClusterView, changed: Iterable[str] | None) -> set[str] | None:
        """The VFS whose reconcilers a change from `before` to this view concerns; None: all of them.

        A VFS's own keys concern it; a spec or owner key also concerns the VFS whose specs share its
        VIP or device, before or after (their clash checks, config()); a node registration concerns
        every placement. The epoch base and junk keys are read by no reconciler from the view."""
        if changed is None:
            return None
        names: set[str] = set()
        for key in changed:
            parsed = self.keyspace.parse(key)
            if parsed is None:
                continue
            kind, name, field_name = parsed
            if kind in ("node", "drain", "pause"):
                return None
            names.add(name)
            for view in (before, self):
                if field_name == "spec":
                    names |= view.index.rivals(name)
                elif field_name == "owner":
                    if name in view.index.owner_vip:
                        names |= view.index.by_vip.get(view.index.owner_vip[name], frozenset())
                    if name in view.index.owner_device:
                        names |= view.index.by_device.get(view.index.owner_device[name], frozenset())
        return names

    def junk_keys(self) -> list[str]:
        """Keys below the prefix that are neither a VFS field nor a node (see keyspace): ignored."""
        return sorted(self.index.junk)

    def _get(self, key: str) -> KeyRecord | None:
        return self.keys.get(key)

    def status_revision(self, vfs: str) -> int:
        """The mod_revision of the VFS's status key; 0: it has none."""
        rec = self.keys.get(self.keyspace.status(vfs))
        return rec.mod_revision if rec is not None else 0

    def has_spec(self, vfs: str) -> bool:
        """A spec key exists (valid or not)."""
        return self.keyspace.spec(vfs) in self.keys

    def spec_record(self, vfs: str) -> KeyRecord | None:
        return self.keys.get(self.keyspace.spec(vfs))

    def vfs_names(self) -> list[str]:
        return sorted(self.index.fields)

    def has_reconcilable_keys(self, vfs: str) -> bool:
        """A spec, owner or status key exists (an intent or a pause alone does not make a VFS)."""
        return bool(self.index.fields.get(vfs, frozenset()) - {"intent", "pause"})

    def live_nodes(self) -> dict[str, dict[str, Any]]:
        """Registrations by node name (the same parsed dicts on every call: do not change them). A drained
        node's carries "drained": True (placement.preference skips it), whatever the node wrote."""
        live = dict(self.index.nodes)
        for node, info in live.items():
            if node in self.index.drained or info.get("drained"):
                live[node] = {**info, "drained": node in self.index.drained}
        return live

    def drained(self) -> list[str]:
        return list(self.index.drained)

    def paused(self, vfs: str) -> bool:
        """Nothing moves for this VFS (`nfs-ha pause VFS` or `pause --all`)."""
        return bool(self.index.paused_all) or "pause" in self.index.fields.get(vfs, frozenset())

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
        return parse_epoch_base(rec.value if rec else None)

    def status(self, vfs: str) -> dict[str, Any] | None:
        rec = self._get(self.keyspace.status(vfs))
        return rec.json() if rec else None

    def raw_intent(self, vfs: str) -> str | None:
        rec = self._get(self.keyspace.intent(vfs))
        return rec.value.decode(errors="replace").strip() if rec else None

    def config(self, vfs: str) -> VfsConfig:
        """The validated spec and intent of one VFS, including cross-VFS checks, and whether it is paused."""
        config = self._config(vfs)
        return replace(config, paused=True) if self.paused(vfs) else config

    def _config(self, vfs: str) -> VfsConfig:
        """The validated spec and intent of one VFS, including cross-VFS checks.

        Never raises: whatever goes wrong with one VFS's keys is that VFS's error (parse_spec and
        parse_intent already raise only SpecError; this holds even if they did not).
        """
        try:
            spec_rec = self._get(self.keyspace.spec(vfs))
            if spec_rec is None:
                return VfsConfig(vfs, None, None, ("no spec",))
            spec = self.index.specs.get(vfs)
            if spec is None:
                spec = _spec_or_error(vfs, spec_rec.value)  # not indexed: cannot happen, but never guess
            if not isinstance(spec, VfsSpec):
                return VfsConfig(vfs, None, None, (spec,))
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
        """By the index: the VFS sharing this spec's VIP or device only, never every spec."""
        # A VIP or device that another VFS is being served with stays with it, whatever its spec says
        # now; otherwise the VFS whose spec was created first keeps a contested VIP or device.
        for other in sorted(self.index.owners_by_vip.get(spec.vip_address, frozenset()) - {spec.name}):
            other_owner = self.owner(other)
            if other_owner is not None:
                return f"invalid spec: VIP {spec.vip_address} is in use by VFS {other!r} on {other_owner.node}"
        # The same for a device: a spec changed to a device another VFS is mounted from must not win it
        # by creation order, or a takeover of it elsewhere would mount the disk a second time.
        if spec.storage is not None:
            for other in sorted(self.index.owners_by_device.get(spec.storage.device, frozenset()) - {spec.name}):
                other_owner = self.owner(other)
                if other_owner is not None:
                    return (f"invalid spec: device {spec.storage.device} is in use by VFS {other!r} "
                            f"on {other_owner.node}")
        mine = (spec_rec.create_revision, spec.name)
        for other in sorted(self.index.rivals(spec.name) - {spec.name}):
            other_rec = self._get(self.keyspace.spec(other))
            other_spec = self.index.specs.get(other)
            if other_rec is None or not isinstance(other_spec, VfsSpec):
                continue
            if (other_rec.create_revision, other) < mine:
                same_disk = spec.storage and other_spec.storage and spec.storage.device == other_spec.storage.device
                if same_disk and spec.storage:
                    return f"invalid spec: device {spec.storage.device} is already used by VFS {other!r}"
                return f"invalid spec: VIP {spec.vip_address} is already used by VFS {other!r}"
        return None
