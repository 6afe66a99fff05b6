"""Which addresses a server listens on, read from /proc/net/tcp{,6} (node/ganesha.py): Ganesha 4.3
binds the wildcard [::] instead of its Bind_addr in a namespace without IPv6 outside lo."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from node import ganesha

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def row(local: str, state: str = "0A", inode: int = 1) -> str:
    return f"   0: {local} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000     0        0 {inode} 1\n"


def tables(tmp_path: Path, v4: list[str], v6: list[str]) -> tuple[Path, Path]:
    tcp, tcp6 = tmp_path / "tcp", tmp_path / "tcp6"
    tcp.write_text(HEADER + "".join(v4))
    tcp6.write_text(HEADER + "".join(v6))
    return tcp, tcp6


def test_addresses_are_decoded_and_v4_mapped_ones_shown_as_ipv4(tmp_path: Path) -> None:
    t = tables(tmp_path, [row("64004D0A:0801", inode=11), row("0100007F:0016", inode=12),
                          row("65004D0A:0801", state="01", inode=13)],
               [row("0000000000000000FFFF0000C8004D0A:0801", inode=21),  # as Ganesha binds with IPv6 up
                row("00000000000000000000000000000000:0801", inode=22),  # ... and without
                row("000080FE00000000FF020100050403FE:0801", inode=23)])
    assert ganesha.listeners(2049, t) == [("10.77.0.100", 11), ("10.77.0.200", 21), ("::", 22),
                                         ("fe80::1:2ff:fe03:405", 23)]
    assert ganesha.listeners(22, t) == [("127.0.0.1", 12)]  # an established socket (01) is no listener


def test_own_listeners_match_the_socket_inodes_of_the_process() -> None:
    # A real socket of this process on loopback, found in the real tables by its inode.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert ganesha.own_listeners(os.getpid(), port) == ["127.0.0.1"]
        assert ganesha.listening("127.0.0.1", port)
        assert not ganesha.listening("127.0.0.2", port)
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert ganesha.own_listeners(os.getpid(), port) == ["::"]
        assert ganesha.listening("10.77.0.100", port)  # a wildcard listener answers on every address
