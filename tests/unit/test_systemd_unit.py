"""The systemd unit (packaging/systemd/nfs-ha-agent.service) and the agent's sd_notify messages."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from node import sdnotify

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "nfs-ha-agent.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants ExecStart's binary to exist: this checkout's agent stands in for /usr/local/bin's.
    agent = Path(sys.executable).parent / "nfs-ha-agent"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/nfs-ha-agent", str(agent)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_the_unit_leaves_the_guard_to_outlive_the_agent_and_does_not_restart_on_bad_config() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["Type"] == "notify"
    assert service["KillMode"] == "process"  # SIGTERM to the agent alone; the guard is never SIGKILLed
    assert service["RestartPreventExitStatus"] == "2"  # the agent's exit code for config and credentials
    assert "--check-config" in service["ExecStartPre"]


def test_notify_sends_one_datagram_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=registered\nas node-a")
        assert server.recv(4096) == b"READY=1\nSTATUS=registered as node-a"
    monkeypatch.setenv("NOTIFY_SOCKET", f"@nfsha-test-{os.getpid()}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(f"\0nfsha-test-{os.getpid()}")
        assert sdnotify.notify("STOPPING=1")
        assert server.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_or_with_a_dead_socket_does_nothing(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not sdnotify.notify("READY=1")  # logged, not raised
