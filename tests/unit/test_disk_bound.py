"""The disk bound (docs/safety.md, "The disk bound"): the controller side, with an in-memory store.

- a takeover from a lost owner mounts nothing before T_release has passed since the owner key went;
- no wait after a clean release, or when the fencing hook confirmed the old node is off;
- every step that touches shared state re-checks the holding;
- a mount that fails is undone before the takeover fails (critical if that fails);
- a fenced holding whose unmount fails is kept (keeper, watchdog) and retried;
- the storage epoch includes the epoch base, and its refusal names the recovery command.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from controller.coordination import Coordination
from controller.diskrisk import DiskRisk, ReleaseBoundClock
from controller.gate import Backoff
from controller.keyspace import Keyspace
from controller.ownership import Holding, LeaseKeeper
from controller.reconcile import AgentContext, VfsReconciler
from controller.spec import parse_spec
from controller.store import OwnerCreated
from controller.takeover import (
    EpochStep,
    MountStep,
    NothingToUndo,
    ReleaseBoundWait,
    StepFailed,
    TakeoverContext,
    bring_up,
)
from controller.view import ClusterView, KeyRecord

KS = Keyspace("/t")
SPEC = {"vip": "10.77.0.100/24", "candidates": ["node-a", "node-b"],
        "storage": {"device": "/dev/loop3", "fstype": "xfs"},
        "exports": [{"pseudo": "/home", "clients": ["10.77.0.0/24"]}]}


class MemStore:
    """Just what a VfsReconciler's acquire/release paths call, kept in a dict."""

    def __init__(self) -> None:
        self.rev = 10
        self.keys: dict[str, KeyRecord] = {}
        self.next_lease = 100

    def _put(self, key: str, value: str, lease: int = 0) -> None:
        self.rev += 1
        old = self.keys.get(key)
        self.keys[key] = KeyRecord(value.encode(), old.create_revision if old else self.rev, self.rev, lease)

    def view(self) -> ClusterView:
        return ClusterView(KS, self.rev, dict(self.keys))

    def grant(self, ttl: int) -> tuple[int, int]:
        self.next_lease += 1
        return self.next_lease, ttl

    def revoke(self, lease_id: int) -> None:
        pass

    def create_owner(self, owner_key: str, value: str, lease_id: int, also: dict[str, str],
                     read: str | None = None, unchanged: dict[str, int] | None = None) -> OwnerCreated | None:
        if owner_key in self.keys:
            return None
        if any((self.keys[k].mod_revision if k in self.keys else 0) != rev for k, rev in (unchanged or {}).items()):
            return None
        self._put(owner_key, value, lease_id)
        for k, v in also.items():
            self._put(k, v)
        rec = self.keys.get(read) if read else None
        return OwnerCreated(self.keys[owner_key].create_revision, rec.value if rec else None)

    def put_if_epoch(self, owner_key: str, epoch: int, puts: dict[str, str], delete_owner: bool = False) -> bool:
        rec = self.keys.get(owner_key)
        if (rec.create_revision if rec else 0) != epoch:
            return False
        for k, v in puts.items():
            self._put(k, v)
        if delete_owner:
            self.keys.pop(owner_key, None)
        return True


@dataclass
class Recorder:
    """A mount step stand-in that records when it ran (monotonic)."""

    name: str = "mount"
    critical_down: bool = True
    has_down: bool = True
    touches_shared: bool = True
    up_at: list[float] = field(default_factory=list)
    down_fails: int = 0
    downs: int = 0

    def up(self, ctx: TakeoverContext) -> None:
        self.up_at.append(time.monotonic())

    def down(self, ctx: TakeoverContext) -> None:
        self.downs += 1
        if self.down_fails > 0:
            self.down_fails -= 1
            raise RuntimeError("umount: target is busy")


@dataclass
class FenceOk:
    ok: bool

    def describe(self) -> str:
        return "powered off" if self.ok else "BMC did not answer"


def setup(status: dict[str, Any] | None, release_bound: float = 0.4, fence: Any = None,
          spec: dict[str, Any] | None = None) -> tuple[MemStore, VfsReconciler, Recorder]:
    store = MemStore()
    store._put(KS.spec("home"), json.dumps(spec or SPEC))
    store._put(KS.node("node-a"), "{}")
    if status is not None:
        store._put(KS.status("home"), json.dumps(status))
    mount = Recorder()
    ctx = AgentContext(me="node-a", store=Coordination(store, KS), keeper=LeaseKeeper(store),  # type: ignore[arg-type]
                       steps=[ReleaseBoundWait(), mount], view=store.view, default_ttl=5, rank_delay=0.0,
                       backoff=Backoff(), vip_down=lambda _vip: None, fence=fence,
                       release_bound=release_bound)
    return store, VfsReconciler("home", ctx), mount


def test_takeover_from_a_lost_owner_waits_the_release_bound_before_mounting() -> None:
    store, rec, mount = setup({"phase": "serving", "node": "node-b", "epoch": 3})
    first_seen = time.monotonic()
    rec.reconcile()
    assert rec.holding is not None and len(mount.up_at) == 1
    assert mount.up_at[0] - first_seen >= 0.4
    assert json.loads(store.keys[KS.status("home")].value)["phase"] == "serving"


VIP_ONLY = {k: v for k, v in SPEC.items() if k not in ("storage", "exports")}


def test_a_vip_only_takeover_from_a_diskless_owner_does_not_wait() -> None:
    store, rec, mount = setup({"phase": "serving", "node": "node-b", "epoch": 3, "disk": False},
                              release_bound=30.0, spec=VIP_ONLY)
    started = time.monotonic()
    rec.reconcile()
    assert rec.holding is not None and len(mount.up_at) == 1
    assert mount.up_at[0] - started < 5.0  # not the 30 s bound
    status = json.loads(store.keys[KS.status("home")].value)
    assert status["phase"] == "serving" and status["disk"] is False  # what the next takeover reads


@pytest.mark.parametrize("status", [
    {"phase": "serving", "node": "node-b", "epoch": 3},  # an older agent's status: no "disk" field
    {"phase": "serving", "node": "node-b", "epoch": 3, "disk": True},  # its spec lost storage; it kept the disk
    {"phase": "serving", "node": "node-b", "epoch": 3, "disk": False, "lost_owner": "node-c"},  # carried risk
    {"phase": "releasing", "node": "node-b", "epoch": 3}])
def test_a_vip_only_takeover_still_waits_when_the_lost_owner_may_have_a_disk(status: dict[str, Any]) -> None:
    """Deny by default: the wait is skipped only on the lost owner's own word that it held no disk,
    else a risk it left would vanish from the status unwaited (a later storage takeover mounts)."""
    _, rec, mount = setup(status, release_bound=0.4, spec=VIP_ONLY)
    first_seen = time.monotonic()
    rec.reconcile()
    assert len(mount.up_at) == 1 and mount.up_at[0] - first_seen >= 0.4


@pytest.mark.parametrize("status", [None, {"phase": "unplaced", "node": None, "previous": "node-b"},
                                    {"phase": "fenced", "node": None, "previous": "node-b"}])
def test_no_wait_after_a_clean_release_or_fence(status: dict[str, Any] | None) -> None:
    _, rec, mount = setup(status, release_bound=30.0)
    started = time.monotonic()
    rec.reconcile()
    assert len(mount.up_at) == 1 and mount.up_at[0] - started < 1.0


def test_no_wait_when_the_fencing_hook_confirmed_the_old_node_is_off() -> None:
    _, rec, mount = setup({"phase": "serving", "node": "node-b"}, release_bound=30.0,
                          fence=lambda _node: FenceOk(True))
    started = time.monotonic()
    rec.reconcile()
    assert len(mount.up_at) == 1 and mount.up_at[0] - started < 1.0


def test_a_failed_fence_does_not_shorten_the_wait() -> None:
    _, rec, mount = setup({"phase": "serving", "node": "node-b"}, release_bound=0.4,
                          fence=lambda _node: FenceOk(False))
    started = time.monotonic()
    rec.reconcile()
    assert len(mount.up_at) == 1 and mount.up_at[0] - started >= 0.4


def test_the_wait_counts_from_when_the_owner_key_was_first_seen_gone() -> None:
    store, rec, mount = setup({"phase": "serving", "node": "node-b"}, release_bound=0.5)
    store._put(KS.owner("home"), json.dumps({"node": "node-b"}), 7)
    rec.reconcile()  # owner present: nothing to do
    assert rec.act.bound._gone_since is None
    del store.keys[KS.owner("home")]
    rec.act.bound.note_owner(False, store.rev)
    gone = rec.act.bound._gone_since
    assert gone is not None
    time.sleep(0.3)
    rec.reconcile()
    assert mount.up_at and mount.up_at[0] >= gone + 0.5
    assert mount.up_at[0] - gone < 0.5 + 0.5  # counted from then, not restarted at the takeover


def test_a_fenced_holding_whose_unmount_fails_is_kept_until_the_disk_is_released() -> None:
    store, rec, mount = setup(None)
    rec.reconcile()
    h = rec.holding
    assert h is not None and h.holds_disk
    removed: list[Holding] = []
    rec.ctx.keeper._on_removed = removed.append
    mount.down_fails = 2
    h.fence("test: lease lost")
    assert rec.reconcile() == 1.0  # retried, not a busy loop
    assert rec.holding is h and h.holds_disk and h in rec.ctx.keeper.holdings() and not removed
    status = json.loads(store.keys[KS.status("home")].value)
    assert "disk is still mounted here" in status["error"]
    rec.reconcile()
    assert rec.holding is h and mount.downs == 2
    rec.reconcile()  # the unmount works now
    assert rec.holding is None and not h.holds_disk and removed == [h] and mount.downs == 3
    assert json.loads(store.keys[KS.status("home")].value)["phase"] == "fenced"


# --- the steps themselves ----------------------------------------------------------------------


def make_ctx(epoch: int = 7, base: int = 0) -> TakeoverContext:
    h = Holding(vfs="home", lease_id=1, ttl=5, granted_at=time.monotonic(), drop=lambda: None, epoch=epoch)
    return TakeoverContext(parse_spec("home", json.dumps(SPEC)), h, epoch_base=base)


def test_a_holding_fenced_between_steps_stops_before_the_next_shared_step() -> None:
    c = make_ctx()
    after = Recorder(name="nfs_server")

    class FenceIt(NothingToUndo):
        name = "probe"

        def up(self, ctx: TakeoverContext) -> None:
            ctx.holding.fence("lease lost mid-takeover")

    with pytest.raises(StepFailed, match=r"no longer valid .* before step nfs_server"):
        bring_up([FenceIt(), after], c)
    assert after.up_at == []


def test_the_release_bound_wait_stops_when_the_holding_ends() -> None:
    c = make_ctx()
    c.not_before = time.monotonic() + 60
    c.sleep = lambda _s: c.holding.fence("gone")
    with pytest.raises(StepFailed, match="holding ended while waiting"):
        ReleaseBoundWait().up(c)


class Disk:
    def __init__(self, mount_error: str = "", unmount_error: str = "", on_disk: int = 0) -> None:
        self.calls: list[str] = []
        self.mount_error, self.unmount_error, self.on_disk = mount_error, unmount_error, on_disk

    def mount(self, vfs: str, device: str, fstype: str, options: tuple[str, ...]) -> None:
        self.calls.append("mount")
        if self.mount_error:
            raise RuntimeError(self.mount_error)

    def unmount(self, vfs: str, device: str | None = None) -> None:
        self.calls.append("unmount")
        if self.unmount_error:
            raise RuntimeError(self.unmount_error)

    def read_epoch(self, vfs: str) -> int:
        return self.on_disk

    def write_epoch(self, vfs: str, epoch: int) -> None:
        self.calls.append(f"write_epoch:{epoch}")


def test_a_mount_that_times_out_is_undone_before_the_takeover_fails() -> None:
    disk = Disk(mount_error="mounting /dev/loop3: no answer after 60s")
    with pytest.raises(StepFailed) as err:
        bring_up([MountStep(disk)], make_ctx())  # type: ignore[arg-type]
    assert disk.calls == ["mount", "unmount"] and not err.value.critical


def test_a_mount_that_cannot_be_undone_is_critical() -> None:
    disk = Disk(mount_error="no answer after 60s", unmount_error="target is busy")
    with pytest.raises(StepFailed, match="unmount failed") as err:
        bring_up([MountStep(disk)], make_ctx())  # type: ignore[arg-type]
    assert err.value.critical


def test_the_storage_epoch_adds_the_epoch_base() -> None:
    disk = Disk(on_disk=900)
    EpochStep(disk).up(make_ctx(epoch=7, base=900))  # type: ignore[arg-type]
    assert disk.calls == ["write_epoch:907"]


def test_a_refused_disk_names_the_recovery_command() -> None:
    with pytest.raises(StepFailed, match=r"run: nfs-ha raise-epoch 900$"):
        EpochStep(Disk(on_disk=900)).up(make_ctx(epoch=7))  # type: ignore[arg-type]


def test_epoch_base_of_the_view() -> None:
    def view(value: bytes | None) -> int:
        keys = {KS.epoch_base: KeyRecord(value, 1, 1, 0)} if value is not None else {}
        return ClusterView(KS, 1, keys).epoch_base()

    assert view(None) == 0 and view(b"1234\n") == 1234
    assert view(b"-5") == 0 and view(b"1e9") == 0 and view("²".encode()) == 0 and view(b"9" * 40) == 0


# --- deny by default (review findings): what counts as "the disk may still be mounted" ------------


@pytest.mark.parametrize("status", [
    {"phase": "error", "node": "node-b", "error": "release stuck, VFS kept owned"},
    {"phase": "error", "node": "node-b", "error": "self-fenced but the disk is still mounted here"},
    {"phase": "unplaced", "node": None, "lost_owner": "node-b"},
    {"phase": "unplaced", "node": None, "disk_at_risk": True},
])
def test_any_status_naming_a_node_or_carrying_risk_waits(status: dict[str, Any]) -> None:
    _, rec, mount = setup(status, release_bound=0.4)
    started = time.monotonic()
    rec.reconcile()
    assert len(mount.up_at) == 1 and mount.up_at[0] - started >= 0.4


@pytest.mark.parametrize("junk", ["[" * 5000, "not json", json.dumps({"phase": "serving", "node": 7})])
def test_an_unreadable_status_waits_the_longest_bound(junk: str) -> None:
    store, rec, _ = setup(None, release_bound=0.4)
    store._put(KS.status("home"), junk)
    assert rec.act.bound.until(rec.act.risk(store.view()), {}, 0) - time.monotonic() > 599


def test_the_wait_is_the_larger_of_ours_and_the_lost_owners_published_bound() -> None:
    _, rec, mount = setup({"phase": "serving", "node": "node-b", "release_bound": 0.8}, release_bound=0.3)
    started = time.monotonic()
    rec.reconcile()
    assert mount.up_at[0] - started >= 0.8


def test_an_owner_that_came_and_went_between_two_passes_restarts_the_count() -> None:
    store, rec, mount = setup(None, release_bound=0.5)
    store._put(KS.spec("home"), json.dumps({**SPEC, "candidates": ["node-b"]}))  # not ours for now
    rec.reconcile()
    assert rec.act.bound._gone_since is not None
    time.sleep(0.6)
    # node-b acquired and was lost while this node did not look: only its status shows it
    store._put(KS.status("home"), json.dumps({"phase": "serving", "node": "node-b"}))
    store._put(KS.spec("home"), json.dumps(SPEC))
    started = time.monotonic()
    rec.reconcile()
    assert mount.up_at and mount.up_at[0] - started >= 0.5


def test_a_confirmed_fence_skips_the_wait_only_when_it_is_the_only_node_at_risk() -> None:
    _, rec, mount = setup({"phase": "acquiring", "node": "node-b", "lost_owner": "node-c",
                           "lost_owners": ["node-c"]}, release_bound=0.4, fence=lambda _n: FenceOk(True))
    started = time.monotonic()
    rec.reconcile()
    assert mount.up_at[0] - started >= 0.4


def test_the_risk_is_carried_by_a_failed_takeover_and_by_status_written_without_an_owner() -> None:
    store, rec, mount = setup({"phase": "serving", "node": "node-b"}, release_bound=0.0)

    def broken(_ctx: TakeoverContext) -> None:
        raise RuntimeError("mount: wrong fs type")

    mount.up = broken  # type: ignore[method-assign]
    rec.reconcile()
    status = json.loads(store.keys[KS.status("home")].value)
    assert status["phase"] == "error" and status["node"] is None and status["lost_owner"] == "node-b"
    assert status["disk_at_risk"] is True
    # an unowned status rewrite (no live candidate) keeps it too
    store._put(KS.spec("home"), json.dumps({**SPEC, "candidates": ["node-c"]}))
    rec.act.write_unowned_status(store.view().config("home"), store.view())
    status = json.loads(store.keys[KS.status("home")].value)
    assert status["phase"] == "unplaced" and status["lost_owner"] == "node-b"


def test_the_epoch_base_comes_from_the_owner_transaction_not_the_view() -> None:
    store, rec, _ = setup(None)
    seen: list[int] = []

    class Capture(NothingToUndo):
        name = "capture"

        def up(self, ctx: TakeoverContext) -> None:
            seen.append(ctx.storage_epoch)

    rec.ctx.steps = [Capture()]
    store._put(KS.epoch_base, "5000")
    rec.ctx.view = lambda: ClusterView(KS, store.rev, {k: v for k, v in store.keys.items() if k != KS.epoch_base})
    rec.reconcile()
    assert rec.holding is not None and seen == [5000 + rec.holding.epoch]


def test_no_takeover_while_the_agent_holds_off_after_an_etcd_restore() -> None:
    _, rec, mount = setup(None)
    rec.ctx.hold_off = lambda: 12.5
    assert rec.reconcile() == 12.5 and rec.holding is None and mount.up_at == []
    rec.ctx.hold_off = lambda: 0.0
    rec.reconcile()
    assert rec.holding is not None and len(mount.up_at) == 1


def test_a_deleted_vfs_keeps_its_status_while_a_node_may_still_have_the_disk() -> None:
    store, rec, _ = setup({"phase": "serving", "node": "node-b"}, release_bound=0.3)
    del store.keys[KS.spec("home")]
    deleted: list[list[str]] = []
    store.delete_if_no_owner = lambda owner, keys, absent=(): deleted.append(list(keys)) or True  # type: ignore
    rec.act.write_unowned_status(store.view().config("home"), store.view())
    assert deleted == []  # kept: it is the only record of the risk
    time.sleep(0.35)
    rec.act.write_unowned_status(store.view().config("home"), store.view())
    assert deleted == [[KS.status("home")]]


def test_a_stop_gives_up_a_release_bound_wait_without_mounting() -> None:
    store, rec, mount = setup({"phase": "serving", "node": "node-b"}, release_bound=30.0)
    threading.Timer(0.3, rec._stop.set).start()
    started = time.monotonic()
    rec.reconcile()
    assert time.monotonic() - started < 5 and mount.up_at == [] and rec.holding is None
    status = json.loads(store.keys[KS.status("home")].value)
    assert "agent is stopping" in status["error"] and status["lost_owner"] == "node-b"


def test_a_busy_device_is_refused_before_mounting_and_is_not_critical() -> None:
    class Busy(Exception):
        mounted_nothing = True

    disk = Disk()

    def mount(*_a: Any) -> None:
        disk.calls.append("mount")
        raise Busy("/dev/loop3 is in use by the kernel")

    disk.mount = mount  # type: ignore[method-assign]
    with pytest.raises(StepFailed) as err:
        bring_up([MountStep(disk)], make_ctx())  # type: ignore[arg-type]
    assert disk.calls == ["mount"] and not err.value.critical


def test_a_risk_written_between_the_view_and_the_owner_transaction_is_not_overwritten() -> None:
    # The view shows a clean end (no wait); before our owner transaction a lost owner writes that it may
    # still have the disk, with a long bound. Overwriting that unseen would mount at once.
    store, rec, mount = setup({"phase": "fenced", "node": None, "previous": "node-b"}, release_bound=0.1)
    create = store.create_owner
    risky = {"phase": "error", "node": None, "previous": "node-b", "disk_at_risk": True, "lost_release_bound": 0.6}

    def create_after_the_lost_owner_wrote(*args: Any, **kw: Any) -> OwnerCreated | None:
        store._put(KS.status("home"), json.dumps(risky))
        store.create_owner = create  # type: ignore[method-assign]
        return create(*args, **kw)

    store.create_owner = create_after_the_lost_owner_wrote  # type: ignore[method-assign]
    assert rec.reconcile() is None  # wait for the event, not a tight retry
    assert rec.holding is None and mount.up_at == [] and KS.owner("home") not in store.keys
    assert json.loads(store.keys[KS.status("home")].value) == risky
    started = time.monotonic()
    rec.reconcile()  # the next pass reads the risk and waits the lost owner's bound
    assert rec.holding is not None and len(mount.up_at) == 1
    assert json.loads(store.keys[KS.status("home")].value)["phase"] == "serving"
    assert mount.up_at[0] - started >= 0.5  # the lost owner's bound (0.6 s), not ours (0.1 s)


def test_the_release_bound_clock_on_a_fake_clock() -> None:
    """ReleaseBoundClock alone: the count starts when the owner key is first seen gone, restarts for a
    status newer than that, is skipped only for the one node at risk confirmed fenced; pending() keeps
    a risky status for the bound from when it was first seen."""
    now = [100.0]
    clock = ReleaseBoundClock(2.0, clock=lambda: now[0])
    risk = DiskRisk(nodes=("node-b",), release_bound=3.0)
    assert clock.until(DiskRisk(), {}, 0) == 0.0  # no risk: no wait
    clock.note_owner(True, 10)
    now[0] = 101.0
    clock.note_owner(False, 11)  # first seen gone at 101
    now[0] = 102.0
    clock.note_owner(False, 12)  # still gone: the count is not restarted
    assert clock.until(risk, {}, status_rev=11) == 101.0 + 3.0  # the larger bound: the lost owner's
    assert clock.until(risk, {}, status_rev=12) == 102.0 + 3.0  # a newer status: an owner came and went
    assert clock.until(risk, {"ok": True, "node": "node-b"}, 11) == 0.0  # the one at risk is fenced
    assert clock.until(risk, {"ok": True, "node": "node-c"}, 11) > 0  # another node fenced: no skip
    assert clock.until(DiskRisk(nodes=("node-b",), unknown=True), {"ok": True, "node": "node-b"}, 11) > 0
    assert clock.pending(risk, 20)  # first seen now (102): kept until 105
    now[0] = 104.9
    assert clock.pending(risk, 20)
    now[0] = 105.0
    assert not clock.pending(risk, 20)
    assert clock.pending(risk, 21)  # a new risky status: counted afresh
    assert not clock.pending(DiskRisk(), 21)


@dataclass
class DeadServer(Recorder):
    """An NFS server step stand-in whose server is dead and whose restart fails."""

    name: str = "nfs_server"
    critical_down: bool = False

    def up(self, ctx: TakeoverContext) -> None:
        super().up(ctx)
        if len(self.up_at) > 1:
            raise RuntimeError("ganesha.nfsd exited at once")

    def healthy(self, ctx: TakeoverContext) -> bool:
        return False


def test_a_held_vfs_whose_nfs_server_cannot_be_restarted_is_released_with_the_reason() -> None:
    """The health check restarts a dead server; when that fails the VFS is let go (owner key deleted,
    the reason in the status) so another candidate may serve it, and this node backs off."""
    store, rec, mount = setup(None)
    server = DeadServer()
    rec.ctx.steps.append(server)
    rec.reconcile()
    assert rec.holding is not None and len(server.up_at) == 1
    rec.reconcile()  # the health check: the restart fails
    assert rec.act.must_release == "nfs_server died and could not be restarted: ganesha.nfsd exited at once"
    rec.reconcile()  # the release
    assert rec.holding is None and KS.owner("home") not in store.keys
    status = json.loads(store.keys[KS.status("home")].value)
    assert status["phase"] == "error" and "could not be restarted" in status["error"]
    assert status["node"] is None and mount.downs == 1
    assert rec.ctx.backoff.remaining("home") > 0
