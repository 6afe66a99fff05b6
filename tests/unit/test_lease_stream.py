"""Keepalives of all leases over one stream (controller/leasestream.py, LeaseKeeper): the
deadline only ever comes from the send time of the request an answer belongs to, an answer of a
stream given up on never counts, and a hung etcd endpoint holds nobody's keepalives up for long."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from controller import leasestream
from controller.ownership import Holding, LeaseKeeper, fence_margin
from controller.store import EtcdStore
from tests.unit.conftest import needs_etcd
from tests.unit.test_thread_resilience import wait_for


class ManualStream:
    """Requests are kept until the test answers them (etcd answers a stream in order)."""

    def __init__(self, on_answer: Callable[[int, int, int], None], on_ended: Callable[[int], None]) -> None:
        self.on_answer = on_answer
        self.on_ended = on_ended
        self.generation = 1
        self.sent: list[tuple[int, int]] = []  # (lease, generation)
        self.batches: list[list[int]] = []
        self.resets = 0

    def send_many(self, lease_ids: list[int], sending: Callable[[int], None]) -> None:
        sending(self.generation)
        self.sent += [(lease_id, self.generation) for lease_id in lease_ids]
        self.batches.append(list(lease_ids))

    def answer(self, lease_id: int, ttl: int, generation: int | None = None) -> None:
        self.on_answer(lease_id, ttl, self.generation if generation is None else generation)

    def reset(self) -> None:
        self.generation += 1
        self.resets += 1
        self.on_ended(self.generation - 1)

    def close(self) -> None:
        pass


class StreamStore:
    def __init__(self) -> None:
        self.streams: list[ManualStream] = []

    def lease_stream(self, on_answer: Callable[[int, int, int], None],
                     on_ended: Callable[[int], None]) -> ManualStream:
        self.streams.append(ManualStream(on_answer, on_ended))
        return self.streams[-1]


@pytest.fixture
def keeper() -> Iterator[tuple[LeaseKeeper, StreamStore]]:
    store = StreamStore()
    k = LeaseKeeper(store)  # type: ignore[arg-type]
    yield k, store
    k.stop()


def test_an_answer_counts_from_the_oldest_request_of_its_lease(keeper) -> None:
    k, store = keeper
    h = Holding(vfs="a", lease_id=7, ttl=40, granted_at=time.monotonic(), drop=lambda: None)
    k.add(h)
    k._keepalive_pass({})  # sends the first keepalive (interval 10 s: nothing else is due)
    first_sent = k._inflight[7][0][1]
    k._keepalive_pass({})  # due again at once (empty schedule): a second request
    assert len(k._inflight[7]) == 2
    store.streams[0].answer(7, 40)
    assert h.deadline == pytest.approx(first_sent + 40 - fence_margin(40))  # the first send's time
    assert len(k._inflight[7]) == 1


def test_an_answer_of_a_stream_given_up_on_never_counts(keeper) -> None:
    k, store = keeper
    h = Holding(vfs="a", lease_id=7, ttl=1, granted_at=time.monotonic(), drop=lambda: None)
    k.add(h)
    before = h.deadline
    next_due: dict[int, float] = {}
    k._keepalive_pass(next_due)
    stream = store.streams[0]
    old_generation = stream.generation
    time.sleep(0.3)  # longer than the interval (TTL/4, at least 0.1 s) without an answer
    k._keepalive_pass({})  # due: finds the request unanswered and gives the stream up
    assert stream.resets == 1 and not k._inflight.get(7)
    k._keepalive_pass({})  # a new request, on the new generation
    stream.answer(7, 1, generation=old_generation)  # the late answer of the old stream
    assert h.deadline == before  # not counted against the new request's (later) send time
    stream.answer(7, 1)
    assert h.deadline > before


def test_a_slow_stream_that_still_answers_is_not_given_up(keeper) -> None:
    """Under load etcd answers late but in order: resetting then would throw away every lease's answer
    in flight. Only a stream that answers nothing for an interval is stuck."""
    k, store = keeper
    now = time.monotonic()
    for lease in (7, 8):
        k.add(Holding(vfs=f"v{lease}", lease_id=lease, ttl=1, granted_at=now, drop=lambda: None))
    k._keepalive_pass({})  # both sent
    stream = store.streams[0]
    stream.answer(8, 1)
    time.sleep(0.3)  # 7's request is older than its interval (TTL/4 = 0.25 s) ...
    k._keepalive_pass({7: time.monotonic() + 60})  # ... while 8 is sent again
    stream.answer(8, 1)  # ... and answered: the stream moves
    k._keepalive_pass({})
    assert stream.resets == 0
    time.sleep(0.3)  # now nothing at all is answered for an interval: stuck
    k._keepalive_pass({})
    assert stream.resets == 1


def test_leases_fall_into_step_and_go_in_one_batch(keeper) -> None:
    """A round of keepalives is one write: a lease due within half an interval goes along (early is
    safe, its deadline comes from the send time), so leases added at different times fall into step."""
    k, store = keeper
    next_due: dict[int, float] = {}
    t0 = time.monotonic()
    k.add(Holding(vfs="a", lease_id=1, ttl=2, granted_at=t0, drop=lambda: None))
    k._keepalive_pass(next_due)
    stream = store.streams[0]
    time.sleep(0.2)  # b comes 0.2 s later (interval 0.5 s)
    k.add(Holding(vfs="b", lease_id=2, ttl=2, granted_at=time.monotonic(), drop=lambda: None))
    k._keepalive_pass(next_due)
    assert stream.batches == [[1], [2]]
    for lease in (1, 2):
        stream.answer(lease, 2)
    time.sleep(max(0.0, next_due[1] - time.monotonic()) + 0.01)  # a is due, b in 0.2 s
    k._keepalive_pass(next_due)
    assert stream.batches[-1] == [1, 2] and next_due[1] == next_due[2]  # in step from now on
    k._keepalive_pass(next_due)
    assert len(stream.batches) == 3  # nothing due: nothing sent


def test_a_guard_that_does_not_read_delays_no_fence() -> None:
    """Renewals go to the guard on a thread of their own: telling it can wait up to 1 s for pipe room
    (GuardClient.fence_now), and the fence monitor must not wait with it past a deadline."""
    store = StreamStore()
    stuck = threading.Event()

    def slow_guard(_holdings: list[Holding]) -> None:
        stuck.set()
        time.sleep(1.0)

    k = LeaseKeeper(store, on_deadlines=slow_guard)  # type: ignore[arg-type]
    try:
        now = time.monotonic()
        renewed = Holding(vfs="renewed", lease_id=1, ttl=2, granted_at=now, drop=lambda: None)
        doomed = Holding(vfs="doomed", lease_id=2, ttl=1, granted_at=now - 0.65, drop=lambda: None)  # due in 0.1 s
        k.add(renewed)
        k.add(doomed)
        k.start()
        assert wait_for(lambda: store.streams and store.streams[0].sent, timeout=1.0)
        store.streams[0].answer(1, 2)  # renewed's answer: the guard is told, and hangs
        assert stuck.wait(1.0)
        assert wait_for(lambda: doomed.fenced, timeout=0.5)  # not 1 s later, with the guard
        assert doomed.fenced_at_ns and not renewed.fenced
    finally:
        k.stop()


def test_asking_a_stalled_guard_to_fence_delays_no_other_fence() -> None:
    """A VIP that will not go is escalated to the guard (the agent's fence_now waits up to 1 s for pipe
    room); that wait is not the fence monitor's: the next holding due is fenced on time."""
    store = StreamStore()
    asked = threading.Event()

    def drop_fails() -> None:
        raise OSError("netlink: EBUSY")

    def stalled_guard(_h: Holding, _exc: BaseException) -> None:
        asked.set()
        time.sleep(1.0)

    k = LeaseKeeper(store, on_drop_failed=stalled_guard)  # type: ignore[arg-type]
    now = time.monotonic()
    a = Holding(vfs="a", lease_id=1, ttl=1, granted_at=now - 0.65, drop=drop_fails)  # due in 0.05 s
    b = Holding(vfs="b", lease_id=2, ttl=1, granted_at=now - 0.60, drop=lambda: None)  # due in 0.1 s
    try:
        k.add(a)
        k.add(b)
        k.start()
        assert wait_for(lambda: b.fenced, timeout=1.0)
        assert asked.is_set() and a.fenced and a.vip_pending  # a's escalation is still waiting
        assert wait_for(lambda: a.drop_failures >= 3, timeout=1.0)  # and its drop is still retried
    finally:
        k.stop()


def test_a_lease_etcd_no_longer_has_fences_its_holding(keeper) -> None:
    k, store = keeper
    fenced: list[str] = []
    h = Holding(vfs="a", lease_id=7, ttl=40, granted_at=time.monotonic(), drop=lambda: fenced.append("vip down"))
    k.add(h)
    k._keepalive_pass({})
    store.streams[0].answer(7, 0)  # etcd answers TTL 0 for a lease it does not know
    assert h.fenced and fenced == ["vip down"]


# --- against a real etcd ---------------------------------------------------------------------------


def granted(grants: EtcdStore, count: int, ttl: int, spacing: float = 0.0) -> list[Holding]:
    """Holdings of fresh leases, each dated from its grant request (as the agent's are)."""
    holdings = []
    for i in range(count):
        sent_at = time.monotonic()
        lease, got = grants.grant(ttl)
        holdings.append(Holding(vfs=f"v{i}", lease_id=lease, ttl=got, granted_at=sent_at, drop=lambda: None))
        time.sleep(spacing)
    return holdings


@needs_etcd
def test_many_leases_are_kept_alive_over_one_stream(etcd: str) -> None:
    grants = EtcdStore(etcd)
    keeper = LeaseKeeper(EtcdStore(etcd))
    holdings = []
    try:
        keeper.start()
        for i in range(60):  # each kept alive from its grant on, as the agent does
            sent_at = time.monotonic()
            lease, ttl = grants.grant(2)
            holdings.append(Holding(vfs=f"v{i}", lease_id=lease, ttl=ttl, granted_at=sent_at, drop=lambda: None))
            keeper.add(holdings[-1])
            grants.put(f"/t/lease/{i}", "x", lease=lease)
        time.sleep(4.5)  # 2.25 TTLs: without keepalives every lease would be gone
        assert [(h.vfs, h.fence_reason) for h in holdings if h.fenced] == []
        assert len(grants.load("/t/lease/")[1]) == 60
        assert keeper._stream is not None and keeper._stream.generation == 1  # one stream throughout
        grants.revoke(holdings[0].lease_id)
        assert wait_for(lambda: holdings[0].fenced, timeout=3.0)  # etcd's TTL 0 answer on the stream
        assert "lease is gone" in holdings[0].fence_reason
    finally:
        keeper.stop()
        grants.close()


@needs_etcd
def test_a_hung_endpoint_holds_no_keepalive_up_past_a_deadline(etcd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first endpoint accepts connections and never answers (a frozen member): the stream on it
    is given up after one interval and the keepalives go to the next endpoint in time."""
    monkeypatch.setattr(leasestream, "first_endpoint", lambda _count: 0)  # it starts at a random one
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes handshakes; nobody ever reads
    grants = EtcdStore(etcd)
    keeper = LeaseKeeper(EtcdStore([f"http://127.0.0.1:{hole.getsockname()[1]}", etcd]))
    try:
        holdings = granted(grants, 20, ttl=2)
        first = [h.deadline for h in holdings]
        for h in holdings:
            keeper.add(h)
        keeper.start()
        assert wait_for(lambda: all(h.deadline > d for h, d in zip(holdings, first, strict=True)), timeout=1.4)
        assert [h.vfs for h in holdings if h.fenced] == []
        assert keeper._stream is not None and keeper._stream.generation >= 2  # the hung stream was left
    finally:
        keeper.stop()
        grants.close()
        hole.close()


@needs_etcd
def test_a_refusing_endpoint_is_left_for_good_and_no_lease_runs_out(etcd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first endpoint refuses connections (a stopped member on a live host): each stream on it
    dies at once. Its requests are retried at once, on another endpoint, and the keeper stays there."""
    monkeypatch.setattr(leasestream, "first_endpoint", lambda _count: 0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = probe.getsockname()[1]  # closed again below: connecting is refused
    grants = EtcdStore(etcd)
    keeper = LeaseKeeper(EtcdStore([f"http://127.0.0.1:{refused}", etcd]))
    lost: list[int] = []
    holdings: list[Holding] = []
    try:
        holdings = granted(grants, 10, ttl=5, spacing=0.13)  # out of phase, as real holdings are
        plain, _ = grants.grant(5)
        keeper.add_plain(plain, 5, lost.append)
        for h in holdings:
            keeper.add(h)
        keeper.start()
        time.sleep(8.0)  # more than a TTL and a half
        assert [h.vfs for h in holdings if h.fenced] == []
        assert lost == [] and grants.keepalive(plain) > 0
    finally:
        keeper.stop()
        grants.close()


def test_every_address_of_a_named_endpoint_is_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name is looked up once (no DNS wait on the keeper's thread each time), but every address it
    has is tried: `localhost` is usually ::1 first while etcd listens on 127.0.0.1 only."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = server.getsockname()[1]
    lookups: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: str, port_: int, *args: object, **kw: object) -> list:  # type: ignore[type-arg]
        if host == "etcd.test":
            lookups.append(host)
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port_, 0, 0)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port_))]
        return real(host, port_, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    stream = leasestream.H2LeaseStream([("etcd.test", port)], lambda *_a: None, lambda _g: None)
    generations: list[int] = []
    try:
        stream.send_many([1], generations.append)  # connects (to 127.0.0.1, after ::1 refused)
        stream.reset()
        stream.send_many([1], generations.append)  # a new connection: no second lookup
        assert generations == [1, 3] and lookups == ["etcd.test"]
    finally:
        stream.close()
        server.close()


def test_a_renewal_read_before_a_release_never_reaches_the_guard_after_it() -> None:
    """The renewals thread reads a batch; the VFS is released (the guard told to forget it) before the
    batch is sent: the batch must not hold the released VFS at the guard again (the guard would fence
    a VFS this node no longer serves, killing a PID that may have been reused, at its old deadline)."""
    store = StreamStore()
    told: list[tuple[str, str]] = []
    k = LeaseKeeper(store, on_deadlines=lambda hs: told.extend(("hold", h.vfs) for h in hs),  # type: ignore[arg-type]
                    on_removed=lambda h: told.append(("release", h.vfs)))
    h = Holding(vfs="home", lease_id=1, ttl=2, granted_at=time.monotonic(), drop=lambda: None)
    k.add(h)
    told.clear()

    class ReleasedWhileRead(dict):  # the release lands right after the batch was taken
        def values(self):  # type: ignore[override]
            taken = list(super().values())
            remover = threading.Thread(target=k.remove, args=(h,))
            remover.start()
            remover.join(2.0)  # with the fix it does not wait for this batch: nothing sent yet
            return taken

    k._renewed = ReleasedWhileRead({id(h): h})
    k._renewal.set()
    loop = threading.Thread(target=k._renewals_loop)
    loop.start()
    try:
        assert wait_for(lambda: ("release", "home") in told, timeout=2.0)
        time.sleep(0.1)  # the batch has had its chance to go out
    finally:
        k._stop.set()
        k._renewal.set()
        loop.join(2.0)
    assert told == [("release", "home")]


def test_a_new_guard_is_told_every_holding_kept_and_none_released() -> None:
    """Agent._start_guard (a guard replaced): the keeper tells it what it keeps, under the same lock as
    a renewal batch, so a holding released meanwhile is not held at the new guard again; a fenced one
    still kept (its disk or VIP not yet let go) is told too: its deadline has passed, the guard acts."""
    told: list[list[str]] = []
    k = LeaseKeeper(StreamStore(), on_deadlines=lambda hs: told.append(sorted(h.vfs for h in hs)))  # type: ignore[arg-type]
    now = time.monotonic()
    kept, released, fenced = (Holding(vfs=v, lease_id=i, ttl=2, granted_at=now, drop=lambda: None)
                              for i, v in enumerate(("kept", "released", "fenced"), 1))
    for h in (kept, released, fenced):
        k.add(h)
    k.remove(released)
    fenced.fence("test")
    told.clear()
    k.tell_all()
    assert told == [["fenced", "kept"]]
