"""controller/gate.py TakeoverGate: at most `limit` takeovers at once, first choices first."""

from __future__ import annotations

import threading
import time

from controller.gate import TakeoverGate


def test_no_more_than_the_limit_run_at_once() -> None:
    gate = TakeoverGate(3)
    running, peak, lock = [0], [0], threading.Lock()

    def takeover() -> None:
        assert gate.enter(0, timeout=5.0)
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        gate.leave(0)

    threads = [threading.Thread(target=takeover) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3


def test_a_full_gate_times_out_and_a_lower_rank_waits_for_first_choices() -> None:
    gate = TakeoverGate(1)
    assert gate.enter(0, timeout=0.1)
    assert not gate.enter(0, timeout=0.05)  # full: the caller decides again later
    order: list[str] = []
    first = threading.Thread(target=lambda: gate.enter(0, timeout=5.0) and order.append("first"))
    second = threading.Thread(target=lambda: gate.enter(1, timeout=5.0) and order.append("second"))
    second.start()
    time.sleep(0.05)
    first.start()  # arrives later, but a first choice
    time.sleep(0.05)
    gate.leave(0)
    first.join(timeout=2.0)
    assert order == ["first"]  # the slot went to the first choice; the lower rank still waits
    gate.leave(0)
    second.join(timeout=2.0)
    assert order == ["first", "second"]


def test_a_reconciler_takes_over_only_through_the_gate() -> None:
    from tests.unit.test_disk_bound import setup

    _store, rec, mount = setup(None)
    rec.ctx.takeovers = TakeoverGate(1)
    assert rec.ctx.takeovers.enter(0, timeout=0.1)  # another takeover holds the only slot
    assert rec.reconcile() == 0.0  # waited its turn (1 s), then looks again: nothing was done
    assert rec.holding is None and mount.up_at == []
    rec.ctx.takeovers.leave(0)
    rec.reconcile()
    assert rec.holding is not None and len(mount.up_at) == 1
    assert rec.ctx.takeovers.enter(0, timeout=0.1)  # and the slot was given back


def test_a_takeover_gives_its_slot_back_while_it_waits_the_release_bound() -> None:
    from tests.unit.test_disk_bound import setup

    _store, rec, mount = setup({"phase": "serving", "node": "node-b", "epoch": 3}, release_bound=0.6)
    gate = rec.ctx.takeovers = TakeoverGate(1)
    t = threading.Thread(target=rec.reconcile)
    t.start()
    time.sleep(0.2)  # the owner transaction is done; it sleeps out the lost owner's bound
    assert gate.enter(0, timeout=0.2)  # the only slot is free for another takeover meanwhile
    gate.leave(0)
    t.join(timeout=5.0)
    assert rec.holding is not None and len(mount.up_at) == 1  # it got the slot back and mounted
    assert gate.enter(0, timeout=0.1)  # and left it at the end


def test_what_changed_while_waiting_for_a_slot_is_decided_again() -> None:
    import json

    from tests.unit.test_disk_bound import KS, setup

    store, rec, mount = setup(None)
    gate = rec.ctx.takeovers = TakeoverGate(1)
    assert gate.enter(0, timeout=0.1)
    threading.Timer(0.2, lambda: (store._put(KS.owner("home"), json.dumps({"node": "node-b"})), gate.leave(0))).start()
    assert rec.reconcile() == 0.0  # got the slot after node-b became the owner: nothing done
    assert rec.holding is None and mount.up_at == []
    rec._stop.set()
    del store.keys[KS.owner("home")]
    assert rec.reconcile() == 0.0 and rec.holding is None  # a stopping agent takes nothing over


def test_a_lower_ranked_candidate_waits_while_the_first_candidate_makes_progress() -> None:
    from controller.gate import BACKLOG_SECONDS, BUSY_SECONDS, MAX_BACKLOG_WAIT, PlacementWait

    w, t0 = PlacementWait(), 1000.0
    assert w.until(t0, 0, 0.3, None, 0) == t0  # first choice: at once
    w.reset()
    assert w.until(t0, 2, 0.3, None, 0) == t0 + 0.6  # third choice, nobody else to wait for: rank delay
    w.reset()
    assert w.until(t0, 1, 0.3, "node-b", 20) == t0 + BUSY_SECONDS + 20 * BACKLOG_SECONDS  # node-b has 20 to do
    assert w.until(t0 + 0.9, 1, 0.3, "node-b", 20) == t0 + BUSY_SECONDS + 20 * BACKLOG_SECONDS  # no progress
    t1 = t0 + 1.5  # node-b took one more: counted again from now, for the 19 left
    assert w.until(t1, 1, 0.3, "node-b", 19) == t1 + BUSY_SECONDS + 19 * BACKLOG_SECONDS
    t2 = t0 + MAX_BACKLOG_WAIT - 0.5  # progress keeps it waiting, never past MAX_BACKLOG_WAIT after pending
    assert w.until(t2, 1, 0.3, "node-b", 18) == t0 + MAX_BACKLOG_WAIT
    assert w.until(t2, 1, 0.3, None, 0) == t0 + 0.3  # node-b left (no head): only the rank delay


def test_the_reconciler_waits_on_the_view_index_head_and_its_backlog() -> None:
    import json

    from controller.gate import BUSY_SECONDS
    from controller.view import ClusterView, KeyRecord
    from tests.unit.test_disk_bound import KS, setup

    keys = {KS.node(n): KeyRecord(b"{}", 1, 1, 0) for n in ("node-a", "node-b")}
    for i in range(20):  # node-b is first for 20 VFS nobody owns yet
        spec = {"vip": f"10.77.0.{100 + i}/24", "candidates": ["node-b", "node-a"]}
        keys[KS.spec(f"v{i}")] = KeyRecord(json.dumps(spec).encode(), 2 + i, 2 + i, 0)
    view = ClusterView(KS, 50, keys)
    assert view.index.backlog == {"node-b": 20}
    _store, rec, mount = setup(None)
    rec.vfs = "v3"
    rec.ctx.view = lambda: view
    rec.ctx.rank_delay = 0.0
    wait = rec._maybe_acquire(view.config("v3"), 1, "placement")  # node-a (this reconciler) is second for v3
    assert wait is not None and 0.0 < wait <= BUSY_SECONDS  # looked at again within BUSY_SECONDS
    assert rec.holding is None and mount.up_at == []
    seen = rec._placement._head_seen
    assert seen is not None and seen[:2] == ("node-b", 20)  # it waits for node-b and its 20 (the view's index)


def test_the_arp_probe_waits_for_answers_without_a_slot() -> None:
    from controller.takeover import ProbeStep
    from tests.unit.test_disk_bound import setup

    _store, rec, mount = setup(None)
    gate = rec.ctx.takeovers = TakeoverGate(1)
    free_during_probe: list[bool] = []

    class Host:
        def interface_networks(self) -> set[object]:
            import ipaddress

            return {ipaddress.IPv4Interface("10.77.0.1/24")}

        def foreign_macs(self, vip: object) -> set[str]:
            got = gate.enter(0, timeout=0.05)  # another takeover could have the only slot now
            free_during_probe.append(got)
            if got:
                gate.leave(0)
            return set()

    rec.ctx.steps = [ProbeStep(Host()), *rec.ctx.steps]  # type: ignore[list-item]
    rec.reconcile()
    assert free_during_probe == [True] and rec.holding is not None and len(mount.up_at) == 1
    assert gate.enter(0, timeout=0.1)  # given back at the end


def test_the_gate_is_busy_from_a_takeovers_first_wait_to_its_finish() -> None:
    from controller.gate import GateSlot, TakeoverGate

    gate = TakeoverGate(1)
    assert not gate.busy()
    first = GateSlot(gate, 0, lambda: False)
    assert gate.busy() and first.enter(1.0)
    second = GateSlot(gate, 0, lambda: False)
    assert not second.enter(0.05)  # waiting for a slot counts as busy too
    second.finish()
    with first.outside():  # out of its slot (an ARP probe): still in flight
        assert gate.busy()
    first.finish()
    first.finish()  # safe twice
    assert not gate.busy()


def test_span_exports_wait_for_a_takeover_storm_to_pass(monkeypatch) -> None:
    import time

    from opentelemetry.sdk.trace.export import SpanExportResult

    from controller import tracing

    exported: list[float] = []

    class Inner:
        def export(self, spans):
            exported.append(time.monotonic())
            return SpanExportResult.SUCCESS

    busy_until = time.monotonic() + 0.5
    monkeypatch.setattr(tracing, "_busy", lambda: time.monotonic() < busy_until)
    started = time.monotonic()
    assert tracing._Deferred(Inner()).export([]) is SpanExportResult.SUCCESS
    assert exported[0] >= busy_until
    monkeypatch.setattr(tracing, "DEFER_SECONDS", 0.2)
    monkeypatch.setattr(tracing, "_busy", lambda: True)  # a takeover that never ends delays, never drops
    started = time.monotonic()
    tracing._Deferred(Inner()).export([])
    assert len(exported) == 2 and exported[1] - started < 1.0
