"""Order and undo of the takeover steps, with a recording fake host (no root needed)."""

import ipaddress
import json
import time

import pytest

from controller.ownership import Holding
from controller.spec import parse_spec
from controller.takeover import (
    RestartBudget,
    StepFailed,
    TakeoverContext,
    bring_down,
    bring_up,
    restart_dead,
    takeover_steps,
)

SPEC = {"vip": "10.77.0.100/24", "candidates": ["node-a"],
        "storage": {"device": "/dev/loop3", "fstype": "xfs"},
        "exports": [{"pseudo": "/home", "clients": ["10.77.0.0/24"]}]}


class FakeHost:
    def __init__(self, fail: str = "", disk_epoch: int = 0, foreign: set[str] | None = None):
        self.calls: list[str] = []
        self.unmounted: list[str | None] = []  # the device passed to each unmount
        self.fail = fail
        self.disk_epoch = disk_epoch
        self.foreign = foreign or set()
        self.networks = {ipaddress.IPv4Interface("10.77.0.11/24")}

    def _do(self, name):
        self.calls.append(name)
        if name == self.fail:
            raise RuntimeError(f"{name} broke")

    def foreign_macs(self, vip):
        self.calls.append("probe")
        return self.foreign

    def interface_networks(self):
        return self.networks

    def mount(self, vfs, device, fstype, options):
        self._do("mount")

    def unmount(self, vfs, device=None):
        self.unmounted.append(device)
        self._do("unmount")

    def read_epoch(self, vfs):
        self.calls.append("read_epoch")
        return self.disk_epoch

    def write_epoch(self, vfs, epoch):
        self._do(f"write_epoch:{epoch}")

    def nfs_start(self, spec, epoch):
        self._do("nfs_start")

    def nfs_stop(self, vfs):
        self._do("nfs_stop")

    def nfs_alive(self, vfs):
        return True

    def vip_up(self, vip):
        self._do("vip_up")

    def vip_down(self, vip):
        self._do("vip_down")

    def announce(self, vip, still_valid):
        self._do("announce")


def ctx(spec=SPEC, epoch=7):
    h = Holding(vfs="home", lease_id=1, ttl=5, granted_at=time.monotonic(), drop=lambda: None, epoch=epoch)
    return TakeoverContext(parse_spec("home", json.dumps(spec)), h)


def test_up_order_and_down_order():
    host = FakeHost()
    c = ctx()
    bring_up(takeover_steps(host), c)
    assert host.calls == ["probe", "mount", "read_epoch", "write_epoch:7", "nfs_start", "vip_up", "announce"]
    assert set(c.timings) >= {"mount", "nfs_server", "vip"}
    host.calls.clear()
    result = bring_down(takeover_steps(host), c)
    assert host.calls == ["vip_down", "nfs_stop", "unmount"] and result.errors == [] and not result.critical


def test_probe_failure_touches_nothing():
    host = FakeHost(foreign={"52:54:00:00:00:01"})
    with pytest.raises(StepFailed, match="still answers ARP from 52:54:00:00:00:01"):
        bring_up(takeover_steps(host), ctx())
    assert host.calls == ["probe"]


def test_newer_epoch_on_disk_is_refused_and_unmounted():
    host = FakeHost(disk_epoch=9)
    with pytest.raises(StepFailed, match=r"storage epoch 9 .* newer than ours"):
        bring_up(takeover_steps(host), ctx(epoch=7))
    assert host.calls == ["probe", "mount", "read_epoch", "unmount"]


def test_nfs_failure_unwinds_in_reverse():
    host = FakeHost(fail="nfs_start")
    with pytest.raises(StepFailed) as info:
        bring_up(takeover_steps(host), ctx())
    assert host.calls[-2:] == ["nfs_start", "unmount"] and not info.value.critical


class StuckUnmountHost(FakeHost):
    def unmount(self, vfs, device=None):
        self.calls.append("unmount")
        raise RuntimeError("target is busy")


def test_unmount_failure_during_undo_is_critical():
    host = StuckUnmountHost(fail="nfs_start")
    with pytest.raises(StepFailed) as info:
        bring_up(takeover_steps(host), ctx())
    assert info.value.critical and "target is busy" in str(info.value)
    result = bring_down(takeover_steps(host), ctx())
    assert result.critical and host.calls[-3:] == ["vip_down", "nfs_stop", "unmount"]


def test_vip_only_spec_skips_disk_and_nfs():
    host = FakeHost()
    bring_up(takeover_steps(host), ctx(spec={"vip": "10.77.0.100/24", "candidates": ["node-a"]}))
    assert host.calls == ["probe", "vip_up", "announce"]


@pytest.mark.parametrize("networks", [set(), {"192.168.1.5/24"}, {"10.77.0.11/16"}, {"10.77.0.100/24"}])
def test_a_vip_outside_the_interface_subnet_touches_nothing(networks):
    """The VIP itself (already up from an earlier holding) does not vouch for its own prefix."""
    host = FakeHost()
    host.networks = {ipaddress.IPv4Interface(n) for n in networks}
    with pytest.raises(StepFailed, match=r"10\.77\.0\.100/24"):
        bring_up(takeover_steps(host), ctx())
    assert host.calls == []


def test_a_slash_32_vip_fits_any_interface():
    host = FakeHost()
    host.networks = set()
    bring_up(takeover_steps(host), ctx(spec={"vip": "10.77.0.100/32", "candidates": ["node-a"]}))
    assert "vip_up" in host.calls


class DeadServerHost(FakeHost):
    """An NFS server that is found dead `deaths` times; a restart brings it back until then."""

    def __init__(self, deaths: int, fail: str = ""):
        super().__init__(fail=fail)
        self.deaths = deaths

    def nfs_alive(self, vfs):
        return self.deaths <= 0

    def nfs_start(self, spec, epoch):
        self._do("nfs_start")
        self.deaths -= 1


def test_a_dead_nfs_server_is_restarted_and_the_vfs_kept():
    host = DeadServerHost(deaths=1)
    assert restart_dead(takeover_steps(host), ctx(), RestartBudget()) is None
    assert host.calls == ["nfs_stop", "nfs_start"]
    assert restart_dead(takeover_steps(host), ctx(), RestartBudget()) is None  # alive again: nothing done
    assert host.calls == ["nfs_stop", "nfs_start"]


def test_restarts_beyond_the_budget_give_the_vfs_up_and_old_ones_expire():
    now = [0.0]
    budget = RestartBudget(allowed=2, window=60.0, clock=lambda: now[0])
    host = DeadServerHost(deaths=100)
    steps = takeover_steps(host)
    assert restart_dead(steps, ctx(), budget) is None
    now[0] = 30.0
    assert restart_dead(steps, ctx(), budget) is None
    now[0] = 59.0
    assert restart_dead(steps, ctx(), budget) == "nfs_server died 3 times in 60s"
    assert host.calls.count("nfs_start") == 2  # the third death is not restarted
    now[0] = 120.0  # every earlier restart is out of the window
    assert restart_dead(steps, ctx(), budget) is None


def test_a_restart_that_fails_gives_the_vfs_up_with_the_reason():
    host = DeadServerHost(deaths=1, fail="nfs_start")
    reason = restart_dead(takeover_steps(host), ctx(), RestartBudget())
    assert reason == "nfs_server died and could not be restarted: nfs_start broke"
