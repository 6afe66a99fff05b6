"""Background threads survive any exception from one holding (issue 8, "The agent stays up").

Real LeaseKeeper threads and the real monotonic clock, with a fake etcd store, fake VIP drops and a
fake raw ARP socket: an EMFILE/ENOSPC/netlink error of one holding must not stop the fence monitor,
the keepalive loop or the ARP defence from serving the others.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest
from pyroute2.netlink.exceptions import NetlinkError

from controller import loops
from controller.ownership import FENCE_CHECK_SECONDS, Fenced, Holding, LeaseKeeper, fence_margin
from controller.store import CallingLeaseStream, StoreError
from node import arp
from node.host import Host

# A fence must come within a tick of its deadline; the slack is for a loaded 2-core machine.
TICK_SLACK = FENCE_CHECK_SECONDS + 0.1


class FakeStore:
    """Keepalives answer with `ttl`, except: every one while `down`, and those of `fail` leases."""

    def __init__(self, ttl: int = 1, down: bool = False) -> None:
        self.ttl = ttl
        self.down = down
        self.fail: dict[int, BaseException] = {}
        self.calls: Counter[int] = Counter()
        self._lock = threading.Lock()

    def lease_stream(self, on_answer: Callable[[int, int, int], None],
                     on_ended: Callable[[int], None]) -> CallingLeaseStream:
        return CallingLeaseStream(self.keepalive, on_answer, on_ended)  # as MemStore's

    def keepalive(self, lease_id: int, client: object = None) -> int:
        with self._lock:
            self.calls[lease_id] += 1
        if self.down:
            raise StoreError("etcd unreachable")
        if lease_id in self.fail:
            raise self.fail[lease_id]
        return self.ttl


def wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


@pytest.fixture
def keepers() -> Iterator[list[LeaseKeeper]]:
    started: list[LeaseKeeper] = []
    yield started
    for k in started:
        k.stop()


def holding_due_in(vfs: str, lease_id: int, seconds: float, drop: Callable[[], None], ttl: int = 1) -> Holding:
    """A holding whose self-fence deadline is `seconds` from now."""
    granted_at = time.monotonic() + seconds - (ttl - fence_margin(ttl))
    return Holding(vfs=vfs, lease_id=lease_id, ttl=ttl, granted_at=granted_at, drop=drop)


# --- (a) the fence monitor ---------------------------------------------------------------------------


def test_a_failing_vip_drop_does_not_stop_the_other_fences(keepers: list[LeaseKeeper]) -> None:
    dropped_at: dict[str, float] = {}
    attempts: list[float] = []

    def drop_a() -> None:  # the process is out of file descriptors for a while
        attempts.append(time.monotonic())
        if len(attempts) <= 3:
            raise OSError(errno.EMFILE, "Too many open files")
        dropped_at["a"] = time.monotonic()

    escalated: list[tuple[str, BaseException]] = []
    before = loops.ERRORS.count("vip-drop")
    keeper = LeaseKeeper(FakeStore(down=True), on_drop_failed=lambda h, exc: escalated.append((h.vfs, exc)))
    a = holding_due_in("a", 1, 0.05, drop_a)
    b = holding_due_in("b", 2, 0.12, lambda: dropped_at.setdefault("b", time.monotonic()))
    c = holding_due_in("c", 3, 0.2, lambda: dropped_at.setdefault("c", time.monotonic()))
    for h in (a, b, c):
        keeper.add(h)
    keeper.start()
    keepers.append(keeper)

    assert wait_for(lambda: {"a", "b", "c"} <= set(dropped_at))
    for h in (b, c):  # each at its own deadline, as if `a` had never failed
        assert h.fenced
        assert h.deadline <= dropped_at[h.vfs] <= h.deadline + TICK_SLACK
    # The failing holding is fenced for good, its drop retried on every tick until it went through.
    assert a.fenced and not a.valid()
    with pytest.raises(Fenced):
        a.guarded(lambda: None)
    assert len(attempts) == 4
    assert attempts[0] <= a.deadline + TICK_SLACK
    assert attempts[-1] - attempts[0] <= 3 * (FENCE_CHECK_SECONDS + TICK_SLACK)
    assert a.dropped_at_ns and "Too many open files" in a.drop_error
    # Escalated once (the agent fences that VFS through the guard), every failure counted.
    assert [v for v, _ in escalated] == ["a"]
    assert isinstance(escalated[0][1], OSError) and escalated[0][1].errno == errno.EMFILE
    assert loops.ERRORS.count("vip-drop") - before == 3


def test_on_fence_callbacks_and_escalation_that_raise_do_not_stop_the_monitor(keepers: list[LeaseKeeper]) -> None:
    dropped: list[str] = []

    def explode(*_args: object) -> None:
        raise RuntimeError("callback bug")

    keeper = LeaseKeeper(FakeStore(down=True), on_drop_failed=explode)
    a = holding_due_in("a", 1, 0.03, lambda: (_ for _ in ()).throw(NetlinkError(errno.ENOBUFS, "No buffer space")))
    a.on_fence = explode
    b = holding_due_in("b", 2, 0.08, lambda: dropped.append("b"))
    b.on_fence = explode
    c = holding_due_in("c", 3, 0.13, lambda: dropped.append("c"))
    for h in (a, b, c):
        keeper.add(h)
    keeper.start()
    keepers.append(keeper)
    assert wait_for(lambda: dropped == ["b", "c"])
    assert c.deadline <= time.monotonic() and c.fenced
    assert a.fenced and a.dropped_at_ns == 0 and "No buffer space" in a.drop_error
    assert a in keeper.holdings()  # its VIP may still be up: the watchdog must keep protecting it


def test_a_fenced_holding_whose_vip_is_still_up_is_not_forgotten_when_removed(keepers: list[LeaseKeeper]) -> None:
    fail = threading.Event()
    fail.set()
    drops: list[float] = []

    def drop() -> None:
        drops.append(time.monotonic())
        if fail.is_set():
            raise OSError(errno.EMFILE, "Too many open files")

    keeper = LeaseKeeper(FakeStore(down=True))
    h = holding_due_in("a", 1, 5.0, drop)
    keeper.add(h)
    keeper.start()
    keepers.append(keeper)
    assert h.fence("owner key is gone")  # e.g. by the reconciler: never raises
    keeper.remove(h)  # the reconciler gave up on it
    assert h in keeper.holdings()
    assert wait_for(lambda: len(drops) >= 3)
    fail.clear()
    assert wait_for(lambda: h.dropped_at_ns != 0)
    assert wait_for(lambda: h not in keeper.holdings())
    n = len(drops)
    time.sleep(3 * FENCE_CHECK_SECONDS)
    assert len(drops) == n  # down: no more retries


def test_a_new_holding_of_the_same_vfs_ends_the_retries_of_the_old_one(keepers: list[LeaseKeeper]) -> None:
    drops: list[float] = []

    def drop() -> None:
        drops.append(time.monotonic())
        raise OSError(errno.EMFILE, "Too many open files")

    keeper = LeaseKeeper(FakeStore(down=True))
    old = holding_due_in("a", 1, 5.0, drop)
    keeper.add(old)
    keeper.start()
    keepers.append(keeper)
    old.fence("lease is gone")
    keeper.remove(old)
    assert wait_for(lambda: len(drops) >= 2)
    new = holding_due_in("a", 2, 5.0, lambda: None)
    keeper.add(new)  # the same VIP is ours again: dropping it now would take it from the new holding
    n = len(drops)
    time.sleep(3 * FENCE_CHECK_SECONDS)
    assert len(drops) == n
    assert keeper.holdings() == [new]


# --- (b) the keepalive loop ----------------------------------------------------------------------------


def test_keepalive_errors_of_one_lease_do_not_stop_the_others(keepers: list[LeaseKeeper]) -> None:
    store = FakeStore(ttl=1)
    store.fail = {3: OSError(errno.ENOSPC, "No space left on device"),
                  4: NetlinkError(errno.ENOBUFS, "No buffer space available"),
                  5: RuntimeError("client bug")}
    acked: Counter[str] = Counter()

    def on_deadline(h: Holding) -> None:  # the guard hold of "bad-guard" fails
        if h.vfs == "bad-guard":
            raise OSError(errno.EMFILE, "Too many open files")
        acked[h.vfs] += 1

    before = loops.ERRORS.count("keepalive")
    keeper = LeaseKeeper(store, on_deadline=on_deadline)
    now = time.monotonic()
    bad = [Holding(vfs=f"bad-{i}", lease_id=i, ttl=1, granted_at=now, drop=lambda: None) for i in (3, 4, 5)]
    bad.append(Holding(vfs="bad-guard", lease_id=6, ttl=1, granted_at=now, drop=lambda: None))
    good = [Holding(vfs=f"good-{i}", lease_id=i, ttl=1, granted_at=now, drop=lambda: None) for i in (1, 2)]
    for h in (*bad, *good):
        keeper.add(h)
    acked.clear()  # add() announces the grant's deadline; count keepalives only
    initial = {h.vfs: h.deadline for h in good}
    keeper.start()
    keepers.append(keeper)

    assert wait_for(lambda: all(store.calls[h.lease_id] >= 3 for h in good), timeout=1.5)
    # moved forward by two keepalive intervals at least (sends may come early: a batch takes a lease
    # due within half an interval along)
    assert wait_for(lambda: all(h.deadline - initial[h.vfs] >= 0.4 for h in good), timeout=1.5)
    for h in good:
        assert not h.fenced and h.valid()
        assert wait_for(lambda h=h: acked[h.vfs] >= 3, timeout=1.0)  # told in the fence monitor's batches
    assert all(store.calls[i] >= 2 for i in (3, 4, 5, 6))  # the failing ones are retried too
    assert loops.ERRORS.count("keepalive") - before >= 5
    snapshot = loops.errors()["keepalive"]
    assert snapshot["count"] >= 5 and isinstance(snapshot["last"], str) and snapshot["last"]


# --- (c) the ARP announcement and defence ------------------------------------------------------------------


VIP_ADDR = bytes([10, 77, 0, 100])  # the address the tests defend


class FlakySocket:
    """A raw ARP socket whose opening and receiving fail as often as the class says."""

    open_errors: ClassVar[list[BaseException]] = []
    recv_errors: ClassVar[list[BaseException]] = []
    claims: ClassVar[list[tuple[float, str]]] = []
    sent: ClassVar[list[tuple[float, bytes]]] = []

    def __init__(self, iface: str) -> None:
        if FlakySocket.open_errors:
            raise FlakySocket.open_errors.pop(0)
        self.mac = bytes.fromhex("020000000001")

    def __enter__(self) -> FlakySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def only_senders(self, addrs: object) -> bool:
        return True

    def send(self, frame: bytes) -> None:
        FlakySocket.sent.append((time.monotonic(), frame))

    def claims_until(self, until: float) -> Iterator[tuple[bytes, bytes]]:
        if FlakySocket.recv_errors:
            raise FlakySocket.recv_errors.pop(0)
        while True:
            now = time.monotonic()
            if FlakySocket.claims and FlakySocket.claims[0][0] <= now:
                yield VIP_ADDR, arp.mac_bytes(FlakySocket.claims.pop(0)[1])
                continue
            if now >= until:
                return
            nxt = FlakySocket.claims[0][0] if FlakySocket.claims else until
            time.sleep(max(0.0, min(until, nxt) - now))


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> type[FlakySocket]:
    FlakySocket.open_errors, FlakySocket.recv_errors, FlakySocket.claims, FlakySocket.sent = [], [], [], []
    monkeypatch.setattr(arp, "ArpSocket", FlakySocket)
    return FlakySocket


def test_the_arp_defence_survives_socket_errors_and_goes_on_announcing(flaky: type[FlakySocket]) -> None:
    flaky.open_errors = [OSError(errno.EMFILE, "Too many open files")]
    flaky.recv_errors = [OSError(errno.ENETDOWN, "Network is down")]
    start = time.monotonic()
    flaky.claims = [(start + 0.25, "02:00:00:00:00:02")]  # a stale claim after both errors
    defended: list[set[str]] = []
    before = loops.ERRORS.count("arp-defence")
    arp.keep_claim("eth0", "10.77.0.100", lambda: time.monotonic() < start + 0.45, [start + 0.15],
                   lambda: True, on_defend=defended.append, min_interval=0.1, poll=0.01, retry_pause=0.02)
    assert loops.ERRORS.count("arp-defence") - before == 2
    times = [t - start for t, _ in flaky.sent]
    # Announced again at once after each error, then the scheduled announcement, then the defence.
    assert len(times) >= 6 and any(0.15 <= t < 0.25 for t in times) and any(t >= 0.25 for t in times)
    assert defended == [{"02:00:00:00:00:02"}]
    parsed = [arp.parse_frame(f) for _, f in flaky.sent]
    assert all(p and p[1] == bytes.fromhex("020000000001") and p[2] == bytes([10, 77, 0, 100]) for p in parsed)


def test_the_arp_defence_stops_quietly_once_the_holding_is_invalid(flaky: type[FlakySocket]) -> None:
    flaky.open_errors = [OSError(errno.EMFILE, "Too many open files")] * 100
    valid = threading.Event()
    valid.set()
    threading.Timer(0.1, valid.clear).start()
    t0 = time.monotonic()
    arp.keep_claim("eth0", "10.77.0.100", valid.is_set, [t0], lambda: True, poll=0.01, retry_pause=0.02)
    assert time.monotonic() - t0 < 0.3  # retried while valid, not after
    assert flaky.sent == []


class FakeIface:
    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = errors

    def has(self, vip: ipaddress.IPv4Interface) -> bool:
        if self.errors:
            raise self.errors.pop(0)
        return True


def test_a_failed_gratuitous_arp_is_retried_in_the_background(flaky: type[FlakySocket],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arp, "RETRY_PAUSE", 0.02)
    flaky.open_errors = [OSError(errno.EMFILE, "Too many open files")]  # the first announce cannot open
    host = Host.__new__(Host)
    host.ifname = "eth0"
    host.iface = FakeIface([NetlinkError(errno.ENOBUFS, "No buffer space available")])  # nor ask netlink
    valid = threading.Event()
    valid.set()
    before = loops.ERRORS.count("arp-announce") + loops.ERRORS.count("arp-defence")
    try:
        host.announce(ipaddress.IPv4Interface("10.77.0.100/24"), valid.is_set)  # does not raise
        assert wait_for(lambda: len(flaky.sent) >= 2, timeout=1.0)
    finally:
        valid.clear()
    assert loops.ERRORS.count("arp-announce") + loops.ERRORS.count("arp-defence") - before == 2


# --- the counter itself ------------------------------------------------------------------------------------


def test_errors_are_counted_every_time_but_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = [100.0]
    reg = loops.LoopErrors(log_every=60.0, clock=lambda: clock[0])
    logger = logging.getLogger("test-loops")
    with caplog.at_level(logging.ERROR, logger="test-loops"):
        for _ in range(5):
            reg.record("keepalive", OSError(errno.ENOSPC, "No space left on device"), "home", logger)
        reg.record("keepalive", RuntimeError("other"), "home", logger)
        clock[0] += 61
        reg.record("keepalive", OSError(errno.ENOSPC, "No space left on device"), "home", logger)
    assert reg.count("keepalive") == 7 and reg.total() == 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "4 more like it" in lines[2]
    assert all(r.exc_info for r in caplog.records)
    snap = reg.snapshot()
    assert snap["keepalive"]["count"] == 7 and snap["keepalive"]["last"].startswith("home: OSError")


def test_guarded_loop_goes_on_after_an_exception_and_ends_on_stop() -> None:
    stop = threading.Event()
    passes: list[int] = []

    def body() -> None:
        passes.append(1)
        if len(passes) == 1:
            raise OSError(errno.EMFILE, "Too many open files")
        if len(passes) == 3:
            stop.set()

    before = loops.ERRORS.count("test-loop")
    loops.guarded_loop("test-loop", body, stop, interval=0.001)
    assert len(passes) == 3 and loops.ERRORS.count("test-loop") - before == 1


def test_a_keepalive_without_an_answer_is_retried_before_the_next_interval(keepers: list[LeaseKeeper]) -> None:
    class OnceDown(FakeStore):
        def keepalive(self, lease_id: int, client: object = None) -> int:
            with self._lock:
                self.calls[lease_id] += 1
                first = self.calls[lease_id] == 1
            if first:
                raise StoreError("etcd keepalive timed out")  # e.g. during a leader election
            return self.ttl

    store = OnceDown(ttl=40)  # interval TTL/4 = 10 s: only a retry can come within the test
    keeper = LeaseKeeper(store)
    h = Holding(vfs="a", lease_id=9, ttl=40, granted_at=time.monotonic(), drop=lambda: None)
    first_deadline = h.deadline
    keeper.add(h)
    keeper.start()
    keepers.append(keeper)
    assert wait_for(lambda: store.calls[9] >= 2, timeout=5.0)  # not 10 s later
    assert wait_for(lambda: h.deadline > first_deadline, timeout=5.0)  # the retry's ack counted
    assert not h.fenced


def test_keepalives_without_an_answer_in_a_row_back_off(keepers: list[LeaseKeeper]) -> None:
    store = FakeStore(ttl=40, down=True)  # etcd down: every keepalive fails at once
    keeper = LeaseKeeper(store)
    keeper.add_plain(5, 40, lambda _lease: None)  # like the node lease, kept alive forever
    keeper.start()
    keepers.append(keeper)
    time.sleep(1.0)
    # 0.05, 0.1, 0.2, 0.4, 0.8 s apart: about 5 in the first second, not one every 0.05 s (20)
    assert 2 <= store.calls[5] <= 7, store.calls[5]
