"""Many-target ARP sampler: who answers each of many VIPs, in passes from one raw socket.

    python -m labkit.arpscan --iface eth0 --src-ip 10.77.0.50 --targets FILE --out FILE
        [--interval 0.02] [--duration S]

Run inside a lab namespace (the client's, started by ``ArpScan`` below). One pass broadcasts an
ARP request for every target (sender: this host's MAC and --src-ip), then collects, until the
pass's window (--interval) ends, every ARP frame whose *sender* address is a target, from a MAC
other than ours - replies, and gratuitous ARPs too, as ``node.arp watch`` does for one VIP.
A frame arriving after its pass's window counts for the next pass.

A pass in which one target got frames from two or more MACs is a *dual-ARP sample* for it: two
hosts claimed the address within one window.

Output, JSON lines, times CLOCK_MONOTONIC (comparable with time.monotonic() of any process):
``{"t": start, "sent": seconds_to_send_all, "a": {ip: [mac, ...]}}`` per pass ("a" lists only
targets that got an answer). Bounded: exits after --duration, on SIGTERM/SIGINT, or when its
parent process goes away. Stdlib only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ETH_P_ARP = 0x0806
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
_ARP = struct.Struct("!HHBBH6s4s6s4s")


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _request(src_mac: bytes, src_ip: bytes, target: bytes) -> bytes:
    return BROADCAST + src_mac + struct.pack("!H", ETH_P_ARP) + _ARP.pack(
        1, 0x0800, 6, 4, 1, src_mac, src_ip, ZERO_MAC, target)


def _sender(frame: bytes) -> tuple[bytes, bytes] | None:
    """(sender MAC, sender IP) of an Ethernet ARP frame, else None."""
    if len(frame) < 14 + _ARP.size or frame[12:14] != b"\x08\x06":
        return None
    htype, ptype, hlen, plen, _op, sha, spa, _tha, _tpa = _ARP.unpack(frame[14:14 + _ARP.size])
    if htype != 1 or ptype != 0x0800 or hlen != 6 or plen != 4:
        return None
    return sha, spa


def scan(iface: str, src_ip: str, targets: list[str], interval: float, duration: float, out: IO[str]) -> None:
    stop: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda num, _frame: stop.append(num))
    parent = os.getppid()
    with open(f"/sys/class/net/{iface}/address") as fh:
        mine = bytes(int(p, 16) for p in fh.read().strip().split(":"))
    packed = {ipaddress.IPv4Address(t).packed: t for t in targets}
    frames = [_request(mine, ipaddress.IPv4Address(src_ip).packed, p) for p in packed]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((iface, 0))
    sock.setblocking(False)
    end = time.monotonic() + duration
    try:
        while not stop and time.monotonic() < end and os.getppid() == parent:
            start = time.monotonic()
            for frame in frames:
                try:
                    sock.send(frame)
                except BlockingIOError:
                    select.select([], [sock], [], 0.01)
            sent = time.monotonic() - start
            answers: dict[str, set[str]] = {}
            window_end = start + interval
            while not stop:
                left = window_end - time.monotonic()
                if left <= 0:
                    break
                try:
                    ready, _, _ = select.select([sock], [], [], left)
                except InterruptedError:
                    continue
                if not ready:
                    break
                while True:
                    try:
                        frame = sock.recv(2048)
                    except BlockingIOError:
                        break
                    parsed = _sender(frame)
                    if parsed is None or parsed[0] == mine or parsed[1] not in packed:
                        continue
                    answers.setdefault(packed[parsed[1]], set()).add(_mac_text(parsed[0]))
            out.write(json.dumps({"t": round(start, 6), "sent": round(sent, 6),
                                  "a": {ip: sorted(m) for ip, m in answers.items()}},
                                 separators=(",", ":")) + "\n")
            out.flush()
    finally:
        sock.close()


@dataclass
class ScanLog:
    """Incremental reader of an arpscan output file (complete lines only)."""

    path: Path
    passes: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0
    _partial: bytes = b""

    def read(self) -> list[dict[str, Any]]:
        """Every pass so far (new ones appended to self.passes)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return self.passes
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self.passes.append(json.loads(line))
        return self.passes


class ArpScan:
    """This sampler running in a lab namespace (``prefix``: e.g. Lab.client_cmd([])), our child,
    stopped by PID; ``log`` reads what it wrote so far."""

    def __init__(self, prefix: list[str], python: str, src_ip: str, targets: list[str], workdir: Path,
                 interval: float = 0.02, duration: float = 600.0, iface: str = "eth0") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        stem = f"arpscan-{os.getpid()}-{time.monotonic_ns()}"
        target_file = workdir / f"{stem}.targets"
        target_file.write_text("\n".join(targets) + "\n")
        self.path = workdir / f"{stem}.jsonl"
        compose_dir = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [compose_dir, os.environ.get("PYTHONPATH")]))}
        argv = [*prefix, python, "-m", "labkit.arpscan", "--iface", iface, "--src-ip", src_ip, "--targets",
                str(target_file), "--out", str(self.path), "--interval", str(interval), "--duration", str(duration)]
        with open(workdir / f"{stem}.err", "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env, cwd=compose_dir)
        self.log = ScanLog(self.path)

    def passes(self) -> list[dict[str, Any]]:
        return self.log.read()

    def stop(self) -> list[dict[str, Any]]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.log.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.arpscan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iface", default="eth0")
    parser.add_argument("--src-ip", required=True)
    parser.add_argument("--targets", required=True, help="file with one IPv4 address per line")
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--duration", type=float, default=600.0)
    args = parser.parse_args(argv)
    targets = [t.strip() for t in Path(args.targets).read_text().split() if t.strip()]
    with open(args.out, "a") as out:
        scan(args.iface, args.src_ip, targets, args.interval, args.duration, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
