"""etcd over TLS with client certificates, passwords and the least-privilege roles of docs/operations.md.

A second three-member etcd runs in the lab's etcd namespaces (ports 2479/2480, beside the plain one)
with TLS, --client-cert-auth and auth enabled; certificates are made at test time. Agents in the
node namespaces hold and move a VIP through it as users with the agent role, `nfs-ha status` reads
it as a user with the reader role, and each role is refused what it must not do. A wrong CA, an
expired certificate and a wrong password each stop the agent with exit code 2 and the reason, and
it holds nothing.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from labkit import procs
from labkit.cluster import LabCluster, wait_for
from labkit.lab import Lab
from labkit.tlscerts import CA, Issued
from labkit.topology import ETCD_MEMBERS

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/nfs-ha-secure"
CLIENT_PORT, PEER_PORT = 2479, 2480
PASSWORDS = {"node-a": "pw-a", "node-b": "pw-b", "node-c": "pw-c", "alice": "pw-alice", "monitor": "pw-mon",
             "root": "pw-root"}
ROLES = {"node-a": "nfs-ha-agent", "node-b": "nfs-ha-agent", "node-c": "nfs-ha-agent", "alice": "nfs-ha-operator",
         "monitor": "nfs-ha-reader", "root": "root"}


def documented_rbac(prefix: str) -> list[list[str]]:
    """The etcdctl commands of docs/operations.md's `etcd-rbac` block, for `prefix`."""
    text = (REPO / "docs" / "operations.md").read_text()
    block = re.search(r"```sh etcd-rbac\n(.*?)```", text, re.S)
    assert block, "docs/operations.md lost its etcd-rbac block"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert lines and all(line.startswith("etcdctl ") for line in lines)
    return [shlex.split(line.replace("PREFIX", prefix))[1:] for line in lines]


@dataclass
class SecureEtcd:
    lab: Lab
    dir: Path
    ca: CA
    other: CA
    root: Issued
    certs: dict[str, Issued]

    @property
    def endpoints(self) -> str:
        return ",".join(f"https://{m.ip}:{CLIENT_PORT}" for m in ETCD_MEMBERS.values())

    def ctl(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """etcdctl from the client namespace with root's certificate (and `user`'s password if given)."""
        flags = [f"--cacert={self.ca.cert}", f"--cert={self.root.cert}", f"--key={self.root.key}",
                 "--dial-timeout=2s", "--command-timeout=5s"]
        if user:
            flags.append(f"--user={user}:{PASSWORDS[user]}")
        return self.lab.etcdctl(*flags, *args, check=check, endpoints=self.endpoints.split(","))

    def password_file(self, user: str, password: str | None = None) -> Path:
        path = self.dir / f"{user}-{password or 'ok'}.pw"
        path.write_text((password or PASSWORDS[user]) + "\n")
        path.chmod(0o600)
        return path

    def agent_config(self, node: str, ca: Path | None = None, cert: Issued | None = None,
                     password: str | None = None) -> Path:
        cert = cert or self.certs[node]
        path = self.dir / f"agent-{node}-{time.monotonic_ns()}.toml"
        path.write_text(f'etcd = "{self.endpoints}"\netcd_ca = "{ca or self.ca.cert}"\n'
                        f'etcd_cert = "{cert.cert}"\netcd_key = "{cert.key}"\netcd_user = "{node}"\n'
                        f'etcd_password_file = "{self.password_file(node, password)}"\n')
        path.chmod(0o600)
        return path

    def use(self, cluster: LabCluster, reader: str = "monitor", writer: str = "alice") -> None:
        """Point the cluster's agents (each with its own config), CLI and etcdctl at this etcd."""
        cluster.prefix = PREFIX
        # --etcd too: the lab's plain endpoints are on the command line, which wins over the file.
        cluster.agent_args = lambda node: ["--config", str(self.agent_config(node)), "--etcd", self.endpoints]
        reader_cert = self.certs[reader]
        cluster.cli_etcd = ["--etcd", self.endpoints, "--etcd-ca", str(self.ca.cert), "--etcd-cert",
                            str(reader_cert.cert), "--etcd-key", str(reader_cert.key), "--etcd-user", reader,
                            "--etcd-password-file", str(self.password_file(reader))]
        cluster.etcdctl_flags = [f"--cacert={self.ca.cert}", f"--cert={self.root.cert}", f"--key={self.root.key}",
                                 f"--user={writer}:{PASSWORDS[writer]}"]
        cluster.etcdctl_endpoints = self.endpoints.split(",")


@pytest.fixture(scope="module")
def secure(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureEtcd]:
    base = tmp_path_factory.mktemp("secure-etcd")
    ca, other = CA(base / "pki"), CA(base / "other", name="someone else's CA")
    ips = tuple(m.ip for m in ETCD_MEMBERS.values())
    server = ca.issue("server", "etcd", ips=ips, server=True)
    certs = {user: ca.issue(user, user) for user in PASSWORDS}
    etcd = SecureEtcd(lab, base, ca, other, certs["root"], certs)
    initial = ",".join(f"s{i}=http://{m.ip}:{PEER_PORT}" for i, m in enumerate(ETCD_MEMBERS.values(), 1))
    pids = []
    try:
        for i, (name, m) in enumerate(ETCD_MEMBERS.items(), 1):
            pids.append(lab.spawn(name, [
                "etcd", f"--name=s{i}", f"--data-dir={base}/data{i}",
                f"--listen-client-urls=https://{m.ip}:{CLIENT_PORT}",
                f"--advertise-client-urls=https://{m.ip}:{CLIENT_PORT}",
                f"--listen-peer-urls=http://{m.ip}:{PEER_PORT}",
                f"--initial-advertise-peer-urls=http://{m.ip}:{PEER_PORT}", f"--initial-cluster={initial}",
                "--initial-cluster-token=nfsha-secure", "--initial-cluster-state=new",
                f"--cert-file={server.cert}", f"--key-file={server.key}", f"--trusted-ca-file={ca.cert}",
                "--client-cert-auth", "--heartbeat-interval=50", "--election-timeout=500"], base / f"etcd{i}.log"))
        wait_for(lambda: etcd.ctl("endpoint", "health", check=False).returncode == 0, 30, "the TLS etcd healthy")
        for args in documented_rbac(PREFIX):
            etcd.ctl(*args)
        for user, role in ROLES.items():
            etcd.ctl("user", "add", user, f"--new-user-password={PASSWORDS[user]}")
            etcd.ctl("user", "grant-role", user, role)
        etcd.ctl("auth", "enable")
        yield etcd
    finally:
        for pid in pids:
            lab.stop(pid, signal.SIGKILL, timeout=10)


def test_agents_hold_and_move_a_vip_over_tls_with_passwords_and_the_documented_roles(
        cluster: LabCluster, secure: SecureEtcd) -> None:
    secure.use(cluster)
    cluster.start_agents(ttl=2, nodes=("node-a", "node-b"))  # waits for each registration, read as `monitor`
    vip = cluster.new_vip()
    cluster.put_spec("tls1", vip, candidates=("node-a", "node-b"))  # as alice, the operator
    cluster.wait_serving("tls1", "node-a")
    cluster.wait_served_by(vip, "node-a")
    time.sleep(3.0)  # 1.5 TTLs: the keepalives go over the TLS lease stream
    assert cluster.vfs_status("tls1")["owner"] == "node-a"
    cluster.put_intent("tls1", "node-b")
    cluster.wait_serving("tls1", "node-b")
    cluster.wait_served_by(vip, "node-b")
    status = cluster.cli("status")  # as monitor: every VFS served where its intent asks, every node up
    assert status.returncode == 0 and status.stdout.rstrip().endswith("OK"), status.stdout + status.stderr

    # Each role is refused what it must not do, with the reason.
    denied = cluster.cli("move", "tls1", "node-a")  # the reader role cannot write
    assert denied.returncode == 2 and "etcd RBAC: monitor lacks a role" in denied.stderr
    for user, key in (("node-a", "/elsewhere"), ("alice", f"{PREFIX}/nodes/node-z"), ("monitor", f"{PREFIX}/x")):
        proc = secure.ctl("put", key, "x", user=user, check=False)
        assert proc.returncode != 0 and "permission denied" in proc.stderr, (user, key, proc.stderr)
    assert secure.ctl("put", f"{PREFIX}/epoch-base", "1", user="node-a", check=False).returncode != 0


@pytest.mark.parametrize(("case", "message"), [
    ("wrong CA", "etcd's certificate is not signed by etcd_ca"),
    ("expired certificate", "expired on"),
    ("wrong password", "etcd_user 'node-c': wrong user name or password"),
])
def test_bad_credentials_stop_the_agent_with_the_reason_before_it_holds_anything(
        cluster: LabCluster, secure: SecureEtcd, case: str, message: str) -> None:
    secure.use(cluster)
    vip, vfs = cluster.new_vip(), f"only-c-{case.split()[1].lower()}"
    cluster.put_spec(vfs, vip, candidates=("node-c",))
    config = {
        "wrong CA": lambda: secure.agent_config("node-c", ca=secure.other.cert),
        "expired certificate": lambda: secure.agent_config("node-c", cert=secure.ca.issue(
            "node-c-old", "node-c", expired=True)),
        "wrong password": lambda: secure.agent_config("node-c", password="not-it"),
    }[case]()
    cluster.agent_args = lambda _node: ["--config", str(config), "--etcd", secure.endpoints]
    pid = cluster.start_agent("node-c")
    wait_for(lambda: not procs.is_alive(pid), 20, "the agent to exit")
    code = cluster.lab.stop(cluster.agents.pop("node-c"), timeout=5)
    log = cluster.agent_log("node-c").read_text()
    assert code == 2, log[-2000:]
    assert message in log, log[-2000:]
    assert "Traceback" not in log
    assert not cluster.vip_on("node-c", vip)
    nodes = {n["node"]: n for n in cluster.status()["nodes"]}
    assert not nodes.get("node-c", {}).get("alive")
    assert json.loads(secure.ctl("get", f"{PREFIX}/vfs/{vfs}/owner", "-w", "json").stdout).get("kvs") is None
