"""Optional hardware watchdog (/dev/watchdog): the layer under the self-fence and the guard.

The self-fence needs the agent to run, the fence guard needs the guard to run; a kernel that
stalls, or an agent and guard both stuck (memory pressure, I/O in D state), defeats both while the
NIC may still answer ARP. A hardware watchdog resets the machine unless it is petted in time, as
Patroni uses it. Configure it with `watchdog = "/dev/watchdog"` (or --watchdog / NFS_HA_WATCHDOG).

INVARIANTS (this module keeps them; `WatchdogArm.tick` is the whole rule)

1. Armed exactly while this node has a holding that still needs protecting: one that is not fenced,
   or is fenced but its VIP is not down yet, or whose shared disk is not released yet (holds_disk:
   from acquire until an unmount succeeded). When none is left (released, self-fenced and
   unmounted, agent stopped), it is disarmed with the magic close ("V"), so an idle node is never
   reset.
2. Petted only while every such holding h has `now + timeout < bound(h)`:
   - not fenced, or its VIP not down: bound = `h.last_ack + h.ttl`. etcd cannot expire a lease
     before that (last_ack is the *send* time of the newest acknowledged keepalive), so if the
     agent freezes right after a pet, the reset (at most `timeout` later) comes before any other
     node can own the VFS.
   - fenced, VIP down, disk still mounted: bound = `h.last_ack + h.ttl + release_bound`. A new
     owner mounts no earlier than T_release (release_bound) after it saw the lease expire
     (controller/vfs_actions.py), so a node whose unmount hangs is reset before that: the
     watchdog is the guard's last escalation step where one is configured (node/guard.py).
3. A healthy agent that loses etcd is not reset: the last pet is at most PET_INTERVAL before
   `last_ack + ttl - timeout`, so the reset could come no earlier than `last_ack + ttl - PET_INTERVAL`,
   while the self-fence drops the VIP at `last_ack + ttl - margin` (margin >= 0.3 s, see
   controller.ownership.fence_margin) and then the watchdog is disarmed (1).
4. timeout = the largest whole second (the kernel API) <= half the smallest TTL held, at least 1 s;
   it is set again when the holdings change. Between two keepalives (TTL/4 apart) the condition
   in (2) keeps holding, so a healthy agent pets all the time. A TTL below MIN_TTL cannot be
   protected this way: the agent raises such TTLs to MIN_TTL when a watchdog is configured.
5. If the agent dies while armed (SIGKILL, crash) the device is closed without the magic character
   and the machine is reset: that is the point of it (the guard may be gone too). A stopped agent
   (SIGSTOP) stops petting and is reset the same way.

Nothing here is exercised against a real device in the lab (there is none, and it would reset the
machine); the rule is unit-tested with a fake device, the ioctls against a non-watchdog file.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from controller import loops
from controller.ownership import Holding
from controller.takeover import NothingToUndo, StepFailed, TakeoverContext

log = logging.getLogger(__name__)

MIN_TTL = 2  # a 1 s watchdog timeout needs a TTL of at least 2 s, see invariant 4
PET_INTERVAL = 0.05
# <linux/watchdog.h>: _IOR('W', 5, int), _IOWR('W', 6, int), _IOR('W', 7, int)
WDIOC_KEEPALIVE = 0x80045705
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707


class WatchdogError(RuntimeError):
    pass


class Device(Protocol):
    def arm(self, timeout: int) -> int: ...
    def set_timeout(self, timeout: int) -> int: ...
    def pet(self) -> None: ...
    def disarm(self) -> None: ...


class WatchdogDevice:
    """The Linux watchdog character device. Opening it starts the countdown."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def arm(self, timeout: int) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        self._fd = fd
        try:
            return self.set_timeout(timeout)
        except WatchdogError:
            self.disarm()
            raise

    def set_timeout(self, timeout: int) -> int:
        """Set the timeout; returns what the driver accepted (it may round)."""
        fd = self._require_fd()
        buf = array.array("i", [timeout])
        try:
            fcntl.ioctl(fd, WDIOC_SETTIMEOUT, buf, True)
        except OSError as exc:
            raise WatchdogError(f"{self.path}: cannot set a {timeout}s timeout: {exc}") from exc
        return buf[0]

    def pet(self) -> None:
        os.write(self._require_fd(), b"\0")

    def disarm(self) -> None:
        """Magic close: "V" then close stops the countdown (unless the driver has nowayout)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.write(fd, b"V")
        finally:
            os.close(fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise WatchdogError(f"{self.path} is not armed")
        return self._fd


def check_device(path: str) -> None:
    """Refuse a path that cannot be a watchdog, without opening it (opening arms it)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"watchdog {path!r}: {exc.strerror}") from None
    if not stat.S_ISCHR(mode):
        raise ValueError(f"watchdog {path!r} is not a character device")


def needs_protection(h: Holding) -> bool:
    """Invariant 1: not fenced, or fenced while its VIP is not down yet or its disk not released."""
    return not h.fenced or h.dropped_at_ns == 0 or h.holds_disk


def pet_bound(h: Holding, release_bound: float) -> float:
    """Invariant 2: the monotonic time a reset must come before."""
    vip_gone = h.fenced and h.dropped_at_ns != 0
    return h.last_ack + h.ttl + (release_bound if vip_gone else 0.0)


def timeout_for(holdings: Iterable[Holding]) -> int:
    """Invariant 4."""
    return max(1, min(h.ttl for h in holdings) // 2)


class WatchdogArm:
    """Arms, pets and disarms a watchdog device from the holdings of this node."""

    def __init__(self, device: Device, holdings: Callable[[], list[Holding]],
                 clock: Callable[[], float] = time.monotonic, release_bound: float = 0.0) -> None:
        self.device = device
        self._holdings = holdings
        self._clock = clock
        self.release_bound = release_bound
        self.timeout = 0  # 0: disarmed
        self.state = "disarmed"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: str = ""
        self._lock = threading.Lock()  # the pet thread and takeovers (ensure_armed) both tick

    def tick(self) -> str:
        """One step of the rule; returns "disarmed", "petted" or "withheld"."""
        with self._lock:
            return self._tick()

    def ensure_armed(self) -> None:
        """For a takeover: arm now (the new holding is already kept), or raise why not."""
        with self._lock:
            self._tick()
            if not self.timeout:
                raise WatchdogError(f"{getattr(self.device, 'path', 'watchdog')} is not armed")

    def _tick(self) -> str:
        live = [h for h in self._holdings() if needs_protection(h)]
        if not live:
            if self.timeout:
                self.device.disarm()
                self.timeout = 0
                log.info("watchdog disarmed: nothing held")
            self.state = "disarmed"
            return self.state
        want = timeout_for(live)
        if not self.timeout:
            self.timeout = self.device.arm(want)
            log.info("watchdog armed with a %ds timeout", self.timeout)
        elif want != self.timeout:
            self.timeout = self.device.set_timeout(want)
        now = self._clock()
        if all(now + self.timeout < pet_bound(h, self.release_bound) for h in live):
            self.device.pet()
            self.state = "petted"
        else:
            self.state = "withheld"
        return self.state

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(PET_INTERVAL):
            try:
                self.tick()
                self._failed = ""
            except Exception as exc:  # counted, never the end of petting (that would reset the node)
                loops.record("watchdog", exc, self.state, log)
                if str(exc) != self._failed:  # once per distinct failure, not 20 times a second
                    self._failed = str(exc)

    def stop(self) -> None:
        """Stop petting; disarm if nothing needs protection any more (call after every VFS was
        released). If something still does, stay armed: the process exit closes the device
        without the magic character and the machine is reset (invariant 5)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._disarm_if_idle()

    def _disarm_if_idle(self) -> None:
        live = [h.vfs for h in self._holdings() if needs_protection(h)]
        if live and self.timeout:
            log.critical("stopping while still holding %s: the watchdog will reset this machine", live)
            return
        if self.timeout:
            self.device.disarm()
            self.timeout = 0
        self.state = "disarmed"


@dataclass
class WatchdogStep(NothingToUndo):
    """First takeover step when a watchdog is configured: nothing is mounted or raised that the
    watchdog does not cover. Failing to arm it fails the takeover (the status says why)."""

    arm: WatchdogArm
    name: str = "watchdog"

    def up(self, ctx: TakeoverContext) -> None:
        try:
            self.arm.ensure_armed()
        except (OSError, WatchdogError) as exc:
            raise StepFailed(f"cannot arm the hardware watchdog: {exc}") from exc
