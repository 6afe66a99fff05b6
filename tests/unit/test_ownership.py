import threading
import time

import pytest

from controller.ownership import Fenced, Holding, fence_margin, guard_deadline
from controller.status import make_status, same


def holding(ttl=2, granted_at=None, dropped=None):
    sink = dropped if dropped is not None else []
    return Holding(vfs="home", lease_id=1, ttl=ttl, granted_at=time.monotonic() if granted_at is None else granted_at,
                   drop=lambda: sink.append("down"))


def test_deadline_is_send_time_plus_ttl_minus_margin():
    h = holding(ttl=4, granted_at=100.0)
    assert h.deadline == pytest.approx(100.0 + 4 - fence_margin(4))
    h.acked(sent_at=101.0, ttl=4)
    assert h.deadline == pytest.approx(101.0 + 4 - fence_margin(4))
    h.acked(sent_at=100.5, ttl=4)  # an older send acknowledged late never moves it back
    assert h.deadline == pytest.approx(101.0 + 4 - fence_margin(4))


def test_margin_is_below_ttl():
    for ttl in (1, 2, 5, 30):
        assert 0 < fence_margin(ttl) < ttl


def test_guarded_refuses_after_deadline():
    h = holding(ttl=1, granted_at=time.monotonic() - 5)
    ran = []
    with pytest.raises(Fenced):
        h.guarded(lambda: ran.append(1))
    assert ran == []


def test_retired_holding_is_no_longer_valid_and_never_raises():
    h = holding()
    assert h.valid()
    h.retire()
    assert not h.valid() and not h.fenced
    ran = []
    with pytest.raises(Fenced, match="being released"):
        h.guarded(lambda: ran.append(1))
    assert ran == []


def test_fence_is_final_and_drops_once():
    dropped = []
    h = holding(dropped=dropped)
    assert h.fence("test")
    assert not h.fence("again")
    assert dropped == ["down"]
    with pytest.raises(Fenced):
        h.guarded(lambda: None)
    h.acked(time.monotonic(), 2)
    assert h.fenced


def test_fence_waits_for_a_raise_in_progress_then_drops():
    events = []
    h = Holding(vfs="home", lease_id=1, ttl=5, granted_at=time.monotonic(), drop=lambda: events.append("drop"))
    started = threading.Event()

    def slow_raise():
        started.set()
        time.sleep(0.2)
        events.append("raise")

    t = threading.Thread(target=h.guarded, args=(slow_raise,))
    t.start()
    started.wait()
    h.fence("test")
    t.join()
    assert events == ["raise", "drop"]


def test_status_dedupe_ignores_timestamp():
    a = {**make_status("serving", "node-a", 5), "updated": "x"}
    assert same(a, make_status("serving", "node-a", 5))
    assert not same(a, make_status("serving", "node-b", 5))
    assert not same(None, a)


def test_valid_turns_false_at_the_deadline_even_before_any_fence():
    h = holding(ttl=1, granted_at=time.monotonic())
    assert h.valid()
    late = holding(ttl=1, granted_at=time.monotonic() - 5)  # e.g. a thread resuming after SIGSTOP
    assert not late.fenced and not late.valid()
    h.fence("test")
    assert not h.valid()


def test_guard_acts_after_the_agent_but_before_the_lease_can_expire():
    for ttl in (1, 2, 5, 30):
        h = holding(ttl=ttl, granted_at=100.0)
        earliest_expiry = 100.0 + ttl  # etcd measures from receipt, which is after the send at 100.0
        assert h.deadline < guard_deadline(h) < earliest_expiry
        assert guard_deadline(h) - h.deadline >= 0.15
