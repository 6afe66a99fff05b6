"""The agent under systemd's Type=notify: READY=1 only once the node is registered, STOPPING=1 at SIGTERM.

systemd is not this machine's init, so the test plays its part: a datagram socket named by
NOTIFY_SOCKET (a filesystem path, which reaches across the node's network namespace)."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from labkit.cluster import LabCluster


def test_ready_after_registration_and_stopping_on_sigterm(cluster: LabCluster, tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(30)
        cluster.agent_env["NOTIFY_SOCKET"] = str(path)
        cluster.start_agent("node-a")
        ready = server.recv(4096).decode()
        assert ready.startswith("READY=1\nSTATUS=registered as node-a"), ready
        assert cluster.node_alive("node-a")  # registered before it said so
        assert cluster.stop_agent("node-a", signal.SIGTERM) == 0
        assert server.recv(4096).decode().startswith("STOPPING=1")
