"""ARP on a raw packet socket: probe who answers an IPv4 address, announce a VIP.

Used by the agent (probe before raising a VIP, gratuitous ARP after) and, through
`python -m node.arp watch`, by the tests and the benchmark to sample which MACs answer a
VIP. No external tool and no shell is involved.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import logging
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from controller import loops

log = logging.getLogger(__name__)
T = TypeVar("T")

ETH_P_ARP = 0x0806
ARP_REQUEST = 1
ARP_REPLY = 2
BROADCAST = b"\xff" * 6
ZERO_MAC = b"\x00" * 6
ZERO_IP = b"\x00" * 4
DEFEND_INTERVAL = 1.0  # seconds between two defences of one address
# A defence announces at once and once more a little later: in case the first was lost, and because
# a plain ARP reply (not a gratuitous one) cannot change a client's entry within neigh locktime (1 s).
DEFEND_AGAIN_AFTER = 1.2
LIVE_CHECK = 0.5  # the defender drops claims whose holding ended at least this often
RETRY_PAUSE = 0.25  # after an error (socket, netlink), the defence of an address starts again this much later
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


SO_ATTACH_FILTER = 26  # linux/asm-generic/socket.h (Python's socket module does not name it)
MAX_FILTERED = 250  # classic BPF jumps are 8-bit: more addresses than this get no kernel filter
_BPF = struct.Struct("HBBI")  # struct sock_filter: code, jt, jf, k
_ARP_SPA_OFFSET = 28  # Ethernet header (14) + ARP htype..sha (14): the sender protocol address


def sender_filter(addrs: Iterable[bytes]) -> list[tuple[int, int, int, int]]:
    """A classic BPF program: accept an ARP frame iff its sender IP is one of `addrs` (IPv4, packed).

    With hundreds of VIPs sampled or probed on the link (a takeover storm, a client ARPing for
    many VIPs), every raw ARP socket otherwise gets every frame, to be parsed in Python."""
    targets = sorted(set(addrs))
    n = len(targets)
    prog = [(0x28, 0, 0, 12),  # ldh [12]: the EtherType
            (0x15, 0, n + 1, ETH_P_ARP),  # not ARP: drop
            (0x20, 0, 0, _ARP_SPA_OFFSET)]  # ld [28]: the sender IP
    prog += [(0x15, n - i, 0, struct.unpack("!I", a)[0]) for i, a in enumerate(targets)]  # equal: accept
    prog += [(0x06, 0, 0, 0), (0x06, 0, 0, 0x40000)]  # ret 0: drop; ret 256 KiB: accept
    return prog


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

    def only_senders(self, addrs: Iterable[bytes]) -> bool:
        """Have the kernel pass only frames whose sender IP is one of `addrs` (the checks in Python
        stay: this only spares parsing the rest). False, and every frame passes, with more than
        MAX_FILTERED addresses."""
        targets = list(addrs)
        if len(targets) > MAX_FILTERED:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _fprog([(0x06, 0, 0, 0x40000)])[0])
            return False
        fprog, buf = _fprog(sender_filter(targets))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        del buf  # the kernel has copied the program
        return True

    def __enter__(self) -> ArpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def senders_of(self, ip: bytes, until: float) -> Iterator[bytes]:
        """Yield the sender MAC of every ARP frame claiming `ip` until monotonic `until`."""
        for addr, mac in self.claims_until(until):
            if addr == ip:
                yield mac

    def claims_until(self, until: float) -> Iterator[tuple[bytes, bytes]]:
        """Yield (sender IP, sender MAC) of every ARP frame not sent by us until monotonic `until`."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return
            yield from self.queued_claims()

    def queued_claims(self) -> Iterator[tuple[bytes, bytes]]:
        """Like claims_until, for the frames already queued on the socket, without waiting."""
        while True:
            try:
                frame = self.sock.recv(2048)
            except BlockingIOError:
                return
            parsed = parse_frame(frame)
            if parsed and parsed[1] != self.mac:
                yield parsed[2], parsed[1]


def _fprog(prog: list[tuple[int, int, int, int]]) -> tuple[bytes, ctypes.Array[ctypes.c_char]]:
    """struct sock_fprog for setsockopt, and the buffer it points to (keep it alive until then)."""
    buf = ctypes.create_string_buffer(b"".join(_BPF.pack(*ins) for ins in prog))
    return struct.pack("HL", len(prog), ctypes.addressof(buf)), buf


def probe(iface: str, ip: str, tries: int = 3, spacing: float = 0.05, wait: float = 0.15) -> set[str]:
    """MACs other than ours that claim `ip` (RFC 5227 probes: sender IP 0.0.0.0)."""
    target = ipaddress.IPv4Address(ip).packed
    found: set[str] = set()
    with ArpSocket(iface) as arp:
        arp.only_senders([target])
        frame = build_frame(ARP_REQUEST, arp.mac, ZERO_IP, ZERO_MAC, target)
        for i in range(tries):
            arp.send(frame)
            end = time.monotonic() + (spacing if i < tries - 1 else wait)
            found.update(mac_text(m) for m in arp.senders_of(target, end))
    return found


def _claim_frames(mac: bytes, addr: bytes) -> tuple[bytes, bytes]:
    return (build_frame(ARP_REQUEST, mac, addr, ZERO_MAC, addr), build_frame(ARP_REPLY, mac, addr, BROADCAST, addr))


def _send_claim(arp: ArpSocket, frames: tuple[bytes, ...], still_valid: Callable[[], bool]) -> bool:
    # Asked right before each frame: a process frozen (SIGSTOP, a paused VM) before this point and
    # resumed after it lost the VIP sends nothing. Only a freeze between the check and the send()
    # system call remains, a few microseconds.
    for frame in frames:
        if not still_valid():
            return False
        arp.send(frame)
    return True


def announce(iface: str, ip: str, still_valid: Callable[[], bool] = lambda: True) -> bool:
    """One gratuitous ARP pair: a request and a reply, both broadcast, both claiming `ip`.
    ``still_valid`` is asked right before each frame goes out, after the socket is open and the
    frames are built. False if a frame was withheld."""
    addr = ipaddress.IPv4Address(ip).packed
    with ArpSocket(iface) as arp:
        return _send_claim(arp, _claim_frames(arp.mac, addr), still_valid)


class _Claim:
    """One defended address: its announcements still due, foreign claims not yet answered, when
    the last defence was, and what the holder answers (still valid? address still up?)."""

    def __init__(self, addr: bytes, due: Iterable[float], still_valid: Callable[[], bool],
                 has_ip: Callable[[], bool], on_defend: Callable[[set[str]], None] | None) -> None:
        self.addr = addr
        self.due = sorted(due)
        self.still_valid = still_valid
        self.has_ip = has_ip
        self.on_defend = on_defend
        self.pending: set[str] = set()
        self.last_defence = float("-inf")

    def announce_now(self) -> None:
        self.due = sorted([*self.due, time.monotonic()])

    def step(self, arp: ArpSocket, now: float, min_interval: float) -> bool:
        """Answer foreign claims and send what is due; False once this claim has ended. An error of
        the holder's callbacks is a ClaimError (this claim's); an OSError is the socket's."""
        defended: set[str] = set()
        if self.pending and now - self.last_defence >= min_interval:
            defended, self.pending, self.last_defence = self.pending, set(), now
            self.due = sorted([*self.due, now, now + DEFEND_AGAIN_AFTER])
        if not self.due or self.due[0] > now:
            return True
        if not _ask(self.still_valid) or not _ask(self.has_ip):
            return False
        if not _send_claim(arp, _claim_frames(arp.mac, self.addr), lambda: _ask(self.still_valid)):
            return False
        while self.due and self.due[0] <= now:  # only once sent: an error announces them again
            self.due.pop(0)
        if defended and self.on_defend is not None:
            _ask(lambda: self.on_defend(defended))  # type: ignore[misc]
        return True

    def retry_later(self, now: float, pause: float) -> None:
        """After an error of this claim: what was due goes out `pause` from now, not at once again."""
        self.due = sorted([d for d in self.due if d > now] + [now + pause])


class ClaimError(Exception):
    """A callback of one claim (still_valid, has_ip, on_defend) raised: that claim's error alone."""


def _ask(callback: Callable[[], T]) -> T:
    try:
        return callback()
    except Exception as exc:
        raise ClaimError(f"{type(exc).__name__}: {exc}") from exc


class Defender:
    """Announces and defends every address this node holds on one interface, with one raw socket
    and one thread (started with the first claim, ended with the last): a frame is read and parsed
    once whatever the number of addresses, where a socket per address parsed every frame once per
    held VIP (quadratic in a takeover storm or under ARP scanning).

    Per address (add()): announce at the monotonic times given, and defend it: any ARP frame from
    another MAC with the address as its sender (a stale gratuitous ARP of a node resumed after a
    freeze, a misconfigured host) is answered with our own announcement, at once and again after
    DEFEND_AGAIN_AFTER, at most once per ``min_interval`` (RFC 5227 style, so two defenders cannot
    flood the link): clients' ARP caches point back here within milliseconds instead of after their
    ~30 s timeout. Nothing is sent unless ``has_ip()`` (the address is still on the interface) and
    ``still_valid()`` just before. A claim ends when its holding is no longer valid or the address
    is gone; a new claim of the same address replaces the old one. Any exception of one claim
    (netlink in ``has_ip``, ``on_defend``) is counted ("arp-defence", controller.loops) and that
    claim announces again after ``retry_pause``; a socket error does the same for every claim on a
    new socket. The thread never ends while a claim is left."""

    def __init__(self, iface: str, min_interval: float = DEFEND_INTERVAL, poll: float = 0.1,
                 retry_pause: float | None = None) -> None:
        self.iface = iface
        self.min_interval = min_interval
        self.poll = poll
        self.retry_pause = RETRY_PAUSE if retry_pause is None else retry_pause
        self._claims: dict[bytes, _Claim] = {}
        self._version = 0  # bumped whenever a claim is added or dropped: _serve then looks again at once
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, ip: str, still_valid: Callable[[], bool], announce_at: Iterable[float],
            has_ip: Callable[[], bool], on_defend: Callable[[set[str]], None] | None = None) -> None:
        claim = _Claim(ipaddress.IPv4Address(ip).packed, announce_at, still_valid, has_ip, on_defend)
        with self._lock:
            self._claims[claim.addr] = claim
            self._version += 1
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=f"arp-defence-{self.iface}", daemon=True)
                self._thread = thread
                try:
                    thread.start()
                except BaseException:  # "can't start new thread": the next add() tries again
                    self._thread = None
                    raise

    def join(self, timeout: float | None = None) -> None:
        """Wait until no claim is left (the thread has ended)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _live(self) -> list[_Claim]:
        """The claims left; drops those whose holding is no longer valid."""
        with self._lock:
            claims = list(self._claims.values())
        live = []
        for claim in claims:
            valid = True  # a validity check that raises keeps the claim: it is asked again next round
            with loops.guarded("arp-defence", str(ipaddress.IPv4Address(claim.addr)), log):
                valid = claim.still_valid()
            if valid:
                live.append(claim)
            else:
                self._drop(claim)
        return live

    def _keep_running(self) -> bool:
        """False once no claim is left: this thread then ends, and says so under the lock, so an add()
        either finds it running or starts a new one (never two serving the same claims)."""
        with self._lock:
            if self._thread is not threading.current_thread():
                return False
            if self._claims:
                return True
            self._thread = None
            return False

    def _drop(self, claim: _Claim) -> None:
        with self._lock:
            if self._claims.get(claim.addr) is claim:
                del self._claims[claim.addr]
                self._version += 1

    def _run(self) -> None:
        while True:
            self._live()  # drops the claims that ended (e.g. while the socket kept failing)
            if not self._keep_running():
                return
            try:
                with ArpSocket(self.iface) as arp:
                    self._serve(arp)
            except Exception as exc:
                loops.record("arp-defence", exc, f"socket on {self.iface}", log)
            else:
                continue
            time.sleep(self.retry_pause)
            with self._lock:
                for claim in self._claims.values():
                    claim.announce_now()  # a frame or a defence may have been lost

    def _serve(self, arp: ArpSocket) -> None:
        filtered: set[bytes] | None = None
        live: list[_Claim] = []
        checked, seen = float("-inf"), -1
        while True:
            now = time.monotonic()
            if now - checked >= LIVE_CHECK or seen != self._version:
                # Validity is asked again right before anything is sent (_Claim.step), so this only
                # tidies up; every 0.1 s for 100 claims was most of this thread's CPU. A claim added,
                # replaced or dropped is seen at once (the version).
                seen = self._version
                live, checked = self._live(), now
            if not live:
                if not self._keep_running():
                    return
                continue  # a claim added just now
            wake = min([c.due[0] for c in live if c.due] + [now + self.poll])
            with self._lock:
                by_addr = dict(self._claims)
            if set(by_addr) != filtered:  # the kernel passes frames claiming our addresses only
                arp.only_senders(by_addr)
                filtered = set(by_addr)
            for addr, mac in arp.claims_until(wake):
                claim = by_addr.get(addr)
                if claim is not None:
                    claim.pending.add(mac_text(mac))
            now = time.monotonic()
            for claim in live:
                if not claim.pending and (not claim.due or claim.due[0] > now):
                    continue  # nothing to answer or send (what step() would find)
                ended = False
                try:
                    ended = not claim.step(arp, now, self.min_interval)
                except ClaimError as exc:  # its own callbacks: only this claim waits and tries again
                    loops.record("arp-defence", exc, str(ipaddress.IPv4Address(claim.addr)), log)
                    claim.retry_later(now, self.retry_pause)
                if ended:
                    self._drop(claim)
                # Anything else (OSError of the socket, a bug) leaves _serve: every claim starts again
                # on a new socket after retry_pause.


def keep_claim(iface: str, ip: str, still_valid: Callable[[], bool], announce_at: Iterable[float],
               has_ip: Callable[[], bool], on_defend: Callable[[set[str]], None] | None = None,
               min_interval: float = DEFEND_INTERVAL, poll: float = 0.1, retry_pause: float | None = None) -> None:
    """Defend one address until its claim ends (a Defender of its own; see there)."""
    defender = Defender(iface, min_interval, poll, retry_pause)
    defender.add(ip, still_valid, announce_at, has_ip, on_defend)
    defender.join()


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
    a = sub.add_parser("announce", help="send one gratuitous ARP pair claiming an address")
    a.add_argument("--iface", required=True)
    a.add_argument("--ip", required=True)
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
    if args.cmd == "announce":
        announce(args.iface, args.ip)
        return 0
    for sample in watch(args.iface, args.ip, args.src_ip, args.interval, args.duration):
        sys.stdout.write(json.dumps(sample) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
