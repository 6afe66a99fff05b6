"""Agent configuration: command line over NFS_HA_* environment over a TOML file over defaults.

Every value is checked for type and range (`AgentConfig.validate`): a bad one is a ValueError naming
the field, never another exception; durations are finite and not negative; nothing with a NUL byte
reaches a path or an argv. The etcd settings (TLS files, user, password) are checked as
controller/etcdaccess.py says, files included.

The config file may hold a password and names commands run as root (fence_command, reset_command):
it is refused, as ssh refuses such files, when others may read it or anyone but its owner may
write it, or when it belongs to someone but root and this user. The password has no command-line
option (argv is visible to every user): it comes from the file, NFS_HA_ETCD_PASSWORD or
etcd_password_file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from controller.etcdaccess import EtcdAccess, check_private
from controller.keyspace import DEFAULT_PREFIX, InvalidName, check_name, normalize_prefix
from controller.policy import NodePolicy
from controller.span_file import DEFAULT_SPAN_FILE
from controller.spec import MAX_LEASE_TTL, MIN_LEASE_TTL
from node.logsetup import FORMATS
from node.observe import parse_address


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
    log_format: str = "text"  # or "json": one object per line (node/logsetup.py), the guard's too
    # Trace spans appended here (OTLP/JSON lines, rotated at 32 MiB) for `nfs-ha timeline`; "off": none.
    span_file: str = DEFAULT_SPAN_FILE
    fence_command: tuple[str, ...] = ()  # argv run before taking over from a lost node; {node} = its name
    fence_required: bool = False  # a failing fence command blocks the takeover
    fence_timeout: float = 60.0
    watchdog: str = ""  # hardware watchdog device (e.g. /dev/watchdog), armed while VFS are held
    # T_release: a fenced node has unmounted its shared disks or been reset within this many seconds
    # after its lease could expire; a new owner of a lost node's VFS waits this long before mounting.
    release_bound: float = 10.0
    reset_command: tuple[str, ...] = ()  # argv the fence guard runs as its last escalation (power cycle)
    # Takeovers this agent runs at once (0: 8 per CPU). Most of a VIP takeover is waiting for the ARP
    # probe, but an unbounded storm of them starves the keepalives (controller/gate.py TakeoverGate);
    # 16 per CPU already did on the loaded 2-core lab (bench/scale).
    parallel_takeovers: int = 0
    # etcd TLS and authentication (controller/etcdaccess.py): https:// endpoints with a CA file (the
    # system's CAs without one), a client certificate and key, and/or an etcd user and password.
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_user: str = ""
    etcd_password: str = field(default="", repr=False)  # config file or NFS_HA_ETCD_PASSWORD only
    etcd_password_file: str = ""
    # Node policy (controller/policy.py): what this node serves whatever a spec asks.
    allowed_devices: tuple[str, ...] = ()  # fnmatch patterns of storage.device; empty: any under /dev/
    allowed_client_networks: tuple[str, ...] = ()  # export clients must lie inside these; empty: any
    nfs_backends: tuple[str, ...] = ("ganesha",)  # add "kernel" to allow the kernel nfsd backend
    # /metrics, /healthz, /readyz (node/observe.py): HOST:PORT, or off. Not on the client-facing address.
    metrics_address: str = "127.0.0.1:9640"

    def node_policy(self) -> NodePolicy:
        return NodePolicy.from_settings(self.allowed_devices, self.allowed_client_networks, self.nfs_backends)

    def etcd_access(self) -> EtcdAccess:
        """How to reach etcd; ValueError naming the setting if it cannot be used."""
        return EtcdAccess.from_settings(self.etcd, ca=self.etcd_ca, cert=self.etcd_cert, key=self.etcd_key,
                                        user=self.etcd_user, password=self.etcd_password,
                                        password_file=self.etcd_password_file)

    def takeover_limit(self) -> int:
        # The CPUs this process may run on (a container's cgroup cpuset), not the host's.
        return self.parallel_takeovers or 8 * max(1, len(os.sched_getaffinity(0)))

    def validate(self) -> AgentConfig:
        """This config, if every field is usable; ValueError naming the field otherwise (never another error)."""
        _check_types(self)
        try:
            check_name(self.name, "node name")
        except InvalidName as exc:
            raise ValueError(str(exc)) from None
        self.etcd_access()
        self.node_policy()
        if self.metrics_address != "off":
            parse_address(self.metrics_address)
        if not INTERFACE_RE.fullmatch(self.interface) or self.interface in (".", ".."):
            raise ValueError(f"invalid interface name {self.interface!r}: at most 15 of A-Z a-z 0-9 _ . @ -, "
                             "starting with a letter, digit or _")
        if not MIN_LEASE_TTL <= self.lease_ttl <= MAX_LEASE_TTL:
            raise ValueError(f"lease TTL must be {MIN_LEASE_TTL}..{MAX_LEASE_TTL} s")
        _check_seconds("rank_delay", self.rank_delay, 0.0, MAX_RANK_DELAY, zero_ok=True)
        if not 0 <= self.parallel_takeovers <= MAX_PARALLEL_TAKEOVERS:
            raise ValueError(f"parallel_takeovers must be 0 (automatic) to {MAX_PARALLEL_TAKEOVERS}, "
                             f"got {self.parallel_takeovers!r}")
        _check_seconds("fence_timeout", self.fence_timeout, 0.0, MAX_FENCE_TIMEOUT, zero_ok=False)
        if not STATE_DIR_RE.fullmatch(self.state_dir) or "/../" in self.state_dir + "/" \
                or "/./" in self.state_dir + "/":
            # It ends up in Ganesha configs and in argv (mount points, the guard): plain paths only.
            raise ValueError(f"state_dir must be an absolute path of A-Z a-z 0-9 . _ + - / (no '.' or '..' "
                             f"parts), got {self.state_dir!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")
        if self.log_format not in FORMATS:
            raise ValueError(f"log_format must be one of {list(FORMATS)}, got {self.log_format!r}")
        normalize_prefix(self.prefix)
        if self.fence_command and not self.fence_command[0].startswith("/"):
            raise ValueError("fence_command must start with an absolute path (it never runs through a shell)")
        if self.fence_required and not self.fence_command:
            raise ValueError("fence_required needs a fence_command")
        if self.watchdog and not self.watchdog.startswith("/"):
            raise ValueError("watchdog must be an absolute device path, e.g. /dev/watchdog")
        if self.reset_command and not self.reset_command[0].startswith("/"):
            raise ValueError("reset_command must start with an absolute path (it never runs through a shell)")
        if self.span_file != "off" and not self.span_file.startswith("/"):
            raise ValueError(f"span_file must be an absolute path or off, got {self.span_file!r}")
        check_release_bound(self.release_bound)
        return self

    @property
    def node_state_dir(self) -> Path:
        return Path(self.state_dir) / self.name


MAX_RANK_DELAY = 60.0
MAX_FENCE_TIMEOUT = 3600.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
INTERFACE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,14}")  # Linux: < 16 bytes, no '/', ':' or blanks
STATE_DIR_RE = re.compile(r"/[A-Za-z0-9._+/-]{0,511}")
_TYPE_CHECKS: dict[str, Any] = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "tuple[str, ...]": lambda v: isinstance(v, tuple) and all(isinstance(i, str) for i in v),
}


def _check_types(cfg: AgentConfig) -> None:
    # Wrong types (a TOML table where a number belongs, a config built in code) must give a
    # ValueError here, not a TypeError in some comparison below; no NUL can reach a path or argv.
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        check = _TYPE_CHECKS.get(str(f.type))
        if check is not None and not check(value):
            raise ValueError(f"{f.name} must be of type {f.type}, got {type(value).__name__}")
        texts = value if isinstance(value, tuple) else (value,)
        if any(isinstance(t, str) and "\0" in t for t in texts):
            raise ValueError(f"{f.name} must not contain a NUL character")


def _check_seconds(name: str, value: float, low: float, high: float, zero_ok: bool) -> None:
    if not math.isfinite(value) or not low <= value <= high or (value == 0 and not zero_ok):
        bound = f"{low:g}" if zero_ok else f"more than {low:g}"
        raise ValueError(f"{name} must be a finite number of seconds from {bound} to {high:g}, got {value!r}")


MAX_PARALLEL_TAKEOVERS = 1024
MIN_RELEASE_BOUND = 2.0
MAX_RELEASE_BOUND = 600.0


def check_release_bound(release_bound: float) -> None:
    """T_release against the other timings (docs/safety.md, "The disk bound").

    The guard starts fencing at the agent's deadline + margin/2 and escalates to a reset at
    fence start + T_release/2, leaving the reset T_release/2 (+ margin/2) before a new owner may
    mount. Killing Ganesha and unmounting take about a second, so T_release/2 must be at least 1 s.
    It does not depend on the lease TTL: the new owner counts T_release from the moment it saw
    the lease expire, which is after the old owner's deadline + margin whatever the TTL."""
    if not isinstance(release_bound, int | float) or isinstance(release_bound, bool) \
            or not math.isfinite(release_bound) or not MIN_RELEASE_BOUND <= release_bound <= MAX_RELEASE_BOUND:
        raise ValueError(f"release_bound must be {MIN_RELEASE_BOUND:g}..{MAX_RELEASE_BOUND:g} seconds "
                         f"(time to kill the NFS server and unmount, or reset), got {release_bound!r}")


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(AgentConfig)}[name]
    if kind in ("int", "float"):
        # No bools (TOML `true` is not 1), no silently truncated fractions; only ValueError escapes.
        if isinstance(value, bool) or not isinstance(value, int | float | str) or \
                (kind == "int" and isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        try:
            return int(value) if kind == "int" else float(value)
        except (ValueError, OverflowError):
            raise ValueError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, "
                             f"got {value!r}") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if kind == "tuple[str, ...]":
        try:
            items = json.loads(value) if isinstance(value, str) else value
        except RecursionError:
            raise ValueError(f"{name} is nested too deeply") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} must be a JSON list of strings, e.g. '[\"/usr/sbin/x\", \"{{node}}\"]': "
                             f"{exc.msg} at character {exc.pos}") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{name} must be a list of strings (JSON on the command line or in NFS_HA_*)")
        return tuple(items)
    return str(value)


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> AgentConfig:
    return load_with_options(argv, environ)[0]


def load_with_options(argv: list[str] | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[AgentConfig, argparse.Namespace]:
    """The configuration, and the options that are no setting (--check-config). `environ`: the
    NFS_HA_* variables to use (default os.environ)."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(prog="nfs-ha-agent", description="nfs-ha node agent")
    parser.add_argument("--config", help="TOML file with the same keys as the long options (underscores)")
    parser.add_argument("--check-config", action="store_true",
                        help="check the configuration (and the files and commands it names), print it, and exit: "
                        "0 if usable, 2 with the reason otherwise")
    parser.add_argument("--name", help="this node's name")
    parser.add_argument("--etcd", help="comma-separated etcd endpoints, http://HOST:PORT or https://HOST:PORT")
    parser.add_argument("--etcd-ca", help="PEM file of the CA(s) that signed etcd's certificate (https endpoints)")
    parser.add_argument("--etcd-cert", help="PEM client certificate for etcd (etcd --client-cert-auth)")
    parser.add_argument("--etcd-key", help="PEM key of --etcd-cert (must not be readable by group or others)")
    parser.add_argument("--etcd-user", help="etcd user name (etcd auth); the password: etcd_password_file, "
                        "NFS_HA_ETCD_PASSWORD or etcd_password in the config file")
    parser.add_argument("--etcd-password-file", help="file holding the etcd password (mode 0600)")
    parser.add_argument("--interface", help="interface that carries the VIPs")
    parser.add_argument("--lease-ttl", type=int, help="default per-VFS lease TTL in seconds (default 5)")
    parser.add_argument("--prefix", help=f"etcd key prefix (default {DEFAULT_PREFIX})")
    parser.add_argument("--rank-delay", type=float, help="seconds a lower-ranked candidate waits per rank")
    parser.add_argument("--state-dir", help="local state directory (default /run/nfs-ha)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (the fence guard's too, at start)")
    parser.add_argument("--log-format", help="text (default) or json: one JSON object per line, the guard's too")
    parser.add_argument("--span-file", help=f"append trace spans to this file (OTLP/JSON lines, rotated; default "
                        f"{DEFAULT_SPAN_FILE}; off: none)")
    parser.add_argument("--fence-command", help='JSON argv run before taking over from a lost node, '
                        'e.g. \'["/usr/local/bin/power-off", "{node}"]\'')
    parser.add_argument("--fence-required", default=None, action="store_const", const="true",
                        help="block a takeover when the fence command fails")
    parser.add_argument("--fence-timeout", type=float, help="seconds the fence command may take (default 60)")
    parser.add_argument("--release-bound", type=float,
                        help="seconds within which a fenced node has unmounted its disks or been reset (T_release, "
                        "default 10); a new owner of a lost node's VFS waits this long before mounting")
    parser.add_argument("--reset-command", help='JSON argv the fence guard runs when a disk cannot be released '
                        'in time, e.g. \'["/usr/local/sbin/nfs-ha-sysrq-reboot"]\'')
    parser.add_argument("--parallel-takeovers", type=int,
                        help="takeovers run at once (default 0: 8 per CPU)")
    parser.add_argument("--allowed-devices", help='JSON list of device patterns specs may name, e.g. '
                        '\'["/dev/disk/by-id/*"]\' (default: any under /dev/)')
    parser.add_argument("--allowed-client-networks", help='JSON list of networks export clients must lie in, '
                        'e.g. \'["10.0.0.0/16"]\' (default: any)')
    parser.add_argument("--nfs-backends", help='JSON list of NFS backends this node runs (default \'["ganesha"]\'; '
                        'add "kernel" for the kernel nfsd)')
    parser.add_argument("--metrics-address", help="HOST:PORT of /metrics, /healthz and /readyz (default "
                        "127.0.0.1:9640; off: none)")
    parser.add_argument("--watchdog", help="hardware watchdog device (e.g. /dev/watchdog), armed while this "
                        "node holds a VFS; see docs/safety.md")
    args = parser.parse_args(argv)

    values: dict[str, Any] = {}
    config_file = args.config or environ.get("NFS_HA_CONFIG")
    if config_file:
        check_private("config file", config_file, forbidden=0o026,
                      why="it may hold a password and names commands run as root")
        with open(config_file, "rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"config file {config_file}: not valid TOML: {exc}") from None
        if "etcd_password" in data or "etcd-password" in data:
            check_private("config file", config_file, why="it holds etcd_password")
        values.update({k.replace("-", "_"): v for k, v in data.items()})
    for f in fields(AgentConfig):
        env = environ.get(f"NFS_HA_{f.name.upper()}")
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
    return AgentConfig(**{k: _coerce(k, v) for k, v in values.items()}).validate(), args


def check_environment(cfg: AgentConfig) -> list[str]:
    """What --check-config finds wrong on this machine beyond the values: commands that cannot run,
    a watchdog device that is missing."""
    problems = []
    for name, argv in (("fence_command", cfg.fence_command), ("reset_command", cfg.reset_command)):
        if argv and not (os.path.isfile(argv[0]) and os.access(argv[0], os.X_OK)):
            problems.append(f"{name}: {argv[0]} is not an executable file")
    if cfg.watchdog and not os.path.exists(cfg.watchdog):
        problems.append(f"watchdog: {cfg.watchdog} does not exist")
    return problems


def describe(cfg: AgentConfig) -> str:
    """The effective configuration, for --check-config (the password shown only as set or not)."""
    lines = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "etcd_password":
            value = "(set)" if value else ""
        lines.append(f"{f.name} = {json.dumps(list(value) if isinstance(value, tuple) else value)}")
    return "\n".join(lines)
