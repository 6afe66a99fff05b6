"""Gratuitous ARP is withheld the moment the holding stops being valid (node/arp.py announce)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from node import arp


class FakeSocket:
    sent: ClassVar[list[bytes]] = []

    def __init__(self, iface: str) -> None:
        self.mac = bytes.fromhex("020000000001")

    def __enter__(self) -> FakeSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def only_senders(self, addrs: object) -> bool:
        return True

    def send(self, frame: bytes) -> None:
        FakeSocket.sent.append(frame)


@pytest.fixture(autouse=True)
def fake_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeSocket.sent = []
    monkeypatch.setattr(arp, "ArpSocket", FakeSocket)


def test_valid_holding_sends_request_and_reply_claiming_the_vip() -> None:
    assert arp.announce("eth0", "10.77.0.100", lambda: True) is True
    parsed = [arp.parse_frame(f) for f in FakeSocket.sent]
    assert [p[0] for p in parsed if p] == [arp.ARP_REQUEST, arp.ARP_REPLY]
    assert all(p and p[2] == bytes([10, 77, 0, 100]) and p[4] == bytes([10, 77, 0, 100]) for p in parsed)


def test_validity_is_asked_before_every_frame() -> None:
    answers = iter([True, False])  # lost between the two frames (e.g. frozen and resumed)
    assert arp.announce("eth0", "10.77.0.100", lambda: next(answers)) is False
    assert len(FakeSocket.sent) == 1
    FakeSocket.sent = []
    assert arp.announce("eth0", "10.77.0.100", lambda: False) is False
    assert FakeSocket.sent == []


VIP_ADDR = bytes([10, 77, 0, 100])  # the address the tests defend


class ClaimSocket(FakeSocket):
    """Foreign claims arrive from `claims`: (monotonic time, MAC) pairs."""

    claims: ClassVar[list[tuple[float, str]]] = []

    def claims_until(self, until: float) -> Iterator[tuple[bytes, bytes]]:
        while True:
            now = time.monotonic()
            if ClaimSocket.claims and ClaimSocket.claims[0][0] <= now:
                yield VIP_ADDR, arp.mac_bytes(ClaimSocket.claims.pop(0)[1])
                continue
            if now >= until:
                return
            nxt = ClaimSocket.claims[0][0] if ClaimSocket.claims else until
            time.sleep(max(0.0, min(until, nxt) - now))


def run_keep_claim(monkeypatch: pytest.MonkeyPatch, seconds: float, claims: list[tuple[float, str]],
                   announce_at: tuple[float, ...] = (), has_ip: bool = True, min_interval: float = 0.2,
                   ) -> list[set[str]]:
    monkeypatch.setattr(arp, "ArpSocket", ClaimSocket)
    start = time.monotonic()
    ClaimSocket.claims = [(start + t, mac) for t, mac in claims]
    defended: list[set[str]] = []
    arp.keep_claim("eth0", "10.77.0.100", lambda: time.monotonic() < start + seconds,
                   [start + t for t in announce_at], lambda: has_ip, on_defend=defended.append,
                   min_interval=min_interval, poll=0.01)
    return defended


def test_keep_claim_announces_on_schedule_and_is_quiet_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_keep_claim(monkeypatch, 0.3, [], announce_at=(0.05, 0.1)) == []
    assert len(FakeSocket.sent) == 4  # two request/reply pairs, nothing after the schedule


def test_foreign_claims_are_answered_at_most_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    other, third = "02:00:00:00:00:02", "02:00:00:00:00:03"
    defended = run_keep_claim(monkeypatch, 0.6, [(0.05, other), (0.1, third)], min_interval=0.2)
    # The first claim at once; the second waits for the interval, then is answered too.
    assert defended == [{other}, {third}]
    assert len(FakeSocket.sent) == 4
    parsed = arp.parse_frame(FakeSocket.sent[-1])
    assert parsed is not None and parsed[1] == bytes.fromhex("020000000001")  # our MAC claims it back


def test_nothing_is_sent_without_the_address_or_validity(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_keep_claim(monkeypatch, 0.3, [(0.05, "02:00:00:00:00:02")], has_ip=False) == []
    assert FakeSocket.sent == []
    assert run_keep_claim(monkeypatch, 0.0, [(0.0, "02:00:00:00:00:02")], announce_at=(0.0,)) == []
    assert FakeSocket.sent == []


def test_a_defence_announces_again_after_the_neighbour_locktime(monkeypatch: pytest.MonkeyPatch) -> None:
    # A client ignores our answer if the foreign claim changed its entry less than locktime ago.
    monkeypatch.setattr(arp, "DEFEND_AGAIN_AFTER", 0.1)
    assert run_keep_claim(monkeypatch, 0.4, [(0.05, "02:00:00:00:00:02")]) == [{"02:00:00:00:00:02"}]
    assert len(FakeSocket.sent) == 4  # at once and once more, one request/reply pair each


def test_a_thread_that_could_not_start_is_started_by_the_next_claim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arp, "ArpSocket", ClaimSocket)
    ClaimSocket.claims = []
    defender = arp.Defender("eth0", poll=0.01)
    real_start = arp.threading.Thread.start
    monkeypatch.setattr(arp.threading.Thread, "start", lambda self: (_ for _ in ()).throw(RuntimeError("can't start")))
    with pytest.raises(RuntimeError):
        defender.add("10.77.0.100", lambda: True, [time.monotonic()], lambda: True)
    monkeypatch.setattr(arp.threading.Thread, "start", real_start)
    valid_until = time.monotonic() + 0.2
    defender.add("10.77.0.101", lambda: time.monotonic() < valid_until, [time.monotonic()], lambda: True)
    defender.join(timeout=2.0)
    assert FakeSocket.sent  # the second add() started a thread, which announced


def test_a_claim_whose_check_keeps_failing_waits_and_the_others_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arp, "ArpSocket", ClaimSocket)
    ClaimSocket.claims = []
    calls = {"bad": 0}

    def failing() -> bool:
        calls["bad"] += 1
        raise OSError(105, "No buffer space available")  # netlink trouble: this claim's, not the socket's

    defender = arp.Defender("eth0", poll=0.01, retry_pause=0.1)
    start = time.monotonic()
    defender.add("10.77.0.100", lambda: time.monotonic() < start + 0.5, [start], failing)
    defender.add("10.77.0.101", lambda: time.monotonic() < start + 0.5, [start + 0.05, start + 0.3], lambda: True)
    defender.join(timeout=3.0)
    assert calls["bad"] <= 8  # once per retry pause (0.1 s), not in a tight loop
    good = [p for p in (arp.parse_frame(f) for f in FakeSocket.sent) if p and p[2] == bytes([10, 77, 0, 101])]
    assert len(good) == 4  # both of the other claim's announcements went out


def run_bpf(prog: list[tuple[int, int, int, int]], frame: bytes) -> int:
    """The classic BPF subset sender_filter uses (ldh/ld absolute, jeq, ret), as the kernel runs it."""
    import struct

    acc, pc = 0, 0
    while True:
        code, jt, jf, k = prog[pc]
        if code == 0x28:
            acc = struct.unpack("!H", frame[k:k + 2])[0] if k + 2 <= len(frame) else None
        elif code == 0x20:
            acc = struct.unpack("!I", frame[k:k + 4])[0] if k + 4 <= len(frame) else None
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF code {code:#x}")
        if acc is None:
            return 0  # a load past the end drops the frame, as in the kernel
        pc += 1


@pytest.mark.parametrize("count", [0, 1, 3, arp.MAX_FILTERED])
def test_the_kernel_filter_passes_exactly_the_frames_claiming_our_addresses(count: int) -> None:
    import ipaddress

    ours = [ipaddress.IPv4Address(f"10.77.{100 + i // 250}.{i % 250 + 1}").packed for i in range(count)]
    prog = arp.sender_filter(ours)
    mac = bytes.fromhex("020000000002")
    for addr in ours:
        assert run_bpf(prog, arp.build_frame(arp.ARP_REQUEST, mac, addr, arp.ZERO_MAC, addr)) > 0
        assert run_bpf(prog, arp.build_frame(arp.ARP_REPLY, mac, addr, arp.BROADCAST, b"\x0a\x4d\x00\x32")) > 0
    other = bytes([10, 77, 0, 50])  # a client asking for one of our VIPs: not a claim of it
    target = ours[0] if ours else bytes([10, 77, 100, 1])
    assert run_bpf(prog, arp.build_frame(arp.ARP_REQUEST, mac, other, arp.ZERO_MAC, target)) == 0
    ipv4 = arp.build_frame(arp.ARP_REQUEST, mac, target, arp.ZERO_MAC, target)[:12] + b"\x08\x00" + b"\x00" * 28
    assert run_bpf(prog, ipv4) == 0  # not ARP at all
    assert run_bpf(prog, b"\x00" * 13) == 0  # a runt frame


def test_a_claim_that_replaces_another_for_the_same_address_is_served_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new holding's claim on an address whose old claim is still listed (re-acquired on this node)
    is announced at once, not at the defender's next validity check (LIVE_CHECK, 0.5 s)."""
    monkeypatch.setattr(arp, "ArpSocket", ClaimSocket)
    ClaimSocket.claims = []
    d = arp.Defender("eth0", poll=0.01, min_interval=0.2)
    end = time.monotonic() + 1.0
    old = {"valid": True}
    d.add("10.77.0.100", lambda: old["valid"], [], lambda: True)
    time.sleep(0.05)  # the defender has looked at its claims
    old["valid"] = False
    t0 = time.monotonic()
    d.add("10.77.0.100", lambda: time.monotonic() < end, [t0], lambda: True)
    while not FakeSocket.sent and time.monotonic() < t0 + 1.0:
        time.sleep(0.002)
    assert FakeSocket.sent and time.monotonic() - t0 < arp.LIVE_CHECK - 0.1
    d.join(timeout=3)


class ProbeSocket(FakeSocket):
    """Answers probes: each address in `answer` gets a reply from its MAC `delay` after a probe for it;
    counts sockets opened and the addresses each filter passed."""

    answer: ClassVar[dict[bytes, str]] = {}
    delay = 0.02
    opened: ClassVar[list[ProbeSocket]] = []

    def __init__(self, iface: str) -> None:
        super().__init__(iface)
        self.replies: list[tuple[float, bytes, bytes]] = []
        self.filters: list[frozenset[bytes]] = []
        ProbeSocket.opened.append(self)

    def only_senders(self, addrs: object) -> bool:
        self.filters.append(frozenset(addrs))  # type: ignore[arg-type]
        return True

    def send(self, frame: bytes) -> None:
        super().send(frame)
        parsed = arp.parse_frame(frame)
        assert parsed is not None and parsed[0] == arp.ARP_REQUEST and parsed[2] == arp.ZERO_IP  # an RFC 5227 probe
        target = parsed[4]
        if target in ProbeSocket.answer:
            self.replies.append((time.monotonic() + self.delay, target, arp.mac_bytes(ProbeSocket.answer[target])))

    def queued_claims(self) -> Iterator[tuple[bytes, bytes]]:
        now = time.monotonic()
        for r in [r for r in self.replies if r[0] <= now]:
            self.replies.remove(r)
            if r[1] in self.filters[-1]:
                yield r[1], r[2]

    def senders_of(self, ip: bytes, until: float) -> Iterator[bytes]:
        return (mac for addr, mac in self.claims_until(until) if addr == ip)

    def claims_until(self, until: float) -> Iterator[tuple[bytes, bytes]]:
        while True:
            yield from self.queued_claims()
            now = time.monotonic()
            if now >= until:
                return
            time.sleep(min(0.005, max(0.0, until - now)))


def test_a_probe_sends_three_rfc5227_probes_and_hears_only_its_own_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arp, "ArpSocket", ProbeSocket)
    ProbeSocket.opened = []
    ProbeSocket.answer = {bytes([10, 77, 0, 100]): "02:00:00:00:00:09", bytes([10, 77, 0, 101]): "02:00:00:00:00:0a"}
    assert arp.probe("eth0", "10.77.0.100") == {"02:00:00:00:00:09"}
    assert arp.probe("eth0", "10.77.0.102") == set()
    sent = [arp.parse_frame(f) for f in FakeSocket.sent]
    assert [p[4] for p in sent if p] == [bytes([10, 77, 0, 100])] * 3 + [bytes([10, 77, 0, 102])] * 3
    assert [sorted(f) for s in ProbeSocket.opened for f in s.filters] == [[bytes([10, 77, 0, 100])],
                                                                           [bytes([10, 77, 0, 102])]]


def test_a_probe_that_cannot_open_its_socket_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def broken(iface: str) -> FakeSocket:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(arp, "ArpSocket", broken)
    with pytest.raises(OSError, match="Too many open files"):
        arp.probe("eth0", "10.77.0.100")  # never "nobody answers": a takeover that cannot probe does not go on
