"""Property tests (hypothesis) for everything an operator types: specs, intents, node names, agent config.

What they hold, for any input hypothesis can come up with:
- parse_spec / parse_intent return or raise SpecError, never another exception;
- a spec refused after one field was changed names that field in its message;
- an accepted spec renders to a Ganesha config that parses back to exactly the validated values
  (clients, paths, pseudo paths, access, squash, grace, lease, VIP) and nothing else: no extra block,
  key or comment. The parser below models Ganesha 4.3's config lexer for bare tokens (measured against
  the real ganesha.nfsd: quoted clients or Bind_addr are refused; a CIDR prefix is 1 or 2 digits);
- agent config values give a usable AgentConfig or a ValueError, never another exception, never
  nan, inf or a negative duration.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.keyspace import NAME_RE, InvalidName, check_name
from controller.spec import MAX_SPEC_BYTES, SpecError, VfsSpec, parse_intent, parse_spec
from controller.spec_nfs import MOUNT_FLAGS, MOUNT_REFUSED, MOUNT_VALUES
from node.config import AgentConfig, _coerce
from node.fencing import FenceCommand
from node.ganesha import _quote, render_config
from node.kernel_nfsd import check_client, exportfs_target
from node.nfs_server import NfsInstance, NfsServerError

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
INJECTION = "fe80::1%x,*; Squash = No_Root_Squash; Access_Type = RW; }"
HOSTILE = ["", " ", "*", "@netgroup", "host.example.com", INJECTION, '"', "'", "\n", "\x00", "{", "}", ";", "#",
           "%", "..", ".", ".nfs-ha", "/.nfs-ha", "a b", "é", "\u202e", "-f", "--", "0", "-1", "1e9", "NaN"]

# --- strategies -----------------------------------------------------------------------------

hostile_text = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=40),
    st.builds(lambda c, n: c * n, st.sampled_from(["a", "é", "[", "/", "9", ","]), st.integers(0, 70_000)),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), hostile_text)
json_any = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=12), inner, max_size=4), max_leaves=12)
names = st.builds(lambda first, rest: first + rest, st.sampled_from("abz09"),
                  st.text(alphabet="abz09-", max_size=62))

# Random groups, some zero, so that '::' shows up in every position.
sparse_v6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 255)).map(
    lambda t: ipaddress.IPv6Address(t[0] & ~sum(0xFFFF << (16 * g) for g in range(8) if t[1] >> g & 1)))
v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
valid_clients = st.one_of(
    st.builds(lambda a, p: f"{a}/{p}", v4, st.integers(1, 32)),
    st.builds(lambda a, p: f"{a}/{p}", sparse_v6, st.integers(1, 99)),
    v4.map(str), sparse_v6.map(str),
)
clients = st.one_of(
    valid_clients,
    st.builds(lambda a, p: f"{a}/{p}", st.one_of(v4, sparse_v6), st.integers(-1, 130)),  # any prefix, even wrong
    st.builds(lambda a, s: f"{a}%{s}", sparse_v6, st.one_of(st.sampled_from(["x", "eth0", "1"]), hostile_text)),
    st.builds(lambda a: f"::ffff:{a}", v4),
    hostile_text, st.integers(), st.none(),
)
path_parts = st.one_of(st.sampled_from(["a", "data", "x.y", "+-_", ".nfs-ha", "..", ".", "", "a b", "é", "a" * 256]),
                       st.text(alphabet="abz._+-/ %\"", max_size=10))
paths = st.one_of(st.lists(path_parts, max_size=5).map(lambda parts: "/" + "/".join(parts)), hostile_text)
known_options = sorted({*MOUNT_REFUSED, *(o for flags in MOUNT_FLAGS.values() for o in flags),
                        *(f"{k}={v}" for values in MOUNT_VALUES.values() for k in values
                          for v in ("1", "0", "8", "64k", "300", "301", "ordered", "journal", "writeback",
                                    "remount-ro", "panic", "continue", "x"))})
options = st.one_of(st.lists(st.one_of(st.sampled_from(known_options), hostile_text), max_size=5).map(",".join),
                    hostile_text, st.integers())
seconds = st.one_of(st.integers(-5, 700), st.sampled_from([0, 1, 10, 600, 601]), st.floats(), st.booleans(),
                    hostile_text)
vips = st.one_of(
    st.builds(lambda a, p: f"{a}/{p}", st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address), st.integers(0, 33)),
    st.sampled_from(["10.77.0.100/24", "10.77.0.100/8", "10.77.0.100/32", "10.77.0.100/7", "fd00::1/64",
                     "10.77.0.100", "10.77.0.100/255.255.255.0"]),
    hostile_text, st.integers(),
)

BASE: dict[str, Any] = {
    "vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"], "lease_ttl": 5,
    "storage": {"device": "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4", "fstype": "xfs", "options": "noatime"},
    "exports": [{"path": "/", "pseudo": "/home", "access": "rw", "clients": ["10.77.0.0/24"], "squash": "root"},
                {"path": "/pub", "pseudo": "/pub", "access": "ro", "clients": ["fd00::/64"], "squash": "all"}],
    "nfs": {"backend": "ganesha", "grace_seconds": 10, "lease_seconds": 10},
}
# field -> (where it lives in BASE, values to try, what a refusal must mention)
FIELDS: dict[str, tuple[tuple[Any, ...], st.SearchStrategy[Any], str]] = {
    "vip": ((), vips, "vip"),
    "candidates": ((), st.one_of(st.lists(st.one_of(names, hostile_text), max_size=4), json_any), "candidate"),
    "lease_ttl": ((), seconds, "lease_ttl"),
    "storage": ((), json_any, "storage"),
    "exports": ((), json_any, "exports"),
    "nfs": ((), json_any, "nfs"),
    "device": (("storage",), st.one_of(st.sampled_from(["/dev/sdb", "/dev/../etc/passwd", "/dev/mapper/a-b"]),
                                       paths.map(lambda p: "/dev" + p if isinstance(p, str) else p)), "storage.device"),
    "fstype": (("storage",), st.one_of(st.sampled_from(["xfs", "ext4", "btrfs", "XFS"]), hostile_text),
               "storage.fstype"),
    "options": (("storage",), options, "storage.options"),
    "path": (("exports", 0), paths, "exports[0].path"),
    "pseudo": (("exports", 0), paths, "pseudo"),
    "clients": (("exports", 0), st.one_of(st.lists(clients, max_size=4), clients), "exports[0].clients"),
    "access": (("exports", 0), st.one_of(st.sampled_from(["rw", "ro", "none", "RW", "all"]), hostile_text),
               "exports[0].access"),
    "squash": (("exports", 0), st.one_of(st.sampled_from(["root", "all", "none", "no_root_squash"]), hostile_text),
               "exports[0].squash"),
    "backend": (("nfs",), st.one_of(st.sampled_from(["ganesha", "kernel", "samba"]), hostile_text), "nfs.backend"),
    "grace_seconds": (("nfs",), seconds, "nfs.grace_seconds"),
    "lease_seconds": (("nfs",), seconds, "nfs.lease_seconds"),
}


def with_field(field: str, value: Any) -> str:
    data = json.loads(json.dumps(BASE))
    where, _, _ = FIELDS[field]
    target = data
    for step in where:
        target = target[step]
    target[field] = value
    return json.dumps(data)


# --- a Ganesha config parser (blocks, key = value[, value]; quoted strings, bare tokens) ----

TOKEN_RE = re.compile(r'(?P<space>\s+)|(?P<comment>#[^\n]*)|(?P<quoted>"[^"\\\n]*")|(?P<punct>[{};=,])'
                      r'|(?P<bare>[^\s{};=,"#]+)')
# Ganesha 4.3's lexer for the bare terms we write (src/config_parsing/conf_lex.l; prefixes as measured).
_H16 = r"[0-9A-Fa-f]{1,4}"
_V4 = r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}"
_LS32 = rf"(?:{_H16}:{_H16}|{_V4})"
_V6 = "|".join([rf"(?:{_H16}:){{6}}{_LS32}", rf"::(?:{_H16}:){{5}}{_LS32}", rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
                rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
                rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
                rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}", rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
                rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}", rf"(?:(?:{_H16}:){{0,6}}{_H16})?::"])
GANESHA_CLIENT_RE = re.compile(rf"(?:{_V4}|{_V6})(?:/[1-9][0-9]?)?")
GANESHA_BARE_RE = re.compile(rf"(?:0|[1-9][0-9]*)|[A-Za-z_][A-Za-z0-9._-]*|{GANESHA_CLIENT_RE.pattern}")

Node = tuple[Any, ...]  # ("key", name, [values]) | ("block", name, [nodes]); a value is ("q"|"w", text)


def parse_ganesha(text: str) -> list[Node]:
    tokens = []
    for m in TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if kind in ("space", "comment"):
            continue
        tokens.append((kind, m.group()))
    assert "".join(m.group() for m in TOKEN_RE.finditer(text)) == text, "characters the tokenizer cannot read"
    pos = 0

    def take(kind: str, value: str | None = None) -> str:
        nonlocal pos
        assert pos < len(tokens), f"config ends early, wanted {kind} {value}"
        got_kind, got = tokens[pos]
        assert got_kind == kind and (value is None or got == value), f"wanted {kind} {value}, got {got!r} at {pos}"
        pos += 1
        return got

    def body() -> list[Node]:
        nodes: list[Node] = []
        while tokens[pos] != ("punct", "}"):
            name = take("bare")
            if tokens[pos] == ("punct", "{"):
                take("punct", "{")
                nodes.append(("block", name, body()))
                take("punct", "}")
                continue
            take("punct", "=")
            values = [value()]
            while tokens[pos] == ("punct", ","):
                take("punct", ",")
                values.append(value())
            take("punct", ";")
            nodes.append(("key", name, values))
        return nodes

    def value() -> tuple[str, str]:
        kind, text = tokens[pos]
        if kind == "quoted":
            take("quoted")
            return ("q", text[1:-1])
        take("bare")
        assert GANESHA_BARE_RE.fullmatch(text), f"Ganesha would not read {text!r} as one term"
        return ("w", text)

    top: list[Node] = []
    while pos < len(tokens):
        name = take("bare")
        take("punct", "{")
        top.append(("block", name, body()))
        take("punct", "}")
    return top


def expected_config(inst: NfsInstance) -> list[Node]:
    """What the config of `inst` must say, straight from the validated values."""
    def key(name: str, *values: tuple[str, str]) -> Node:
        return ("key", name, list(values))

    def w(text: object) -> tuple[str, str]:
        return ("w", str(text))

    def q(text: object) -> tuple[str, str]:
        return ("q", str(text))

    squash = {"root": "Root_Squash", "all": "All_Squash", "none": "No_Root_Squash"}
    access = {"rw": "RW", "ro": "RO"}
    config: list[Node] = [
        ("block", "NFS_CORE_PARAM", [key("Protocols", w(4)), key("Enable_NLM", w("false")),
                                     key("Enable_RQUOTA", w("false")), key("Enable_UDP", w("false")),
                                     key("Bind_addr", w(inst.vip)), key("NFS_Port", w(2049)),
                                     key("Dbus_Name_Prefix", q("nfsha_" + inst.vfs.replace("-", "_")))]),
        ("block", "NFSV4", [key("RecoveryBackend", w("fs")),
                            key("RecoveryRoot", q(inst.mountpoint / ".nfs-ha" / "nfs-recovery")),
                            key("Grace_Period", w(max(inst.grace_seconds, 1))),
                            key("Lease_Lifetime", w(inst.lease_seconds)),
                            key("Graceless", w("true" if inst.grace_seconds == 0 else "false"))]),
        ("block", "NFS_KRB5", [key("Active_krb5", w("false"))]),
    ]
    for i, export in enumerate(inst.exports, start=1):
        path = inst.mountpoint.joinpath(*export.path.split("/")[1:]) if export.path != "/" else inst.mountpoint
        block = [key("Export_Id", w(i)), key("Path", q(path)), key("Pseudo", q(export.pseudo)),
                 key("Access_Type", w("None")), key("Squash", w(squash[export.squash])), key("Protocols", w(4)),
                 key("Transports", w("TCP")), key("SecType", w("sys")), ("block", "FSAL", [key("Name", w("VFS"))])]
        if export.access != "none":
            block.append(("block", "CLIENT", [key("Clients", *(w(c) for c in export.clients)),
                                              key("Access_Type", w(access[export.access]))]))
        config.append(("block", "EXPORT", block))
    return config


def normalise_clients(nodes: list[Node]) -> list[Node]:
    """Client terms as networks ("fd00::1" -> "fd00::1/128"), so they compare with the spec's."""
    out: list[Node] = []
    for node in nodes:
        if node[0] == "block":
            out.append(("block", node[1], normalise_clients(node[2])))
        elif node[1] == "Clients":
            for kind, text in node[2]:
                assert kind == "w" and GANESHA_CLIENT_RE.fullmatch(text), f"client term {text!r}"
            out.append(("key", "Clients", [("w", ipaddress.ip_network(t).with_prefixlen) for _, t in node[2]]))
        else:
            out.append(node)
    return out


def assert_renders_exactly(spec: VfsSpec, epoch: int = 7) -> None:
    assert spec.storage is not None and spec.nfs is not None
    inst = NfsInstance(vfs=spec.name, vip=spec.vip_address, mountpoint=Path("/run/nfs-ha/node-a/mnt") / spec.name,
                       workdir=Path("/run/nfs-ha/node-a/ganesha") / spec.name, exports=spec.exports,
                       grace_seconds=spec.nfs.grace_seconds, lease_seconds=spec.nfs.lease_seconds, epoch=epoch)
    for export in spec.exports:  # what exportfs would get (kernel backend) is a plain CIDR too
        for client in export.clients:
            assert check_client(client) == client
            target = exportfs_target(client, "/m/" + spec.name)
            net, _, _ = target.rpartition(":/m/")
            assert ipaddress.ip_network(net.replace("[", "").replace("]", "")).with_prefixlen == client
    if spec.nfs.backend != "ganesha":
        return
    conf = render_config(inst)
    assert conf.count("#") == 1 and conf.startswith(f"# generated by nfs-ha for VFS {spec.name} (epoch {epoch});")
    assert normalise_clients(parse_ganesha(conf)) == expected_config(inst)


# --- the properties -------------------------------------------------------------------------


def test_the_parser_reads_a_known_config_and_rejects_an_injected_one(tmp_path):
    spec = parse_spec("home", json.dumps(BASE))
    assert_renders_exactly(spec)  # the parser accepts what the renderer writes ...
    conf = render_config(NfsInstance("home", "10.77.0.100", tmp_path, tmp_path, spec.exports, 10, 10, 1))
    injected = conf.replace("10.77.0.0/24;", "fe80::1%x,*; Squash = No_Root_Squash;", 1)
    with pytest.raises(AssertionError):  # ... and is strict enough to notice the injection
        assert normalise_clients(parse_ganesha(injected)) == normalise_clients(parse_ganesha(conf))


@SETTINGS
@given(raw=st.one_of(json_any.map(json.dumps), hostile_text, st.binary(max_size=200),
                     st.integers(1, 20_000).map(lambda n: "[" * n), st.integers(1, 5_000).map(lambda n: '{"a":' * n)))
def test_parse_spec_raises_only_spec_error(raw):
    try:
        spec = parse_spec("home", raw)
    except SpecError as exc:
        assert 0 < len(str(exc)) < 600
        return
    assert isinstance(spec, VfsSpec)


@SETTINGS
@given(data=st.data(), field=st.sampled_from(sorted(FIELDS)))
def test_one_changed_field_is_accepted_exactly_or_refused_by_name(data, field):
    value = data.draw(FIELDS[field][1], label=field)
    raw = with_field(field, value)
    try:
        spec = parse_spec("home", raw)
    except SpecError as exc:
        if len(raw.encode(errors="replace")) > MAX_SPEC_BYTES:
            assert "at most" in str(exc)  # refused before it is parsed: no field to name yet
        else:
            assert FIELDS[field][2] in str(exc), f"{field}={repr(value)[:200]}: {exc}"
        return
    assert len(raw.encode()) <= MAX_SPEC_BYTES
    assert_renders_exactly(spec)


@settings(SETTINGS, max_examples=120)  # the most expensive examples to draw; keeps this test under a second
@given(name=names, vip=st.builds(lambda a, p: f"10.{a >> 8}.{a & 255}.1/{p}", st.integers(0, 2**16 - 1),
                                 st.integers(8, 30)),
       candidates=st.lists(names, min_size=1, max_size=4, unique=True),
       exports=st.lists(st.fixed_dictionaries({
           "path": st.lists(st.sampled_from(["a", "b.c", "d_e", "f+g", "-h"]), max_size=3).map(
               lambda p: "/" + "/".join(p)),
           "pseudo": st.lists(st.sampled_from(["x", "y.z", "w_1"]), min_size=1, max_size=3).map(
               lambda p: "/" + "/".join(p)),
           "access": st.sampled_from(["rw", "ro", "none"]),
           "squash": st.sampled_from(["root", "all", "none"]),
           "clients": st.lists(valid_clients, min_size=1, max_size=4)}), min_size=1, max_size=3),
       fstype=st.sampled_from(["xfs", "ext4"]),
       opts=st.lists(st.sampled_from(known_options), max_size=4, unique=True),
       lease=st.integers(1, 600), grace=st.integers(0, 600), backend=st.sampled_from(["ganesha", "kernel"]))
def test_valid_looking_specs_render_to_exactly_their_values(name, vip, candidates, exports, fstype, opts, lease,
                                                           grace, backend):
    raw = json.dumps({"vip": vip, "candidates": candidates, "exports": exports,
                      "storage": {"device": "/dev/vdb", "fstype": fstype, "options": ",".join(opts)},
                      "nfs": {"backend": backend, "grace_seconds": grace, "lease_seconds": lease}})
    try:
        spec = parse_spec(name, raw)
    except SpecError as exc:
        # Only what the generator lets through on purpose: options outside an fstype's list, grace < lease,
        # a pseudo path twice, host bits in a VIP's prefix.
        assert re.search(r"storage\.options|nfs\.grace_seconds|pseudo|vip", str(exc)), str(exc)
        return
    assert spec.nfs.grace_seconds == 0 or spec.nfs.grace_seconds >= spec.nfs.lease_seconds
    assert not {"nobarrier", "barrier=0", "errors=continue", "ro", "data=writeback"} & set(spec.storage.options)
    assert all(".nfs-ha" not in e.path.split("/") and ".nfs-ha" not in e.pseudo.split("/") for e in spec.exports)
    assert_renders_exactly(spec)


@SETTINGS
@given(raw=st.one_of(st.binary(max_size=300), hostile_text, st.sampled_from(["node-a", "node-b\n", " node-c "]),
                     names.map(lambda n: f"  {n}\n"), st.integers(), st.none()))
def test_parse_intent_names_a_candidate_or_raises_spec_error(raw):
    spec = parse_spec("home", json.dumps(BASE))
    try:
        node = parse_intent(raw, spec)
    except SpecError:
        return
    text = raw.decode() if isinstance(raw, bytes) else raw
    assert node in spec.candidates and node == text.strip()


@SETTINGS
@given(node=st.one_of(names, hostile_text), template=st.lists(st.text(max_size=20).filter(lambda a: "\0" not in a),
                                                               max_size=4))
def test_the_fence_command_gets_a_valid_node_name_in_place_of_the_placeholder_only(node, template):
    command = FenceCommand(("/nonexistent/nfs-ha-test-fence", *template, "{node}"), timeout=1.0)
    if not NAME_RE.match(node):
        with pytest.raises(InvalidName):
            command(node)
        return
    result = command(node)  # the binary does not exist: nothing runs, the argv is reported
    assert not result.ok and len(result.argv) == len(template) + 2 and result.argv[-1] == node
    assert result.argv[1:-1] == tuple(a.replace("{node}", node) for a in template)
    assert check_name(node) == node


CONFIG_FIELDS = [f.name for f in dataclasses.fields(AgentConfig) if f.name not in ("name", "etcd", "interface")]
config_values = st.one_of(st.floats(), st.integers(-(2**40), 2**40), st.booleans(), hostile_text,
                          st.sampled_from(["nan", "inf", "-inf", "-1", "0", "0.0", "1e400", "5", "60", "3600.5"]),
                          st.lists(st.text(max_size=5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                     st.integers(), max_size=2))


@SETTINGS
@given(field=st.sampled_from([*CONFIG_FIELDS, "name", "etcd", "interface"]), value=config_values,
       coerce=st.booleans())
def test_agent_config_values_are_usable_or_a_value_error(field, value, coerce):
    values = {"name": "node-a", "etcd": "http://127.0.0.1:2379", "interface": "eth0"}
    try:
        values[field] = _coerce(field, value) if coerce else value
        cfg = AgentConfig(**values).validate()
    except ValueError:
        return
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float | int) and not isinstance(v, bool):
            assert math.isfinite(v) and v >= 0, (f.name, v)
    assert cfg.fence_timeout > 0 and cfg.rank_delay <= 60
    # The state dir reaches Ganesha configs: whatever validates must be quotable there.
    assert _quote(str(Path(cfg.state_dir) / "node-a" / "mnt" / "home" / ".nfs-ha" / "nfs-recovery"))


@pytest.mark.parametrize("field, value", [
    ("rank_delay", float("nan")), ("rank_delay", float("inf")), ("rank_delay", -0.5), ("rank_delay", 61.0),
    ("fence_timeout", float("nan")), ("fence_timeout", -1.0), ("fence_timeout", 0.0), ("fence_timeout", float("inf")),
    ("lease_ttl", True), ("lease_ttl", 0), ("interface", "eth0/x"), ("interface", ".."), ("interface", "a" * 16),
    ("interface", "-x"), ("state_dir", "relative"), ("state_dir", "/a b"), ("state_dir", "/a/../b"),
    ("log_level", "LOUD"), ("fence_command", ("/bin/x", "a\0b")), ("watchdog", "/dev/watchdog\0"),
])
def test_agent_config_refuses(field, value):
    values = {"name": "node-a", "etcd": "http://127.0.0.1:2379", "interface": "eth0", field: value}
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "lease_ttl" else "lease"):
        AgentConfig(**values).validate()


@pytest.mark.parametrize("field, text", [("rank_delay", "nan"), ("rank_delay", "-1"), ("fence_timeout", "-5"),
                                         ("fence_timeout", "inf"), ("fence_timeout", "0")])
def test_agent_cli_refuses_odd_numbers(field, text):
    from node.config import load
    with pytest.raises(ValueError, match=field):
        load(["--name", "node-a", "--etcd", "http://127.0.0.1:2379", "--interface", "eth0",
              "--" + field.replace("_", "-"), text])


def test_the_ganesha_renderer_refuses_an_instance_the_parser_never_made():
    spec = parse_spec("home", json.dumps(BASE))
    inst = NfsInstance("home", "10.77.0.100", Path("/m"), Path("/w"), spec.exports, 10, 10, 1)
    bad = dataclasses.replace(spec.exports[0], clients=(INJECTION,))
    with pytest.raises(NfsServerError):
        render_config(dataclasses.replace(inst, exports=(bad,)))
