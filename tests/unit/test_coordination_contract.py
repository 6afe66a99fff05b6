"""The KeyStore contract (controller/coordination.py): one set of tests, two implementations.

Every test runs against MemStore (on a fake clock) and against EtcdStore talking to a real etcd on
loopback (tests/unit/conftest.py; skipped only without the etcd binary). What differs between the
two is confined to the Env adapter below:
- how time passes: MemStore's fake clock is advanced (and expire() called); with etcd we sleep;
- how long to wait for what a real etcd does asynchronously (watch delivery, lease expiry):
  MemStore delivers synchronously, so it gets no patience at all.
The etcd tests share one etcd per module; each test keeps to its own key prefix, and its keys are
deleted afterwards, so no lease of one test can expire (and move the revision) inside another.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from controller.coordination import Claim, Coordination, KeyStore
from controller.keyspace import Keyspace
from controller.memstore import MemStore
from controller.store import EtcdStore, StoreError, WatchBatch
from controller.view import KeyRecord

Event = tuple[str, KeyRecord | None, int]
ETCD_PATIENCE = 5.0  # seconds a real etcd may take to deliver or expire (lease expiry: TTL + ~0.5 s)
ETCD_QUIET = 0.3  # seconds to wait for something a real etcd must *not* deliver
_numbers = itertools.count(1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    """One implementation under test, and how time passes for it."""

    store: KeyStore
    prefix: str  # this test's keys
    sleep: Callable[[float], None]  # let `seconds` pass (and leases expire)
    another: Callable[[], KeyStore]  # another client of the same store
    compact: Callable[[int], None]  # compact the store's history up to a revision (admin)
    patience: float  # how long to wait for something asynchronous
    quiet: float  # how long to wait to be sure that nothing more comes

    def key(self, name: str) -> str:
        return self.prefix + name

    def revision(self) -> int:
        return self.store.load(self.prefix)[0]

    def eventually(self, pred: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + self.patience
        while not pred():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True


@pytest.fixture(params=["memstore", "etcd"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    prefix = f"/contract/{next(_numbers)}/"
    if request.param == "memstore":
        clock = FakeClock()
        admin = MemStore(clock)  # its own client: expire() and compact() work after the test's close()

        def sleep(seconds: float) -> None:
            clock.now += seconds
            admin.expire()

        yield Env(admin.connect(), prefix, sleep, admin.connect, admin.compact, patience=0.0, quiet=0.0)
        return
    url = request.getfixturevalue("etcd_module")
    opened: list[EtcdStore] = []

    def connect() -> EtcdStore:
        opened.append(EtcdStore(url))
        return opened[-1]

    etcd_admin = connect()  # cleans up after the test; compacts

    def compact(revision: int) -> None:
        client = etcd_admin.new_client(2.0)
        try:
            client.compact(revision)
        finally:
            client.close()

    try:
        yield Env(connect(), prefix, time.sleep, connect, compact, patience=ETCD_PATIENCE, quiet=ETCD_QUIET)
    finally:
        for key, record in etcd_admin.load(prefix)[1].items():  # no leased key left whose expiry would move
            if record.lease:  # the next test's revisions (the others are harmless under their prefix)
                etcd_admin.delete(key)
        for store in opened:
            store.close()


@dataclass
class Batches:
    """What a watch delivered; wait() polls, as a real etcd delivers on its own thread."""

    items: list[WatchBatch | Exception] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, item: WatchBatch | Exception) -> None:
        with self.lock:
            self.items.append(item)

    def batches(self) -> list[WatchBatch]:
        with self.lock:
            return [i for i in self.items if isinstance(i, WatchBatch) and i.events]

    def errors(self) -> list[Exception]:
        with self.lock:
            return [i for i in self.items if isinstance(i, Exception)]

    def events(self) -> list[Event]:
        return [e for b in self.batches() for e in b.events]

    def wait(self, env: Env, count: int) -> list[Event]:
        """Wait for `count` events in all; then `env.quiet` more seconds for any extra one."""
        env.eventually(lambda: len(self.events()) >= count or bool(self.errors()))
        time.sleep(env.quiet)
        return self.events()


def watch(env: Env, store: KeyStore, prefix: str, start: int) -> Batches:
    got = Batches()
    store.watch(prefix, start, got)
    return got


def test_both_implement_the_protocol(env: Env) -> None:
    assert isinstance(env.store, KeyStore)
    assert isinstance(env.store.timeout, float) and env.store.timeout > 0


def test_one_revision_per_write_shared_by_the_changes_of_a_transaction(env: Env) -> None:
    s, k = env.store, env.key
    rev0, records = s.load(env.prefix)
    assert records == {} and rev0 >= 1
    s.put(k("a"), "1")
    rev1, records = s.load(env.prefix)
    assert rev1 == rev0 + 1
    assert records == {k("a"): KeyRecord(b"1", rev1, rev1, 0)} and s.get(k("a")) == records[k("a")]
    s.put(k("a"), b"2")  # bytes too; the same key: create_revision stays, mod_revision moves
    assert s.get(k("a")) == KeyRecord(b"2", rev1, rev1 + 1, 0)
    s.delete(k("absent"))  # changes nothing: no revision
    assert env.revision() == rev1 + 1
    assert s.put_if_epoch(k("owner"), 0, {k("b"): "x", k("c"): "y"})  # one transaction, two keys
    rev3 = env.revision()
    assert rev3 == rev1 + 2
    assert s.get(k("b")) == KeyRecord(b"x", rev3, rev3, 0) and s.get(k("c")) == KeyRecord(b"y", rev3, rev3, 0)
    s.delete(k("a"))
    assert s.get(k("a")) is None and env.revision() == rev3 + 1
    s.put(k("a"), "3")  # created anew: a new create_revision
    assert s.get(k("a")) == KeyRecord(b"3", rev3 + 2, rev3 + 2, 0)
    # The header revision is the store's, also for a prefix with no key.
    assert s.load(k("nothing/")) == (rev3 + 2, {})


def test_records_carry_their_lease_and_a_put_without_one_unbinds_it(env: Env) -> None:
    s, k = env.store, env.key
    lease, _ttl = s.grant(5)
    try:
        s.put(k("leased"), "1", lease=lease)
        rec = s.load(env.prefix)[1][k("leased")]
        assert rec.lease == lease and rec.value == b"1"
        s.put(k("leased"), "2")  # lease None: the key is bound to no lease any more
        assert s.get(k("leased")) == KeyRecord(b"2", rec.create_revision, rec.mod_revision + 1, 0)
    finally:
        s.revoke(lease)
    assert s.get(k("leased")) is not None  # no longer the lease's: its revoke left it alone
    rev = env.revision()
    with pytest.raises(StoreError):
        s.put(k("late"), "x", lease=lease)  # the lease is gone: refused, nothing written
    assert s.get(k("late")) is None and env.revision() == rev


def test_create_owner(env: Env) -> None:
    s, k = env.store, env.key
    owner, status = k("owner"), k("status")
    s.put(status, "old")
    seen = s.get(status)
    assert seen is not None
    lease, _ = s.grant(5)
    try:
        created = s.create_owner(owner, "me", lease, {status: "new", k("extra"): "e"}, read=status,
                                 unchanged={status: seen.mod_revision, k("spec"): 0})
        assert created is not None
        rev = env.revision()
        # The epoch is the owner key's create_revision: the transaction's one revision.
        assert s.get(owner) == KeyRecord(b"me", created.epoch, created.epoch, lease) and created.epoch == rev
        assert s.get(status) == KeyRecord(b"new", seen.create_revision, rev, 0)
        assert s.get(k("extra")) == KeyRecord(b"e", rev, rev, 0)
        assert created.read == b"new"  # as of the epoch's revision: after `also` was applied

        # Present: nothing is written.
        assert s.create_owner(owner, "other", lease, {status: "x"}) is None
        assert env.revision() == rev and s.get(status).value == b"new"  # type: ignore[union-attr]
    finally:
        s.revoke(lease)
    assert s.get(owner) is None  # revoked with its lease; the unleased keys stay
    assert s.get(status) is not None and s.get(k("extra")) is not None

    now = s.get(status)
    assert now is not None
    lease, _ = s.grant(5)
    try:
        rev = env.revision()
        assert s.create_owner(owner, "me", lease, {}, unchanged={status: seen.mod_revision}) is None  # stale
        assert s.create_owner(owner, "me", lease, {}, unchanged={status: 0}) is None  # 0: must be absent
        assert env.revision() == rev and s.get(owner) is None
        created = s.create_owner(owner, "me", lease, {}, read=k("absent"),
                                 unchanged={status: now.mod_revision, k("absent"): 0})
        assert created is not None and created.read is None and created.epoch == rev + 1
        again = s.create_owner(k("owner2"), "me", lease, {}, read=status)
        assert again is not None and again.read == b"new"  # a key the transaction did not write
        with pytest.raises(StoreError):  # etcd refuses a key put twice in one transaction
            s.create_owner(k("owner3"), "me", lease, {k("owner3"): "x"})
        assert s.get(k("owner3")) is None
    finally:
        s.revoke(lease)
    with pytest.raises(StoreError):  # the lease is gone
        s.create_owner(k("owner4"), "me", lease, {k("more"): "x"})
    assert s.get(k("owner4")) is None and s.get(k("more")) is None
    s.put(k("owner5"), "someone")
    assert s.create_owner(k("owner5"), "me", lease, {}) is None  # a failed compare: no lease check


def test_put_if_epoch(env: Env) -> None:
    s, k = env.store, env.key
    owner, status = k("owner"), k("status")
    assert s.put_if_epoch(owner, 0, {status: "1"})  # epoch 0: iff there is no owner
    lease, _ = s.grant(5)
    try:
        created = s.create_owner(owner, "me", lease, {})
        assert created is not None
        rev = env.revision()
        assert not s.put_if_epoch(owner, 0, {status: "2"})  # there is one now
        assert not s.put_if_epoch(owner, created.epoch + 1, {status: "2"})
        assert not s.put_if_epoch(owner, created.epoch - 1, {status: "2"}, delete_owner=True)
        assert env.revision() == rev and s.get(status).value == b"1"  # type: ignore[union-attr]
        assert s.put_if_epoch(owner, created.epoch, {status: "3"})
        assert s.get(status).value == b"3" and s.get(owner) is not None  # type: ignore[union-attr]
        with pytest.raises(StoreError):  # the owner key both put and deleted: etcd refuses it
            s.put_if_epoch(owner, created.epoch, {owner: "x"}, delete_owner=True)
        rev = env.revision()
        assert s.put_if_epoch(owner, created.epoch, {status: "4"}, delete_owner=True)
        assert s.get(owner) is None and s.get(status) == KeyRecord(b"4", s.get(status).create_revision,  # type: ignore[union-attr]
                                                                   rev + 1, 0)
        assert env.revision() == rev + 1  # the status and the owner's delete: one revision
        assert not s.put_if_epoch(owner, created.epoch, {status: "5"})  # that epoch is over
    finally:
        s.revoke(lease)


def test_delete_if_no_owner(env: Env) -> None:
    s, k = env.store, env.key
    owner, status, other, spec = k("owner"), k("status"), k("other"), k("spec")
    s.put(status, "s")
    s.put(other, "o")
    lease, _ = s.grant(5)
    try:
        assert s.create_owner(owner, "me", lease, {}) is not None
        assert not s.delete_if_no_owner(owner, [status])
        assert s.get(status) is not None
    finally:
        s.revoke(lease)
    s.put(spec, "{}")
    assert not s.delete_if_no_owner(owner, [status], absent=[spec])  # a spec was written again
    assert s.get(status) is not None
    s.delete(spec)
    rev = env.revision()
    assert s.delete_if_no_owner(owner, [status, other, k("never")], absent=[spec])
    assert s.get(status) is None and s.get(other) is None and env.revision() == rev + 1
    assert s.delete_if_no_owner(owner, [status])  # applied, but deleted nothing: no revision
    assert env.revision() == rev + 1


def test_put_if_unchanged(env: Env) -> None:
    s, key = env.store, env.key("k")
    assert s.put_if_unchanged(key, "1", None)  # None: iff absent
    assert not s.put_if_unchanged(key, "2", None)
    seen = s.get(key)
    assert seen is not None
    s.put(key, "other")
    assert not s.put_if_unchanged(key, "3", seen)  # changed since seen
    seen = s.get(key)
    assert seen is not None
    assert s.put_if_unchanged(key, "4", seen)
    assert s.get(key) == KeyRecord(b"4", seen.create_revision, seen.mod_revision + 1, 0)
    now = s.get(key)
    s.delete(key)
    assert not s.put_if_unchanged(key, "5", now)  # gone: not as seen either
    assert s.get(key) is None


def test_put_all_if_unchanged_is_all_or_none(env: Env) -> None:
    s, a, b = env.store, env.key("a"), env.key("b")
    assert s.put_all_if_unchanged([(a, "1", None), (b, "1", None)])
    seen_a, seen_b = s.get(a), s.get(b)
    assert seen_a is not None and seen_b is not None
    assert seen_a.mod_revision == seen_b.mod_revision  # one transaction, one revision
    s.put(b, "other")
    assert not s.put_all_if_unchanged([(a, "2", seen_a), (b, "2", seen_b)])  # b changed: nothing written
    assert s.get(a) == seen_a and s.get(b).value == b"other"
    fresh_b = s.get(b)
    assert s.put_all_if_unchanged([(a, "3", seen_a), (b, "3", fresh_b)])
    assert (s.get(a).value, s.get(b).value) == (b"3", b"3")


def test_grant_keepalive_revoke(env: Env) -> None:
    s, k = env.store, env.key
    lease, ttl = s.grant(5)
    assert lease != 0 and ttl == 5
    assert s.keepalive(lease) == ttl
    client = s.new_client(1.0)
    assert s.keepalive(lease, client) == ttl  # through the extra connection, as the lease keeper does
    s.put(k("a"), "1", lease=lease)
    s.put(k("b"), "2", lease=lease)
    s.put(k("c"), "3")
    rev = env.revision()
    got = watch(env, s, env.prefix, rev + 1)
    s.revoke(lease)
    assert env.revision() == rev + 1  # both keys in one revision
    assert s.get(k("a")) is None and s.get(k("b")) is None and s.get(k("c")) is not None
    assert sorted(got.wait(env, 2)) == [(k("a"), None, rev + 1), (k("b"), None, rev + 1)]
    assert len(got.batches()) == 1 and got.errors() == []
    assert s.keepalive(lease) <= 0 and s.keepalive(lease, client) <= 0
    s.revoke(lease)  # gone already: no error
    assert s.keepalive(0x5EED_0000_0001) <= 0  # never granted
    assert env.revision() == rev + 1


def test_a_lease_without_keepalive_expires_and_its_keys_go_in_one_revision(env: Env) -> None:
    s, k = env.store, env.key
    lease, ttl = s.grant(2)
    assert ttl == 2
    s.put(k("a"), "1", lease=lease)
    s.put(k("b"), "2", lease=lease)
    s.put(k("c"), "3")
    rev = env.revision()
    got = watch(env, s, env.prefix, rev + 1)
    env.sleep(1.2)
    assert s.keepalive(lease) == ttl  # renewed for a full TTL from now
    env.sleep(1.2)  # past the grant's TTL, not the keepalive's (0.8 s to spare on a loaded machine)
    assert s.get(k("a")) is not None and s.get(k("b")) is not None
    env.sleep(ttl)  # a TTL since the last keepalive
    assert env.eventually(lambda: s.get(k("a")) is None and s.get(k("b")) is None)
    assert s.get(k("c")) is not None
    assert sorted(got.wait(env, 2)) == [(k("a"), None, rev + 1), (k("b"), None, rev + 1)]
    assert got.errors() == []
    assert env.revision() == rev + 1
    assert s.keepalive(lease) <= 0  # expired: gone, like a revoked lease


def test_watch_replays_history_then_streams_live_changes(env: Env) -> None:
    s, k = env.store, env.key
    w = k("w/")
    s.put(w + "a", "1")
    r1 = env.revision()
    s.put(w + "b", "2")
    s.delete(w + "a")
    s.put(k("elsewhere"), "x")  # not under the watched prefix
    got = watch(env, s, w, r1)
    replayed = got.wait(env, 3)
    assert replayed == [(w + "a", KeyRecord(b"1", r1, r1, 0), r1),
                        (w + "b", KeyRecord(b"2", r1 + 1, r1 + 1, 0), r1 + 1),
                        (w + "a", None, r1 + 2)]  # a delete: at the delete's revision
    for batch in got.batches():  # the header: the store's revision, never behind the events
        assert batch.revision >= max(rev for _k, _r, rev in batch.events)

    lease, _ = s.grant(5)
    try:
        created = s.create_owner(w + "owner", "me", lease, {w + "status": "up"})
        assert created is not None
        assert s.put_if_epoch(w + "owner", created.epoch, {w + "status": "down"}, delete_owner=True)
        events = got.wait(env, 7)
    finally:
        s.revoke(lease)  # nothing left to delete: no event
    e = created.epoch
    assert events[3:] == [(w + "owner", KeyRecord(b"me", e, e, lease), e),
                          (w + "status", KeyRecord(b"up", e, e, 0), e),
                          (w + "status", KeyRecord(b"down", e, e + 1, 0), e + 1),
                          (w + "owner", None, e + 1)]
    # Each transaction's events came in one batch, sharing its revision.
    by_revision = {rev: [i for i, b in enumerate(got.batches()) if any(r == rev for *_x, r in b.events)]
                   for rev in (e, e + 1)}
    assert all(len(batches) == 1 for batches in by_revision.values())
    assert got.errors() == []


def test_watch_from_now_from_the_future_and_a_new_watch_replacing_the_old(env: Env) -> None:
    s, k = env.store, env.key
    w = k("w/")
    s.put(w + "old", "0")
    first = watch(env, s, w, 0)  # 0: from the next change on, no replay
    s.put(w + "a", "1")
    r = env.revision()
    assert first.wait(env, 1) == [(w + "a", KeyRecord(b"1", r, r, 0), r)]
    second = watch(env, s, w, r + 2)  # ends the first, silently
    s.put(w + "b", "2")  # r + 1: below the start
    s.put(w + "c", "3")  # r + 2
    assert second.wait(env, 1) == [(w + "c", KeyRecord(b"3", r + 2, r + 2, 0), r + 2)]
    assert len(first.events()) == 1  # nothing after it was replaced
    assert first.errors() == [] and second.errors() == []


def test_catch_up_comes_in_batches_of_at_most_1000_revisions_with_the_current_header(env: Env) -> None:
    s, w = env.store, env.key("w/")
    start = env.revision() + 1
    for i in range(1001):
        s.put(f"{w}{i:04}", "x")
    s.delete(f"{w}0000")
    final = env.revision()
    got = watch(env, s, w, start)
    events = got.wait(env, 1002)
    assert [rev for _k, _r, rev in events] == list(range(start, final + 1))
    assert events[-1] == (f"{w}0000", None, final)
    batches = got.batches()
    assert [len(b.events) for b in batches] == [1000, 2]
    assert {b.revision for b in batches} == {final}  # ahead of the first batch's events


def test_a_watch_from_a_compacted_revision_ends_with_a_compacted_error(env: Env) -> None:
    s, w = env.store, env.key("w/")
    s.put(w + "a", "1")
    r = env.revision()
    s.put(w + "b", "2")
    env.compact(r + 1)
    got = Batches()
    try:
        s.watch(w, r, got)
    except StoreError as exc:  # allowed by the contract: refused at once
        assert "Compacted" in str(exc)
    else:
        assert env.eventually(lambda: bool(got.errors()))
        [error] = got.errors()
        assert "Compacted" in type(error).__name__  # what controller/watcher.py recognises
        assert got.events() == []
    again = watch(env, s, w, r + 1)  # the compacted revision itself can still be watched
    assert again.wait(env, 1) == [(w + "b", KeyRecord(b"2", r + 1, r + 1, 0), r + 1)]


def test_two_clients_share_one_store_and_each_has_its_own_watch(env: Env) -> None:
    s, k = env.store, env.key
    other = env.another()
    w = k("w/")
    mine = watch(env, s, w, 0)
    theirs = watch(env, other, w, 0)
    lease, ttl = s.grant(5)
    try:
        assert other.keepalive(lease) == ttl
        other.put(w + "a", "1", lease=lease)
        rev = env.revision()
        expected = [(w + "a", KeyRecord(b"1", rev, rev, lease), rev)]
        assert mine.wait(env, 1) == expected and theirs.wait(env, 1) == expected
    finally:
        other.revoke(lease)
    assert s.get(w + "a") is None


def test_close_ends_the_watch_silently(env: Env) -> None:
    s, w = env.store, env.key("w/")
    other = env.another()
    got = watch(env, s, w, 0)
    s.close()
    other.put(w + "a", "1")
    time.sleep(env.quiet)
    assert got.items == []
    assert other.get(w + "a") is not None
    with pytest.raises(StoreError):
        s.get(w + "a")


def test_what_etcd_refuses_is_refused_and_writes_nothing(env: Env) -> None:
    s, k = env.store, env.key
    lease, _ = s.grant(5)
    try:
        assert s.delete_if_no_owner(k("owner"), [k(f"d{i}") for i in range(128)])  # at the limit
        with pytest.raises(StoreError):  # too many operations (128 per branch)
            s.delete_if_no_owner(k("owner"), [k(f"d{i}") for i in range(129)])
        with pytest.raises(StoreError):  # too many compares, even with nothing to write
            s.delete_if_no_owner(k("owner"), [], absent=[k(f"a{i}") for i in range(128)])
        also = {k(f"s{i}"): "x" for i in range(125)}
        with pytest.raises(StoreError):  # 126 puts + the read of `read` + the read of the owner key
            s.create_owner(k("owner"), "me", lease, {**also, k("one-more"): "x"}, read=k("r"))
        s.put(k("owner"), "someone")
        with pytest.raises(StoreError):  # checked before the compare: refused even though it fails
            s.create_owner(k("owner"), "me", lease, {**also, k("one-more"): "x"}, read=k("r"))
        s.delete(k("owner"))
        assert s.create_owner(k("owner"), "me", lease, also, read=k("r")) is not None  # 128: at the limit
        rev = env.revision()
        with pytest.raises(StoreError):  # over etcd's 1.5 MiB request limit
            s.put(k("big"), "x" * (1536 * 1024 + 1))
        assert s.get(k("big")) is None and env.revision() == rev
    finally:
        s.revoke(lease)


def test_a_lease_stream_answers_each_request_in_order_and_a_gone_lease_with_no_ttl(env: Env) -> None:
    s = env.store
    a, _ = s.grant(5)
    b, _ = s.grant(5)
    got: list[tuple[int, int, int]] = []
    lock = threading.Lock()

    def on_answer(lease: int, ttl: int, generation: int) -> None:
        with lock:
            got.append((lease, ttl, generation))

    stream = s.lease_stream(on_answer, lambda _generation: None)
    generations: list[int] = []
    try:
        for lease in (a, b, a):
            stream.send(lease, generations.append)
        assert env.eventually(lambda: len(got) == 3)
        assert [lease for lease, _, _ in got] == [a, b, a]  # the order of the requests
        assert all(ttl > 0 for _, ttl, _ in got) and [g for _, _, g in got] == generations
        s.revoke(a)
        stream.send(a, generations.append)
        assert env.eventually(lambda: len(got) == 4)
        assert got[3][0] == a and got[3][1] <= 0  # gone: etcd answers TTL 0 on the stream too
    finally:
        stream.close()


# --- the domain layer (Coordination) over each KeyStore: the same guarantees on both -------------

def coordination(env: Env, store: KeyStore | None = None) -> Coordination:
    return Coordination(store or env.store, Keyspace(env.prefix))


def test_claim_is_won_by_one_node_and_carries_its_epoch_and_the_epoch_base(env: Env) -> None:
    a, b = coordination(env), coordination(env, env.another())
    ks = a.keyspace
    env.store.put(ks.epoch_base, "40")
    leases = [a.grant(5)[0], b.grant(5)[0]]
    try:
        won = a.claim("home", {"node": "node-a"}, leases[0], {"phase": "acquiring"}, 0)
        lost = b.claim("home", {"node": "node-b"}, leases[1], {"phase": "acquiring"}, 0)
        assert won == Claim(epoch=won.epoch, epoch_base=40) and lost is None
        owner = env.store.get(ks.owner("home"))
        assert owner is not None and owner.create_revision == won.epoch and owner.lease == leases[0]
        assert json.loads(owner.value) == {"node": "node-a"}
        status = env.store.get(ks.status("home"))
        assert status is not None and status.mod_revision == won.epoch  # one transaction
        assert json.loads(status.value)["phase"] == "acquiring"
    finally:
        for lease in leases:
            a.revoke(lease)


def test_claim_refuses_a_status_changed_since_it_was_read(env: Env) -> None:
    c = coordination(env)
    ks = c.keyspace
    env.store.put(ks.status("home"), json.dumps({"node": "node-b", "disk_at_risk": True}))
    seen = env.store.get(ks.status("home"))
    assert seen is not None
    lease = c.grant(5)[0]
    try:
        before = env.revision()
        assert c.claim("home", {"node": "node-a"}, lease, {"phase": "acquiring"}, 0) is None  # "absent": it is not
        assert c.claim("home", {"node": "node-a"}, lease, {"phase": "acquiring"}, seen.mod_revision - 1) is None
        assert env.revision() == before and env.store.get(ks.owner("home")) is None  # nothing written
        assert c.claim("home", {"node": "node-a"}, lease, {"phase": "acquiring"}, seen.mod_revision) is not None
    finally:
        c.revoke(lease)


def test_status_writes_and_release_are_guarded_by_the_epoch(env: Env) -> None:
    c = coordination(env)
    ks = c.keyspace
    assert c.write_status("home", 0, {"phase": "unplaced"})  # no owner: epoch 0 holds
    lease = c.grant(5)[0]
    try:
        claim = c.claim("home", {"node": "node-a"}, lease, {"phase": "acquiring"},
                        env.store.get(ks.status("home")).mod_revision)  # type: ignore[union-attr]
        assert claim is not None
        assert not c.write_status("home", 0, {"phase": "unplaced"})  # an owner exists now
        assert not c.write_status("home", claim.epoch - 1, {"phase": "stale"})
        assert not c.release("home", claim.epoch - 1, {"phase": "stale"})
        assert env.store.get(ks.owner("home")) is not None
        assert c.write_status("home", claim.epoch, {"phase": "serving"})
        assert json.loads(env.store.get(ks.status("home")).value)["phase"] == "serving"  # type: ignore[union-attr]
        assert c.release("home", claim.epoch, {"phase": "unplaced", "node": None})
        assert env.store.get(ks.owner("home")) is None
        assert json.loads(env.store.get(ks.status("home")).value)["node"] is None  # type: ignore[union-attr]
        assert not c.release("home", claim.epoch, {"phase": "again"})  # its epoch is over
    finally:
        c.revoke(lease)


def test_an_expired_claim_frees_the_vfs_for_a_new_epoch(env: Env) -> None:
    c = coordination(env)
    lease = c.grant(1)[0]
    first = c.claim("home", {"node": "node-a"}, lease, {"phase": "acquiring"}, 0)
    assert first is not None
    env.sleep(3.0)  # no keepalive: the lease and with it the owner key expire
    assert env.eventually(lambda: env.store.get(c.keyspace.owner("home")) is None)
    status_rev = env.store.get(c.keyspace.status("home")).mod_revision  # type: ignore[union-attr]
    lease = c.grant(5)[0]
    try:
        second = c.claim("home", {"node": "node-b"}, lease, {"phase": "acquiring"}, status_rev)
        assert second is not None and second.epoch > first.epoch and second.epoch_base == 0
    finally:
        c.revoke(lease)


def test_a_deleted_vfs_status_goes_only_without_owner_and_spec(env: Env) -> None:
    c = coordination(env)
    ks = c.keyspace
    env.store.put(ks.spec("home"), "{}")
    assert c.write_status("home", 0, {"phase": "unplaced"})
    assert not c.remove_status("home")  # the spec is there
    env.store.delete(ks.spec("home"))
    lease = c.grant(5)[0]
    try:
        claim = c.claim("home", {"node": "node-a"}, lease, {"phase": "acquiring"},
                        env.store.get(ks.status("home")).mod_revision)  # type: ignore[union-attr]
        assert claim is not None and not c.remove_status("home")  # owned
        assert c.release("home", claim.epoch, {"phase": "unplaced", "node": None})
    finally:
        c.revoke(lease)
    assert c.remove_status("home") and env.store.get(ks.status("home")) is None
    assert set(env.store.load(env.prefix)[1]) == set()  # every key was the keyspace's: nothing else written


def test_node_registration_intent_and_epoch_base_go_to_their_keys(env: Env) -> None:
    c = coordination(env)
    ks = c.keyspace
    lease = c.grant(5)[0]
    try:
        c.register("node-a", '{"mac": "x"}', lease)
        assert c.node_record("node-a") == env.store.get(ks.node("node-a"))
        assert c.node_record("node-a").lease == lease  # type: ignore[union-attr]
        c.put_intent("home", "node-b")
        assert env.store.get(ks.intent("home")).value == b"node-b"  # type: ignore[union-attr]
        assert c.epoch_base_record() is None and c.set_epoch_base(7, None)
        seen = c.epoch_base_record()
        assert seen is not None and not c.set_epoch_base(9, None)  # compare-and-set: it exists now
        assert c.set_epoch_base(9, seen) and c.epoch_base_record().value == b"9"  # type: ignore[union-attr]
    finally:
        c.revoke(lease)
    assert c.node_record("node-a") is None  # the registration went with its lease
