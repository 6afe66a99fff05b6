"""The agent stays up: reconcilers of deleted VFS end (after releasing), junk keys start nothing,
and signals stop the agent at any time while SIGHUP never does.

The in-process tests run the real Agent (start-up, watch, reconcilers, stop) over an in-memory
etcd (tests/unit/fake_etcd.py); only the host actuators, the fence guard process and the
takeover steps are replaced. The signal tests run the real agent as a subprocess.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import node.agent as agent_mod
from controller.coordination import Coordination
from controller.diskrisk import restore_hold
from controller.gate import Backoff
from controller.keyspace import Keyspace
from controller.ownership import LeaseKeeper
from controller.reconcile import AgentContext, VfsReconciler
from controller.view import ClusterView, KeyRecord
from node.config import AgentConfig
from tests.unit.fake_etcd import FakeEtcd

REPO = Path(__file__).resolve().parents[2]
KS = Keyspace("/t")
SPEC = json.dumps({"vip": "10.77.0.100/24", "candidates": ["node-a"]})


class FakeIface:
    def addresses(self) -> set[ipaddress.IPv4Interface]:
        return set()


class FakeHost:
    """The host actuators the agent calls outside the takeover steps (which the tests drop)."""

    def __init__(self, ifname: str, state_dir: Path) -> None:
        self.iface = FakeIface()
        self.mac = "02:00:00:00:00:01"
        self.nfs_workroot = state_dir / "nfs"
        self.vips_down: list[str] = []

    def on_nfs_exit(self, callback: Callable[[str], None]) -> None:
        pass

    def on_nfs_started(self, callback: Callable[[str], None]) -> None:
        pass

    def vip_down(self, vip: ipaddress.IPv4Interface) -> None:
        self.vips_down.append(str(vip))

    def remove_leftovers(self, managed: object) -> list[str]:
        return []

    def nfs_pid(self, vfs: str) -> int | None:
        return None


class FakeGuard:
    class proc:  # mimics subprocess.Popen: agent reads guard.proc.poll()
        returncode = None

        @staticmethod
        def poll() -> None:
            return None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.held: dict[str, int] = {}

    def hold(self, vfs: str, vip: str, deadline: float, mountpoint: str | None, nfs_pid: int | None,
             epoch: int = 0, device: str | None = None) -> None:
        self.held[vfs] = epoch

    def hold_many(self, holds: list[dict[str, Any]]) -> None:
        for item in holds:
            self.hold(**item)

    def release(self, vfs: str, epoch: int) -> None:
        self.held.pop(vfs, None)

    def close_clean(self, timeout: float = 5.0) -> int:
        return 0


def wait_until(pred: Callable[[], object], what: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[FakeEtcd, agent_mod.Agent]]:
    store = FakeEtcd()
    monkeypatch.setattr(agent_mod, "EtcdStore", lambda *a, **kw: store)
    monkeypatch.setattr(agent_mod, "Host", FakeHost)
    monkeypatch.setattr(agent_mod, "GuardClient", FakeGuard)
    cfg = AgentConfig(name="node-a", etcd="http://127.0.0.1:1", interface="lo", prefix="/t",
                      state_dir=str(tmp_path), rank_delay=0.0)
    agent = agent_mod.Agent(cfg)
    agent.ctx.steps = []  # no VIP, disk or NFS server: ownership, release and status are what is tested
    agent.start()
    yield store, agent
    agent.stop()


def vfs_keys(store: FakeEtcd, vfs: str) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in store.keys if k.startswith(f"/t/vfs/{vfs}/")}


def owner_node(store: FakeEtcd, vfs: str) -> str | None:
    rec = store.keys.get(KS.owner(vfs))
    return json.loads(rec.value)["node"] if rec else None


def test_deleted_vfs_is_released_then_its_status_removed_and_its_reconciler_stopped(running):
    store, agent = running
    store.put(KS.spec("home"), SPEC)
    wait_until(lambda: owner_node(store, "home") == "node-a", "node-a to own home")
    rec = agent.reconcilers["home"]
    wait_until(lambda: rec.holding is not None, "the holding")

    store.delete(KS.spec("home"))
    # Released first (owner key gone, lease revoked), then status removed, then the thread ended.
    wait_until(lambda: "home" not in agent.reconcilers, "the reconciler to be dropped")
    assert rec.holding is None and not rec._thread.is_alive()
    assert vfs_keys(store, "home") == set()
    assert agent.keeper.holdings() == []
    assert agent.guard.held == {}

    # Written again: a new reconciler serves it.
    store.put(KS.spec("home"), SPEC)
    wait_until(lambda: owner_node(store, "home") == "node-a", "node-a to own home again")
    assert agent.reconcilers["home"] is not rec


def test_reconciler_holding_a_vfs_is_not_stopped_until_it_has_released(running):
    store, agent = running
    store.put(KS.spec("home"), SPEC)
    wait_until(lambda: owner_node(store, "home") == "node-a", "node-a to own home")
    rec = agent.reconcilers["home"]
    # Ask it to end while it holds home: it must go on, so it is still the one that releases.
    assert rec.stop(release=False, timeout=0.2) is False
    assert rec._thread.is_alive() and rec.holding is not None
    store.delete(KS.spec("home"))
    wait_until(lambda: not rec._thread.is_alive(), "the loop to end after releasing")
    assert rec.holding is None and owner_node(store, "home") is None


def test_intent_alone_and_junk_keys_start_no_reconciler_and_junk_is_logged_once(running, caplog):
    store, agent = running
    caplog.set_level(logging.WARNING, logger="nfs-ha-agent")
    junk = ["/t/vfs/Home/spec", "/t/vfs/home/specs", "/t/vfs/a/b/spec", "/t/vfs/-x/status", "/t/nodes/NODE-Z",
            "/t/other"]
    for key in junk:
        store.put(key, "x")
    store.put(KS.intent("lonely"), "node-a")
    store.put(KS.epoch_base, "7")  # a known key outside vfs/ and nodes/: not junk
    store.put(KS.spec("home"), SPEC)
    wait_until(lambda: owner_node(store, "home") == "node-a", "node-a to own home")
    store.put(KS.intent("home"), "node-a")  # one more view with the same junk in it
    wait_until(lambda: agent.views.view.raw_intent("home") == "node-a", "the intent in the view")
    assert set(agent.reconcilers) == {"home"}
    assert sorted(agent.views.view.live_nodes()) == ["node-a"]  # NODE-Z would sort first
    warned = [r.getMessage() for r in caplog.records if "ignoring key" in r.getMessage()]
    assert sorted(warned) == sorted(f"ignoring key {k!r}: not an nfs-ha key (invalid name or unknown field)"
                                    for k in junk)


def make_reconciler(store: FakeEtcd, me: str = "node-a") -> tuple[VfsReconciler, Callable[[ClusterView], None]]:
    views: list[ClusterView] = []
    ctx = AgentContext(me=me, store=Coordination(store, KS), keeper=LeaseKeeper(store), steps=[],
                       view=lambda: views[-1], default_ttl=5, rank_delay=0.0, backoff=Backoff(),
                       vip_down=lambda _vip: None)
    return VfsReconciler("home", ctx), views.append


def test_status_of_deleted_vfs_is_removed_by_the_lowest_live_node_only():
    store = FakeEtcd()
    for node in ("node-a", "node-b"):
        store.put(KS.node(node), "{}")
    store.put(KS.status("home"), json.dumps({"phase": "unplaced", "previous": "node-b"}))
    store.put(KS.intent("home"), "node-b")
    view = ClusterView(KS, *store.load("/t/"))
    rec_b, show_b = make_reconciler(store, "node-b")
    show_b(view)
    rec_b.reconcile()
    assert KS.status("home") in store.keys  # node-b is not the status writer
    rec_a, show_a = make_reconciler(store, "node-a")
    show_a(view)
    rec_a.reconcile()
    assert KS.status("home") not in store.keys
    assert KS.intent("home") in store.keys  # the operator's key is left alone


def test_status_is_not_removed_while_an_owner_key_or_a_spec_exists_in_etcd():
    store = FakeEtcd()
    store.put(KS.node("node-a"), "{}")
    store.put(KS.status("home"), json.dumps({"phase": "serving", "node": "node-b"}))
    stale = ClusterView(KS, *store.load("/t/"))  # shows no owner and no spec
    rec, show = make_reconciler(store)
    show(stale)
    lease, _ = store.grant(5)
    store.put(KS.owner("home"), json.dumps({"node": "node-b"}), lease=lease)
    rec.reconcile()
    assert KS.status("home") in store.keys
    store.revoke(lease)
    store.put(KS.spec("home"), SPEC)
    rec.reconcile()
    assert KS.status("home") in store.keys


# --- signals (a real agent process) --------------------------------------------------------


def start_agent(tmp_path: Path, log_level: str = "INFO", extra: str = "") -> tuple[subprocess.Popen[bytes], Path, Path]:
    """An agent whose etcd cannot be reached (closed loopback port): it stays in start-up."""
    if os.geteuid() != 0:
        pytest.skip("the agent needs root (netlink on lo, /run state)")
    conf = tmp_path / "agent.toml"
    conf.write_text(f'name = "node-z"\netcd = "http://127.0.0.1:1"\ninterface = "lo"\n'
                    f'state_dir = "{tmp_path}/state"\nlog_level = "{log_level}"\nspan_file = "off"\n'
                    f'metrics_address = "off"\n{extra}')
    conf.chmod(0o600)  # the agent refuses a config file others may read
    log_file = tmp_path / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NFS_HA_", "OTEL_"))}
    with open(log_file, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "node.agent", "--config", str(conf)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    return proc, log_file, conf


def wait_log(proc: subprocess.Popen[bytes], log_file: Path, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_file.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"agent never logged {text!r} (exit {proc.returncode}):\n{log_file.read_text()}")
        time.sleep(0.05)


def stop_within(proc: subprocess.Popen[bytes], signum: int, seconds: float) -> int:
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"agent still running {seconds}s after signal {signum}")
    assert time.monotonic() - sent < seconds
    return code


def test_sighup_keeps_the_agent_and_reloads_log_level_sigterm_stops_it_while_etcd_is_unreachable(tmp_path):
    proc, log_file, conf = start_agent(tmp_path)
    wait_log(proc, log_file, "initial load failed, retrying")
    conf.write_text(conf.read_text().replace('log_level = "INFO"', 'log_level = "DEBUG"'))
    proc.send_signal(signal.SIGHUP)
    wait_log(proc, log_file, "SIGHUP: log level now DEBUG")
    time.sleep(0.3)
    assert proc.poll() is None, log_file.read_text()
    assert stop_within(proc, signal.SIGTERM, 5.0) == 0, log_file.read_text()
    assert "Traceback" not in log_file.read_text()


def test_sigint_stops_the_agent_during_start_up(tmp_path):
    proc, log_file, _conf = start_agent(tmp_path)
    wait_log(proc, log_file, "initial load failed, retrying")
    assert stop_within(proc, signal.SIGINT, 5.0) == 0, log_file.read_text()
    assert "Traceback" not in log_file.read_text()


def test_the_hold_after_a_restore_covers_every_published_ttl_and_release_bound() -> None:
    def rec(value: object, rev: int = 5, lease: int = 0) -> KeyRecord:
        return KeyRecord(json.dumps(value).encode(), rev, rev, lease)

    base = {KS.spec("home"): rec({"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"]})}
    assert restore_hold(ClusterView(KS, 9, base), 2, 5.0) == 7.0  # only this node's own

    keys = {**base,
            KS.spec("big"): rec({"vip": "10.77.0.101/24", "candidates": ["node-a"], "lease_ttl": 9}),
            KS.owner("home"): rec({"node": "node-b", "ttl": 12}, lease=7),  # granted more than asked
            KS.status("home"): rec({"state": "error", "node": None, "lost_release_bound": 30}),
            KS.node("node-b"): rec({"release_bound": 20})}
    assert restore_hold(ClusterView(KS, 9, keys), 2, 5.0) == 12.0 + 30.0
    # A node holding leases longer than any spec or owner key shows (set after the snapshot) says so.
    later = {**keys, KS.node("node-c"): rec({"release_bound": 5, "lease_ttl": 20, "min_ttl": 2, "max_held_ttl": 45})}
    assert restore_hold(ClusterView(KS, 9, later), 2, 5.0) == 45.0 + 30.0
    junk = {**keys, KS.node("node-c"): rec({"release_bound": "soon"}), KS.owner("big"): rec({"ttl": -1}, lease=8)}
    assert restore_hold(ClusterView(KS, 9, junk), 2, 5.0) == 300.0 + 600.0  # junk: the maximum


def test_the_hold_after_a_restore_grows_with_what_nodes_publish_while_it_lasts(running) -> None:
    store, agent = running
    assert json.loads(store.keys[KS.node("node-a")].value)["lease_ttl"] == agent.cfg.lease_ttl
    agent._etcd_went_back(agent.views.view)
    first = agent._quiet_until
    assert first - time.monotonic() <= agent.cfg.lease_ttl + agent.cfg.release_bound
    # node-b re-registers after the restore: it holds a lease of 40 s
    store.put(KS.node("node-b"), json.dumps({"release_bound": 10, "max_held_ttl": 40}))
    wait_until(lambda: agent._quiet_until > first, "the hold to grow")
    assert agent._quiet_until == pytest.approx(agent._went_back_at + 40 + max(10, agent.cfg.release_bound))


def test_which_reconcilers_a_change_wakes() -> None:
    def spec(vip: str, device: str | None = None) -> bytes:
        doc: dict[str, Any] = {"vip": vip, "candidates": ["node-a"]}
        if device:
            doc["storage"] = {"device": device, "fstype": "xfs"}
            doc["exports"] = [{"pseudo": f"/{device[5:]}", "clients": ["10.77.0.0/24"]}]
        return json.dumps(doc).encode()

    def put(key: str, value: bytes, rev: int) -> tuple[str, KeyRecord, int]:
        return (key, KeyRecord(value, rev, rev, 0), rev)

    before = ClusterView(KS, 10, {
        KS.spec("home"): KeyRecord(spec("10.77.0.100/24", "/dev/loop7"), 2, 2, 0),
        KS.spec("web"): KeyRecord(spec("10.77.0.101/24"), 3, 3, 0),
        KS.spec("db"): KeyRecord(spec("10.77.0.102/24", "/dev/loop8"), 4, 4, 0),
        KS.spec("logs"): KeyRecord(spec("10.77.0.103/24"), 5, 5, 0),
    })

    def affected(*events: tuple[str, KeyRecord | None, int]) -> set[str] | None:
        after = before.applied(0, list(events))
        return after.affected(before, [key for key, _rec, _rev in events])

    assert before.affected(before, None) is None  # a full load: everything
    assert affected(put(KS.status("home"), b"{}", 11), put(KS.intent("web"), b"node-a", 11)) == {"home", "web"}
    # web takes db's device and logs's VIP: those two are woken (their clash checks change), home is not
    assert affected(put(KS.spec("web"), spec("10.77.0.103/24", "/dev/loop8"), 11)) == {"web", "db", "logs"}
    # ...and a spec leaving a VIP wakes who had it before: web moves off its VIP, nobody else had it
    assert affected(put(KS.spec("logs"), spec("10.77.0.101/24"), 11)) == {"logs", "web"}
    owner = json.dumps({"node": "node-b", "vip": "10.77.0.101/24"}).encode()
    assert affected(put(KS.owner("new"), owner, 11)) == {"new", "web"}  # an owner of web's VIP
    assert affected(put(KS.owner("new"), b'{"vip": 5}', 11)) == {"new"}  # junk VIP: no clash with anyone
    assert affected(put(KS.node("node-b"), b"{}", 11)) is None  # placement of every VFS
    assert affected(put(KS.epoch_base, b"7", 11)) == set()  # read in the owner transaction, not from the view
    assert affected(put("/t/vfs/bad name!/status", b"{}", 11)) == set()  # junk: logged, never acted on
    assert affected((KS.spec("db"), None, 11)) == {"db"}  # a deletion concerns its own VFS


def test_a_junk_owner_vip_makes_no_spec_clash() -> None:
    view = ClusterView(KS, 10, {KS.spec("home"): KeyRecord(SPEC.encode(), 2, 2, 0),
                                KS.owner("x"): KeyRecord(b'{"node": "node-b", "vip": 7}', 3, 3, 0)})
    assert view.config("home").spec is not None, view.config("home").errors


def test_a_status_write_wakes_only_its_own_vfs(running) -> None:
    store, agent = running
    for name in ("home", "web"):
        spec = json.loads(SPEC)
        spec["vip"] = "10.77.0.101/24" if name == "web" else spec["vip"]
        store.put(KS.spec(name), json.dumps(spec))
    wait_until(lambda: {"home", "web"} <= set(agent.reconcilers), "both reconcilers")
    wait_until(lambda: owner_node(store, "web") == "node-a" and owner_node(store, "home") == "node-a", "both owned")
    settled_at = (store.revision, time.monotonic())
    while time.monotonic() - settled_at[1] < 0.5:  # no more writes of their own (serving statuses)
        if store.revision != settled_at[0]:
            settled_at = (store.revision, time.monotonic())
        time.sleep(0.02)
    woken: list[str] = []
    for name, rec in agent.reconcilers.items():
        real = rec.wake
        rec.wake = lambda name=name, real=real: (woken.append(name), real())[1]  # type: ignore[method-assign]
    store.put(KS.status("web"), json.dumps({"phase": "serving", "node": "node-a"}))
    wait_until(lambda: "web" in woken, "web's reconciler to be woken")
    time.sleep(0.3)
    assert "home" not in woken, store.revision - settled_at[0]
    store.put(KS.spec("home"), SPEC)  # a spec: every reconciler
    wait_until(lambda: "home" in woken, "home's reconciler to be woken")


def test_the_guard_hears_of_a_holding_from_the_holding_itself() -> None:
    """Renewals are told from what each holding carries (its VIP and disk, fixed at acquire), with no
    reconciler looked up: a holding released meanwhile is still described right (the guard's epoch
    rules drop it), one without a VIP is not told, a fenced one is (renewals never carry one, the keeper
    filters them; LeaseKeeper.tell_all does, for a new guard to act on at once), and one holding whose
    facts cannot be read spoils only its own renewal."""
    from types import SimpleNamespace

    from controller.ownership import Holding, guard_deadline

    sent: list[list[dict[str, Any]]] = []
    guard = SimpleNamespace(hold=lambda **kw: sent.append([kw]), hold_many=lambda holds: sent.append(list(holds)))

    def nfs_pid(vfs: str) -> int | None:
        if vfs == "broken":
            raise OSError("pid file unreadable")
        return 4242 if vfs == "home" else None

    host = SimpleNamespace(nfs_pid=nfs_pid, storage=SimpleNamespace(mountpoint=lambda vfs: Path("/run/m") / vfs))
    fake = SimpleNamespace(guard=guard, host=host)
    now = time.monotonic()

    def holding(vfs: str, vip: str = "10.77.0.100/24", device: str | None = None, epoch: int = 7) -> Holding:
        return Holding(vfs=vfs, lease_id=1, ttl=2, granted_at=now, drop=lambda: None, epoch=epoch, vip=vip,
                       device=device, holds_disk=device is not None)

    home, web = holding("home", device="/dev/loop7"), holding("web", vip="10.77.0.101/32", epoch=8)
    fenced, broken, unknown = holding("gone"), holding("broken"), holding("novip", vip="")
    fenced.fence("test")
    agent_mod.Agent._guard_holds(fake, [home, fenced, broken, unknown, web])  # type: ignore[arg-type]
    assert sent == [[
        {"vfs": "home", "vip": "10.77.0.100/24", "deadline": guard_deadline(home), "mountpoint": "/run/m/home",
         "nfs_pid": 4242, "epoch": 7, "device": "/dev/loop7"},
        {"vfs": "gone", "vip": "10.77.0.100/24", "deadline": guard_deadline(fenced), "mountpoint": None,
         "nfs_pid": None, "epoch": 7, "device": None},
        {"vfs": "web", "vip": "10.77.0.101/32", "deadline": guard_deadline(web), "mountpoint": None,
         "nfs_pid": None, "epoch": 8, "device": None}]]


def test_a_thousand_vfs_agent_wakes_per_event_only_what_the_event_concerns(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Issue 9's simulation, the whole agent (view keeper, reconcilers, lease keeper) on the in-memory
    store with 1000 VFS held: the work of one watch event, counted as the reconcilers it wakes (each
    wake is a reconcile pass), is the VFS it concerns, not the 1000. A node registration concerns every
    placement, so it wakes all (once)."""
    from controller.reconcile import VfsReconciler

    store = FakeEtcd()
    monkeypatch.setattr(agent_mod, "EtcdStore", lambda *a, **kw: store)
    monkeypatch.setattr(agent_mod, "Host", FakeHost)
    monkeypatch.setattr(agent_mod, "GuardClient", FakeGuard)
    woken: list[str] = []
    real_wake = VfsReconciler.wake

    def counted_wake(self: VfsReconciler) -> None:
        woken.append(self.vfs)
        real_wake(self)

    monkeypatch.setattr(VfsReconciler, "wake", counted_wake)
    cfg = AgentConfig(name="node-a", etcd="http://127.0.0.1:1", interface="lo", prefix="/t",
                      state_dir=str(tmp_path), rank_delay=0.0, lease_ttl=30)
    agent = agent_mod.Agent(cfg)
    agent.ctx.steps = []  # ownership and status only: no VIP, disk or NFS server
    names = [f"v{i:04d}" for i in range(1000)]
    try:
        agent.start()
        for i, name in enumerate(names):
            store.put(KS.spec(name), json.dumps({"vip": f"10.{i // 250}.{i % 250}.1/32", "candidates": ["node-a"]}))
        wait_until(lambda: all(owner_node(store, n) == "node-a" for n in names), "1000 VFS held", timeout=120)

        def woken_by(write: Callable[[], None], expect: set[str]) -> list[str]:
            time.sleep(0.3)  # the takeovers' own status writes have been applied
            woken.clear()
            write()
            wait_until(lambda: expect <= set(woken), f"{expect} woken")
            time.sleep(0.3)  # anything else the event would wake has been woken by now
            return list(woken)

        # (a wake may come twice: the event, then the reconciler's own answer to it, e.g. its status)
        status = json.loads(store.keys[KS.status("v0500")].value)
        one = woken_by(lambda: store.put(KS.status("v0500"), json.dumps({**status, "note": "x"})), {"v0500"})
        assert set(one) == {"v0500"} and len(one) <= 3
        intent = woken_by(lambda: store.put(KS.intent("v0777"), "node-a"), {"v0777"})
        assert set(intent) == {"v0777"} and len(intent) <= 3
        clash = woken_by(lambda: store.put(KS.spec("v1000"), json.dumps({"vip": "10.0.7.1/32",
                                                                         "candidates": ["node-a"]})),
                         {"v1000", "v0007"})
        assert set(clash) == {"v1000", "v0007"}  # a new spec with v0007's VIP: the two whose clash check changes
        everything = woken_by(lambda: store.put(KS.node("node-z"), "{}"), set(names))
        assert len(set(everything)) >= 1000 and len(everything) <= 2 * 1001
    finally:
        agent.stop()


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    proc, log_file, _conf = start_agent(tmp_path, extra='log_format = "json"\n')
    wait_log(proc, log_file, "initial load failed, retrying")
    assert stop_within(proc, signal.SIGTERM, 10.0) == 0
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    warning = next(r for r in records if "initial load failed, retrying" in r["message"])
    assert warning["level"] == "WARNING" and warning["program"] == "nfs-ha-agent" and warning["pid"] == proc.pid
    assert {"time", "thread", "logger"} <= warning.keys()
