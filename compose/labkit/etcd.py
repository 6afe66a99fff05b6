"""The three-member etcd cluster: argv, start, health wait, leader lookup."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable

from .errors import LabError
from .nscmd import netns_exec
from .state import StateDir, write_pidfile
from .topology import ETCD_CLUSTER_TOKEN, ETCD_MEMBERS, Member, client_url, peer_url

ENDPOINTS = [client_url(m) for m in ETCD_MEMBERS.values()]
# Short per-attempt limits for polling loops: a miss costs little, a retry comes soon.
POLL_FLAGS = ["--dial-timeout=300ms", "--command-timeout=700ms"]
INITIAL_CLUSTER = ",".join(f"{m.name}={peer_url(m)}" for m in ETCD_MEMBERS.values())


def etcd_argv(member: Member, state: StateDir, heartbeat_ms: int, election_ms: int, new: bool) -> list[str]:
    return [
        "etcd",
        f"--name={member.name}",
        f"--data-dir={state.etcd_data(member.name)}",
        f"--listen-client-urls={client_url(member)}",
        f"--advertise-client-urls={client_url(member)}",
        f"--listen-peer-urls={peer_url(member)}",
        f"--initial-advertise-peer-urls={peer_url(member)}",
        f"--initial-cluster={INITIAL_CLUSTER}",
        f"--initial-cluster-state={'new' if new else 'existing'}",
        f"--initial-cluster-token={ETCD_CLUSTER_TOKEN}",
        # Short timings so a 1-2 s lease TTL is honoured (see shared/FACTS.md).
        f"--heartbeat-interval={heartbeat_ms}",
        f"--election-timeout={election_ms}",
    ]


def start_member(
    member: Member, state: StateDir, heartbeat_ms: int, election_ms: int, new: bool
) -> subprocess.Popen[bytes]:
    """Start one member detached in its namespace, log appended to its file, pid recorded."""
    state.etcd_data(member.name).parent.mkdir(parents=True, exist_ok=True)
    log_path = state.etcd_log(member.name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = netns_exec(member, etcd_argv(member, state, heartbeat_ms, election_ms, new))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    write_pidfile(state.etcd_pidfile(member.name), proc.pid)
    return proc


def restore_argv(member: Member, snapshot: str, data_dir: str) -> list[str]:
    """`etcdctl snapshot restore` (offline, API v3) of ``snapshot`` into a new data dir for
    ``member``, with the lab's cluster layout (a restore makes a new cluster: new IDs)."""
    return [
        "etcdctl", "snapshot", "restore", snapshot,
        f"--name={member.name}",
        f"--data-dir={data_dir}",
        f"--initial-cluster={INITIAL_CLUSTER}",
        f"--initial-cluster-token={ETCD_CLUSTER_TOKEN}",
        f"--initial-advertise-peer-urls={peer_url(member)}",
    ]


def etcdctl_argv(args: list[str], endpoints: list[str] | None = None) -> list[str]:
    return ["etcdctl", f"--endpoints={','.join(endpoints or ENDPOINTS)}", *args]


def log_tail(state: StateDir, lines: int = 15) -> str:
    parts = []
    for name in ETCD_MEMBERS:
        try:
            text = state.etcd_log(name).read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = ["(no log)"]
        parts.append(f"--- {name} log tail ---\n" + "\n".join(text))
    return "\n".join(parts)


def wait_healthy(
    etcdctl: Callable[[list[str]], subprocess.CompletedProcess[str]],
    state: StateDir,
    timeout: float,
    alive: Callable[[], bool],
) -> None:
    """Poll `endpoint health` until all members answer; LabError with log tails on timeout."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        proc = etcdctl([*POLL_FLAGS, "endpoint", "health"])
        if proc.returncode == 0:
            return
        last = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        if not alive():
            break
        time.sleep(0.05)
    raise LabError(f"etcd cluster not healthy within {timeout}s: {last}\n{log_tail(state)}")


def leader_index(status_json: str) -> int:
    """Index (1..3) of the leader from `etcdctl endpoint status -w json` output."""
    by_url = {client_url(m): i for i, m in enumerate(ETCD_MEMBERS.values(), start=1)}
    for entry in json.loads(status_json or "[]"):
        status = entry.get("Status", {})
        if status.get("leader") and status.get("header", {}).get("member_id") == status.get("leader"):
            return by_url[entry["Endpoint"]]
    raise LabError("no etcd member reports itself as leader")
