"""ARP on a raw packet socket: probe who answers an IPv4 address, announce a VIP.

Used by the agent (probe before raising a VIP, gratuitous ARP after) and, through
`python -m node.arp watch`, by the tests and the benchmark to sample which MACs answer a
VIP. No external tool and no shell is involved.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import select
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator

ETH_P_ARP = 0x0806
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ZERO_IP = b"\x00" * 4
_ARP_HDR = struct.Struct("!HHBBH6s4s6s4s")


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def mac_bytes(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6:
        raise ValueError(f"bad MAC {text!r}")
    return bytes(int(p, 16) for p in parts)


def interface_mac(iface: str) -> str:
    with open(f"/sys/class/net/{iface}/address") as fh:
        return fh.read().strip()


def build_frame(op: int, src_mac: bytes, src_ip: bytes, dst_mac: bytes, target_ip: bytes,
                eth_dst: bytes = BROADCAST) -> bytes:
    eth = eth_dst + src_mac + struct.pack("!H", ETH_P_ARP)
    arp = _ARP_HDR.pack(1, 0x0800, 6, 4, op, src_mac, src_ip, dst_mac, target_ip)
    return eth + arp


def parse_frame(frame: bytes) -> tuple[int, bytes, bytes, bytes, bytes] | None:
    """(op, sender MAC, sender IP, target MAC, target IP) of an Ethernet ARP frame, else None."""
    if len(frame) < 14 + _ARP_HDR.size or struct.unpack("!H", frame[12:14])[0] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, sha, spa, tha, tpa = _ARP_HDR.unpack(frame[14:14 + _ARP_HDR.size])
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    return op, sha, spa, tha, tpa


class ArpSocket:
    """A raw ARP socket bound to one interface."""

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.mac = mac_bytes(interface_mac(iface))
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.bind((iface, 0))
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ArpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def senders_of(self, ip: bytes, until: float) -> Iterator[bytes]:
        """Yield the sender MAC of every ARP frame claiming `ip` until monotonic `until`."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            while True:
                try:
                    frame = self.sock.recv(2048)
                except BlockingIOError:
                    break
                parsed = parse_frame(frame)
                if parsed and parsed[2] == ip and parsed[1] != self.mac:
                    yield parsed[1]


def probe(iface: str, ip: str, tries: int = 3, spacing: float = 0.05, wait: float = 0.15) -> set[str]:
    """MACs other than ours that claim `ip` (RFC 5227 probes: sender IP 0.0.0.0)."""
    target = ipaddress.IPv4Address(ip).packed
    found: set[str] = set()
    with ArpSocket(iface) as arp:
        frame = build_frame(ARP_REQUEST, arp.mac, ZERO_IP, ZERO_MAC, target)
        for i in range(tries):
            arp.send(frame)
            end = time.monotonic() + (spacing if i < tries - 1 else wait)
            found.update(mac_text(m) for m in arp.senders_of(target, end))
    return found


def announce(iface: str, ip: str, still_valid: Callable[[], bool] = lambda: True) -> bool:
    """One gratuitous ARP pair: a request and a reply, both broadcast, both claiming `ip`.

    ``still_valid`` is asked right before each frame goes out, after the socket is open and the
    frames are built: a process frozen (SIGSTOP, a paused VM) before that point and resumed
    after it lost the VIP sends nothing. Only a freeze between that check and the send() system
    call remains, a few microseconds. False if a frame was withheld."""
    addr = ipaddress.IPv4Address(ip).packed
    with ArpSocket(iface) as arp:
        frames = (build_frame(ARP_REQUEST, arp.mac, addr, ZERO_MAC, addr),
                  build_frame(ARP_REPLY, arp.mac, addr, BROADCAST, addr))
        for frame in frames:
            if not still_valid():
                return False
            arp.send(frame)
    return True


def watch(iface: str, ip: str, src_ip: str, interval: float, duration: float) -> Iterator[dict[str, object]]:
    """Ask who has `ip` every `interval` seconds; yield one sample per window.

    A sample lists every MAC that answered during its window; two MACs in one sample
    mean two hosts claimed the address at the same moment.
    """
    target = ipaddress.IPv4Address(ip).packed
    src = ipaddress.IPv4Address(src_ip).packed
    end = time.monotonic() + duration
    with ArpSocket(iface) as arp:
        frame = build_frame(ARP_REQUEST, arp.mac, src, ZERO_MAC, target)
        while time.monotonic() < end:
            start = time.monotonic()
            arp.send(frame)
            macs = {mac_text(m) for m in arp.senders_of(target, start + interval)}
            yield {"t": start, "wall": time.time(), "macs": sorted(macs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m node.arp", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="print the MACs that claim an address")
    p.add_argument("--iface", required=True)
    p.add_argument("--ip", required=True)
    w = sub.add_parser("watch", help="sample who answers an address; JSON lines on stdout")
    w.add_argument("--iface", required=True)
    w.add_argument("--ip", required=True)
    w.add_argument("--src-ip", required=True)
    w.add_argument("--interval", type=float, default=0.02)
    w.add_argument("--duration", type=float, default=60.0)
    args = parser.parse_args(argv)
    if args.cmd == "probe":
        print(json.dumps(sorted(probe(args.iface, args.ip))))
        return 0
    for sample in watch(args.iface, args.ip, args.src_ip, args.interval, args.duration):
        sys.stdout.write(json.dumps(sample) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
