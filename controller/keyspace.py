"""The etcd keyspace of nfs-ha (public API, documented in docs/keyspace.md).

    <prefix>/vfs/<vfs>/spec     operator-written JSON spec
    <prefix>/vfs/<vfs>/intent   operator-written node name ("serve it there")
    <prefix>/vfs/<vfs>/owner    agent-written, bound to the owner's per-VFS lease;
                                its create_revision is the VFS epoch (fencing token)
    <prefix>/vfs/<vfs>/status   JSON status, written by the owner (or the status writer)
    <prefix>/nodes/<node>       node registration, bound to the node's lease
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "/nfs-ha"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
VFS_FIELDS = ("spec", "intent", "owner", "status")


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

    def node(self, node: str) -> str:
        return f"{self.prefix}/nodes/{node}"

    def parse(self, key: str) -> tuple[str, str, str] | None:
        """Map a key to ("vfs", name, field) or ("node", name, ""); None for foreign keys.

        Names are returned even when they are not valid, so that a bad name can be
        reported rather than silently ignored.
        """
        if not key.startswith(self.root):
            return None
        parts = key[len(self.root):].split("/")
        if len(parts) == 3 and parts[0] == "vfs" and parts[2] in VFS_FIELDS:
            return ("vfs", parts[1], parts[2])
        if len(parts) == 2 and parts[0] == "nodes":
            return ("node", parts[1], "")
        return None
