"""systemd's readiness protocol (sd_notify): one datagram to $NOTIFY_SOCKET per state change.

Written out rather than a dependency: the protocol is one sendto() (systemd's sd_notify(3)
documents it as stable), the maintained binding (python-systemd) needs libsystemd headers to build,
and the pure-Python `sdnotify` package has had no release since 2017. Without $NOTIFY_SOCKET (not
started by systemd with Type=notify) every call does nothing. A failure is logged, never raised:
readiness reporting must not stop an agent that works.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)
_claimed: str | None = None  # NOTIFY_SOCKET as taken out of the environment by claim()


def claim() -> None:
    """Take NOTIFY_SOCKET out of the environment (as sd_notify's unset_environment): the guard, Ganesha
    and fence commands inherit it otherwise, and systemd would take their messages for the agent's."""
    global _claimed
    _claimed = os.environ.pop("NOTIFY_SOCKET", "")


def notify(*fields: str) -> bool:
    """Send "KEY=value" fields (e.g. "READY=1", "STATUS=..."); True if a datagram went out."""
    address = _claimed if _claimed is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET %r is neither a path nor an abstract socket; not notifying", address)
        return False
    message = "\n".join(f.replace("\n", " ") for f in fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("sd_notify %s failed: %s", fields, exc)
        return False
    return True
