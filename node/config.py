"""Agent configuration: command line over NFS_HA_* environment over a TOML file over defaults."""

from __future__ import annotations

import argparse
import json
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from controller.keyspace import DEFAULT_PREFIX, InvalidName, check_name, normalize_prefix
from controller.spec import MAX_LEASE_TTL, MIN_LEASE_TTL
from controller.store import parse_endpoints


@dataclass(frozen=True)
class AgentConfig:
    name: str
    etcd: str
    interface: str
    lease_ttl: int = 5
    prefix: str = DEFAULT_PREFIX
    rank_delay: float = 0.5
    state_dir: str = "/run/nfs-ha"
    log_level: str = "INFO"
    span_file: str = ""  # also append trace spans here (OTLP/JSON lines), for `nfs-ha timeline`
    fence_command: tuple[str, ...] = ()  # argv run before taking over from a lost node; {node} = its name
    fence_required: bool = False  # a failing fence command blocks the takeover
    fence_timeout: float = 60.0
    watchdog: str = ""  # hardware watchdog device (e.g. /dev/watchdog), armed while VFS are held

    def validate(self) -> AgentConfig:
        try:
            check_name(self.name, "node name")
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
        parse_endpoints(self.etcd)
        if not self.interface or "/" in self.interface or len(self.interface) > 15:
            raise ValueError(f"invalid interface name {self.interface!r}")
        if not MIN_LEASE_TTL <= self.lease_ttl <= MAX_LEASE_TTL:
            raise ValueError(f"lease TTL must be {MIN_LEASE_TTL}..{MAX_LEASE_TTL} s")
        if self.rank_delay < 0:
            raise ValueError("rank delay must not be negative")
        normalize_prefix(self.prefix)
        if self.fence_command and not self.fence_command[0].startswith("/"):
            raise ValueError("fence_command must start with an absolute path (it never runs through a shell)")
        if self.fence_required and not self.fence_command:
            raise ValueError("fence_required needs a fence_command")
        if self.watchdog and not self.watchdog.startswith("/"):
            raise ValueError("watchdog must be an absolute device path, e.g. /dev/watchdog")
        return self

    @property
    def node_state_dir(self) -> Path:
        return Path(self.state_dir) / self.name


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(AgentConfig)}[name]
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind == "tuple[str, ...]":
        items = json.loads(value) if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{name} must be a list of strings (JSON on the command line or in NFS_HA_*)")
        return tuple(items)
    return str(value)


def load(argv: list[str] | None = None) -> AgentConfig:
    parser = argparse.ArgumentParser(prog="nfs-ha-agent", description="nfs-ha node agent")
    parser.add_argument("--config", help="TOML file with the same keys as the long options (underscores)")
    parser.add_argument("--name", help="this node's name")
    parser.add_argument("--etcd", help="comma-separated etcd endpoints, http://HOST:PORT")
    parser.add_argument("--interface", help="interface that carries the VIPs")
    parser.add_argument("--lease-ttl", type=int, help="default per-VFS lease TTL in seconds (default 5)")
    parser.add_argument("--prefix", help=f"etcd key prefix (default {DEFAULT_PREFIX})")
    parser.add_argument("--rank-delay", type=float, help="seconds a lower-ranked candidate waits per rank")
    parser.add_argument("--state-dir", help="local state directory (default /run/nfs-ha)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING")
    parser.add_argument("--span-file", help="append trace spans to this file (OTLP/JSON lines)")
    parser.add_argument("--fence-command", help='JSON argv run before taking over from a lost node, '
                        'e.g. \'["/usr/local/bin/power-off", "{node}"]\'')
    parser.add_argument("--fence-required", default=None, action="store_const", const="true",
                        help="block a takeover when the fence command fails")
    parser.add_argument("--fence-timeout", type=float, help="seconds the fence command may take (default 60)")
    parser.add_argument("--watchdog", help="hardware watchdog device (e.g. /dev/watchdog), armed while this "
                        "node holds a VFS; see docs/safety.md")
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    config_file = args.config or os.environ.get("NFS_HA_CONFIG")
    if config_file:
        with open(config_file, "rb") as fh:
            data = tomllib.load(fh)
        values.update({k.replace("-", "_"): v for k, v in data.items()})
    for f in fields(AgentConfig):
        env = os.environ.get(f"NFS_HA_{f.name.upper()}")
        if env is not None:
            values[f.name] = env
        cli = getattr(args, f.name, None)
        if cli is not None:
            values[f.name] = cli
    unknown = set(values) - {f.name for f in fields(AgentConfig)}
    if unknown:
        raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
    missing = [k for k in ("name", "etcd", "interface") if k not in values]
    if missing:
        raise ValueError(f"missing required settings: {missing} (options, NFS_HA_* or config file)")
    return AgentConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate()
