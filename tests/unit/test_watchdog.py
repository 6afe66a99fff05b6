"""The hardware watchdog rule (node/watchdog.py) with a fake device and a fake clock."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from controller.ownership import Holding, fence_margin
from controller.spec import parse_spec
from controller.takeover import StepFailed, TakeoverContext
from node import config as agent_config
from node.watchdog import PET_INTERVAL, WatchdogArm, WatchdogDevice, WatchdogError, WatchdogStep, check_device


class FakeDevice:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.armed = False

    def arm(self, timeout: int) -> int:
        assert not self.armed
        self.armed = True
        self.calls.append(("arm", timeout))
        return timeout

    def set_timeout(self, timeout: int) -> int:
        assert self.armed
        self.calls.append(("set_timeout", timeout))
        return timeout

    def pet(self) -> None:
        assert self.armed
        self.calls.append(("pet", 0))

    def disarm(self) -> None:
        assert self.armed
        self.armed = False
        self.calls.append(("disarm", 0))


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def holding(vfs: str, ttl: int, granted_at: float) -> Holding:
    return Holding(vfs=vfs, lease_id=1, ttl=ttl, granted_at=granted_at, drop=lambda: None)


def make(held: list[Holding], now: float) -> tuple[WatchdogArm, FakeDevice, Clock]:
    dev, clock = FakeDevice(), Clock(now)
    return WatchdogArm(dev, lambda: list(held), clock=clock), dev, clock


def test_idle_node_is_never_armed() -> None:
    arm, dev, _ = make([], 100.0)
    assert arm.tick() == "disarmed" and dev.calls == []


def test_armed_and_petted_only_while_a_reset_would_precede_expiry() -> None:
    h = holding("home", ttl=5, granted_at=100.0)
    arm, dev, clock = make([h], 100.1)
    assert arm.tick() == "petted"
    assert dev.calls == [("arm", 2), ("pet", 0)]  # half the TTL, whole seconds
    clock.now = 102.9  # 102.9 + 2 < 105: a reset now would still come before the lease can expire
    assert arm.tick() == "petted"
    clock.now = 103.0
    assert arm.tick() == "withheld"
    assert dev.calls[-1] == ("pet", 0) and len([c for c in dev.calls if c[0] == "pet"]) == 2
    h.acked(103.0, 5)  # a keepalive sent at 103.0 was acknowledged
    assert arm.tick() == "petted"


def test_fence_disarms_only_once_the_vip_is_down() -> None:
    vip_down = threading.Event()
    h = Holding(vfs="home", lease_id=1, ttl=5, granted_at=100.0, drop=lambda: vip_down.wait(10))
    arm, dev, clock = make([h], 100.0)
    arm.tick()
    clock.now = 103.8  # past the self-fence deadline (103.75)
    fencing = threading.Thread(target=h.fence, args=("test",))
    fencing.start()  # fenced, but the VIP is still being removed
    try:
        deadline = time.monotonic() + 5
        while not h.fenced and time.monotonic() < deadline:
            time.sleep(0.01)
        assert h.fenced and arm.tick() == "withheld" and dev.armed
    finally:
        vip_down.set()
        fencing.join()
    assert arm.tick() == "disarmed" and not dev.armed and dev.calls[-1] == ("disarm", 0)


def test_timeout_follows_the_smallest_ttl_held() -> None:
    held = [holding("big", ttl=30, granted_at=100.0)]
    arm, dev, _ = make(held, 100.0)
    arm.tick()
    assert arm.timeout == 15
    held.append(holding("small", ttl=2, granted_at=100.0))
    arm.tick()
    assert ("set_timeout", 1) in dev.calls and arm.timeout == 1
    held.pop()
    arm.tick()
    assert dev.calls[-2:] == [("set_timeout", 15), ("pet", 0)]


def test_stop_disarms_an_idle_node_and_keeps_a_holding_node_armed() -> None:
    held = [holding("home", ttl=5, granted_at=100.0)]
    arm, dev, _ = make(held, 100.0)
    arm.tick()
    arm.stop()
    assert dev.armed  # still holding: exit without the magic close, the machine resets
    held.clear()
    arm.stop()
    assert not dev.armed and dev.calls[-1] == ("disarm", 0)


@pytest.mark.parametrize("ttl", [2, 3, 5, 10, 30])
def test_etcd_loss_self_fences_before_the_reset_and_a_freeze_resets_before_expiry(ttl: int) -> None:
    """Simulate keepalives every TTL/4 (acked 50 ms later), then etcd goes away at t=50."""
    h = holding("home", ttl=ttl, granted_at=0.0)
    arm, dev, clock = make([h], 0.0)
    next_keepalive, last_pet, withheld_while_healthy = 0.0, None, 0
    t = 0.0
    while t < 50 + ttl:
        clock.now = t
        if t < 50 and t >= next_keepalive + 0.05:
            h.acked(next_keepalive, ttl)
            next_keepalive += ttl / 4
        state = arm.tick()
        if state == "petted":
            last_pet = t
            # A freeze right now would reset the machine before the lease could expire.
            assert t + arm.timeout < h.last_ack + ttl
        elif t < 50:
            withheld_while_healthy += 1
        t = round(t + PET_INTERVAL, 6)
    assert withheld_while_healthy == 0
    assert last_pet is not None
    # The self-fence deadline comes before the earliest reset after the last pet.
    assert h.deadline == h.last_ack + ttl - fence_margin(ttl)
    assert h.deadline < last_pet + arm.timeout
    assert dev.armed  # this fake never fences; a real agent drops the VIP, then disarms


def test_real_device_class_refuses_a_file_that_is_no_watchdog(tmp_path: Path) -> None:
    path = tmp_path / "not-a-watchdog"
    path.write_bytes(b"")
    dev = WatchdogDevice(str(path))
    with pytest.raises(WatchdogError, match="cannot set a 3s timeout"):
        dev.arm(3)
    assert path.read_bytes() == b"V"  # closed with the magic character
    with pytest.raises(WatchdogError, match="not armed"):
        dev.pet()
    with pytest.raises(ValueError, match="not a character device"):
        check_device(str(path))
    with pytest.raises(ValueError, match="No such file"):
        check_device(str(tmp_path / "missing"))
    check_device("/dev/null")  # a character device passes the start-up check


def test_agent_config_takes_a_watchdog_path() -> None:
    base = ["--name", "node-a", "--etcd", "http://127.0.0.1:2379", "--interface", "eth0"]
    assert agent_config.load([*base, "--watchdog", "/dev/watchdog"]).watchdog == "/dev/watchdog"
    assert agent_config.load(base).watchdog == ""
    with pytest.raises(ValueError, match="absolute device path"):
        agent_config.load([*base, "--watchdog", "watchdog0"])


def test_takeover_step_arms_first_or_fails_the_takeover(tmp_path: Path) -> None:
    spec = parse_spec("home", json.dumps({"vip": "10.77.0.100/24", "candidates": ["node-a"]}))
    h = holding("home", ttl=5, granted_at=time.monotonic())
    arm, dev, _ = make([h], time.monotonic())
    WatchdogStep(arm).up(TakeoverContext(spec, h))
    assert dev.armed and dev.calls[0] == ("arm", 2)

    path = tmp_path / "not-a-watchdog"
    path.write_bytes(b"")
    broken = WatchdogArm(WatchdogDevice(str(path)), lambda: [h])
    with pytest.raises(StepFailed, match=r"cannot arm the hardware watchdog: .*Inappropriate ioctl"):
        WatchdogStep(broken).up(TakeoverContext(spec, h))


def test_armed_until_the_disk_is_released_and_reset_before_a_new_owner_may_mount() -> None:
    """A fenced holding with its VIP down but its disk still mounted keeps the watchdog armed, petted
    only while a reset would still come before last_ack + TTL + release_bound (when a new owner may
    mount at the earliest); once unmounted, it is disarmed."""
    h = Holding(vfs="home", lease_id=1, ttl=4, granted_at=100.0, drop=lambda: None, holds_disk=True)
    dev, clock = FakeDevice(), Clock(100.0)
    arm = WatchdogArm(dev, lambda: [h], clock=clock, release_bound=10.0)
    assert arm.tick() == "petted" and arm.timeout == 2
    clock.now = 103.0  # past the self-fence deadline (103.0)
    h.fence("lease lost")  # VIP down, disk still mounted
    assert h.fenced and h.dropped_at_ns
    clock.now = 111.9  # 111.9 + 2 < 100 + 4 + 10
    assert arm.tick() == "petted" and dev.armed
    clock.now = 112.0
    assert arm.tick() == "withheld" and dev.armed  # the reset comes by 114.0 = last_ack + TTL + release_bound
    h.holds_disk = False  # the unmount finally succeeded
    assert arm.tick() == "disarmed" and not dev.armed


def test_a_fenced_holding_without_a_disk_disarms_as_before() -> None:
    h = Holding(vfs="vip-only", lease_id=1, ttl=4, granted_at=100.0, drop=lambda: None)
    dev, clock = FakeDevice(), Clock(100.0)
    arm = WatchdogArm(dev, lambda: [h], clock=clock, release_bound=10.0)
    arm.tick()
    h.fence("lease lost")
    assert arm.tick() == "disarmed"
