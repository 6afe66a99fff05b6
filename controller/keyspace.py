"""The etcd keyspace of nfs-ha (public API, documented in docs/keyspace.md).

    <prefix>/vfs/<vfs>/spec     operator-written JSON spec
    <prefix>/vfs/<vfs>/intent   operator-written node name ("serve it there")
    <prefix>/vfs/<vfs>/owner    agent-written, bound to the owner's per-VFS lease;
                                its create_revision is the VFS epoch (fencing token)
    <prefix>/vfs/<vfs>/status   JSON status, written by the owner (or the status writer)
    <prefix>/vfs/<vfs>/pause    operator-written (`nfs-ha pause VFS`): nothing moves (placement.py)
    <prefix>/nodes/<node>       node registration, bound to the node's lease
    <prefix>/drain/<node>       operator-written (`nfs-ha drain NODE`): the node is the last resort of
                                placement, and what it holds moves where another candidate can take it
    <prefix>/pause              operator-written (`nfs-ha pause --all`): nothing moves, cluster-wide
    <prefix>/epoch-base         operator-written integer (`nfs-ha raise-epoch N`), only ever raised:
                                storage epoch = epoch-base + owner create_revision

Names must pass check_name. A key below the prefix that does not fit this layout (an invalid
name, an unknown field, a deeper path) is junk: `parse` returns None for it, so it never
becomes a VFS or a node; agents log each junk key once at warning and otherwise ignore it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "/nfs-ha"
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z, not $: "$" also matches before a final newline
VFS_FIELDS = ("spec", "intent", "owner", "status", "pause")


class InvalidName(ValueError):
    pass


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidName(f"invalid {what} {name!r}: must match [a-z0-9][a-z0-9-]{{0,62}}")
    return name


def normalize_prefix(prefix: str) -> str:
    prefix = "/" + prefix.strip("/")
    if prefix == "/" or "//" in prefix:
        raise ValueError(f"invalid key prefix {prefix!r}")
    return prefix


@dataclass(frozen=True)
class Keyspace:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))

    @property
    def root(self) -> str:
        """Everything nfs-ha owns lies below this (with a trailing slash)."""
        return self.prefix + "/"

    def vfs_key(self, vfs: str, field: str) -> str:
        if field not in VFS_FIELDS:
            raise ValueError(f"unknown VFS field {field!r}")
        return f"{self.prefix}/vfs/{vfs}/{field}"

    def spec(self, vfs: str) -> str:
        return self.vfs_key(vfs, "spec")

    def intent(self, vfs: str) -> str:
        return self.vfs_key(vfs, "intent")

    def owner(self, vfs: str) -> str:
        return self.vfs_key(vfs, "owner")

    def status(self, vfs: str) -> str:
        return self.vfs_key(vfs, "status")

    def pause(self, vfs: str) -> str:
        return self.vfs_key(vfs, "pause")

    def node(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def drain(self, node: str) -> str:
        return f"{self.prefix}/drain/{node}"

    @property
    def pause_all(self) -> str:
        return f"{self.prefix}/pause"

    @property
    def epoch_base(self) -> str:
        """Operator-raised integer added to owner epochs for the storage epoch (nfs-ha raise-epoch)."""
        return f"{self.prefix}/epoch-base"

    def parse(self, key: str) -> tuple[str, str, str] | None:
        """Map a key to ("vfs", name, field), ("node", name, ""), ("drain", node, "") or ("pause", "", "")
        (cluster-wide); None for foreign and junk keys (and the epoch base).

        Only valid names are returned: a junk key (see the module docstring) must not start a
        reconciler or count as a live node (an invalid node name could sort first and make
        itself the status writer nobody is). `is_junk` tells junk from foreign keys.
        """
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root):].split("/")
        if len(parts) == 3 and parts[0] == "vfs" and parts[2] in VFS_FIELDS and NAME_RE.match(parts[1]):
            return ("vfs", parts[1], parts[2])
        if len(parts) == 2 and parts[0] in ("nodes", "drain") and NAME_RE.match(parts[1]):
            return ("node" if parts[0] == "nodes" else "drain", parts[1], "")
        if key == self.pause_all:
            return ("pause", "", "")
        return None

    def is_junk(self, key: str) -> bool:
        """A key below the prefix that nfs-ha does not understand (reported, never acted on)."""
        return key.startswith(self.root) and key != self.epoch_base and self.parse(key) is None
