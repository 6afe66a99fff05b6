"""The ordered steps that bring a VFS up on a node and take it down again.

Acquire runs the steps in order after the owner transaction succeeded; release and
self-fence run them in reverse. The order is the protocol:

    up:   release-bound wait -> probe -> mount -> storage epoch -> NFS server -> VIP up -> gratuitous ARP
    down: VIP down -> NFS server stop -> unmount

- The release-bound wait comes first: after a *lost* owner (one that neither released nor
  fenced itself), nothing is mounted before T_release has passed since this node saw the old
  owner key go (docs/safety.md, "The disk bound"), unless the fencing hook confirmed the old
  node is off. By then the old node has unmounted or been reset.
- Before every step that touches shared state (mount, epoch write, NFS start, VIP) the holding
  is checked valid again: a takeover that outlived its lease (a slow mount, a frozen process)
  stops there instead of touching a disk another node may own by now.
- The probe comes before the disk is touched: a node that still answers the VIP may
  still have the filesystem mounted, and a shared disk mounted twice is corrupted.
- The storage epoch check refuses a disk that a newer owner has already written to. The
  storage epoch is the owner key's create_revision plus the cluster's epoch base
  (`<prefix>/epoch-base`, raised by `nfs-ha raise-epoch N` after etcd was restored from a
  snapshot and its revisions went back).
- A mount that fails (or times out: the kernel may still finish it) is checked and undone
  before the step fails; if that undo fails, the failure is critical and the VFS stays owned.
- VIP down comes first on the way down, so clients stop reaching this node before
  anything else happens, and a hung unmount can never keep the VIP up.
- The NFS server starts before the VIP so the first client packet finds it listening.

VIP-only VFS (no `storage` in the spec) skip the storage and NFS steps. The steps only
call host actuator interfaces; the host side effects live in node/.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from controller.ownership import Holding
from controller.spec import VfsSpec, vip_fits

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A takeover step failed; the message says why, for the status `error` field.

    `critical`: undoing the steps done so far failed in a way that leaves the disk
    mounted here, so ownership must be kept (another node must not mount it).
    """

    def __init__(self, message: str, critical: bool = False) -> None:
        super().__init__(message)
        self.critical = critical


class VipHost(Protocol):
    """What the host must offer for the VIP part of a takeover (see node/host.py)."""

    def vip_up(self, vip: ipaddress.IPv4Interface) -> None: ...

    def vip_down(self, vip: ipaddress.IPv4Interface) -> None: ...

    def foreign_macs(self, vip: ipaddress.IPv4Interface) -> set[str]: ...

    def interface_networks(self) -> set[ipaddress.IPv4Interface]: ...

    def announce(self, vip: ipaddress.IPv4Interface, still_valid: Callable[[], bool]) -> None: ...


class StorageHost(Protocol):
    """Mounting the VFS filesystem and reading/writing its epoch file (see node/storage.py)."""

    def mount(self, vfs: str, device: str, fstype: str, options: tuple[str, ...]) -> Path: ...

    def unmount(self, vfs: str, device: str | None = None) -> None:
        """Unmount the VFS's mount point; with `device`, also confirm the kernel no longer uses
        that block device (another mount namespace, a lazily detached superblock): only then is
        the disk released. Raises if it is not."""

    def read_epoch(self, vfs: str) -> int: ...

    def write_epoch(self, vfs: str, epoch: int) -> None: ...


class NfsHost(Protocol):
    """Starting and stopping this VFS's NFS server (see node/nfs_server.py)."""

    def nfs_start(self, spec: VfsSpec, epoch: int) -> None: ...

    def nfs_stop(self, vfs: str) -> None: ...

    def nfs_alive(self, vfs: str) -> bool: ...


@dataclass
class TakeoverContext:
    spec: VfsSpec
    holding: Holding
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds, for status
    # Each step runs inside observe(name) (the flow's trace: failover_trace.Flow.step); nothing by default.
    observe: Callable[[str], AbstractContextManager[object]] = lambda _name: contextlib.nullcontext()
    epoch_base: int = 0  # added to the holding's epoch for the storage epoch (see the docstring)
    not_before: float = 0.0  # monotonic time before which nothing is mounted (0: no wait)
    sleep: Callable[[float], None] = time.sleep  # injectable for tests
    cancelled: Callable[[], bool] = lambda: False  # the agent is stopping: give up waiting
    # Wraps a wait (the release bound, the ARP probe): the takeover gives its gate slot back meanwhile.
    waiting: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext

    @property
    def storage_epoch(self) -> int:
        return self.epoch_base + self.holding.epoch


class Step(Protocol):
    name: str
    critical_down: bool  # a failing `down` means the VFS must stay owned (disk still mounted)
    has_down: bool  # False: `down` does nothing (no span, no timing)
    touches_shared: bool  # True: the holding is checked valid right before `up`

    def up(self, ctx: TakeoverContext) -> None: ...

    def down(self, ctx: TakeoverContext) -> None: ...


class NothingToUndo:
    """For steps whose `down` has nothing to do (no span, no timing)."""

    critical_down = False
    has_down = False
    touches_shared = False

    def down(self, ctx: TakeoverContext) -> None:
        pass


@dataclass
class ReleaseBoundWait(NothingToUndo):
    """After a lost owner: wait until T_release has passed since its owner key went (ctx.not_before).

    The wait is cut short by nothing but the holding becoming invalid; the fencing hook's
    confirmation is decided by the caller (it then leaves not_before at 0)."""

    name: str = "release_bound_wait"

    def needed(self, ctx: TakeoverContext) -> bool:
        return ctx.not_before > 0  # no span, no timing for a takeover that has nothing to wait for

    def up(self, ctx: TakeoverContext) -> None:
        if ctx.not_before - time.monotonic() <= 0:
            return
        with ctx.waiting():
            self._wait(ctx)

    def _wait(self, ctx: TakeoverContext) -> None:
        while True:
            left = ctx.not_before - time.monotonic()
            if left <= 0:
                return
            if not ctx.holding.valid():
                raise StepFailed(f"{ctx.spec.name}: the holding ended while waiting for the lost owner's "
                                 "disk release bound")
            if ctx.cancelled():
                raise StepFailed(f"{ctx.spec.name}: the agent is stopping; gave up waiting for the lost "
                                 "owner's disk release bound (nothing was mounted)")
            ctx.sleep(min(left, 0.1))


@dataclass
class ProbeStep(NothingToUndo):
    """Refuse to touch anything while another MAC still answers for the VIP."""

    host: VipHost
    name: str = "arp_probe"

    def up(self, ctx: TakeoverContext) -> None:
        # The VIP's prefix must be the interface's subnet (or /32): its route must not take over
        # traffic for other hosts, such as the etcd members (controller/spec.py vip_fits).
        own = {a for a in self.host.interface_networks() if a.ip != ctx.spec.vip.ip}
        misfit = vip_fits(ctx.spec.vip, own)
        if misfit:
            raise StepFailed(misfit)
        with ctx.waiting():  # ~0.27 s of waiting for answers: no reason to hold a takeover slot meanwhile
            macs = self.host.foreign_macs(ctx.spec.vip)
        if macs:
            raise StepFailed(f"VIP {ctx.spec.vip_address} still answers ARP from {', '.join(sorted(macs))}; "
                             "not raising it (is the previous owner still up?)")



@dataclass
class VipStep:
    host: VipHost
    name: str = "vip"
    critical_down = True  # a VIP that could not be removed: keep the VFS owned, never two holders
    has_down = True
    touches_shared = True

    def up(self, ctx: TakeoverContext) -> None:
        ctx.holding.guarded(lambda: self.host.vip_up(ctx.spec.vip))

    def down(self, ctx: TakeoverContext) -> None:
        self.host.vip_down(ctx.spec.vip)


@dataclass
class AnnounceStep(NothingToUndo):
    """Gratuitous ARP, so clients re-learn the MAC at once instead of after ~35 s."""

    host: VipHost
    name: str = "gratuitous_arp"

    def up(self, ctx: TakeoverContext) -> None:
        self.host.announce(ctx.spec.vip, ctx.holding.valid)



@dataclass
class MountStep:
    host: StorageHost
    name: str = "mount"
    critical_down = True  # a disk left mounted here must stay owned
    has_down = True
    touches_shared = True

    def up(self, ctx: TakeoverContext) -> None:
        st = ctx.spec.storage
        if st is None:
            return
        try:
            self.host.mount(ctx.spec.name, st.device, st.fstype, st.options)
        except Exception as exc:
            if getattr(exc, "mounted_nothing", False):
                raise  # refused before mounting (e.g. the device is busy): nothing to undo
            # A mount that timed out may still have completed in the kernel: undo it here (the
            # step is not "done", so bring_up would not), and keep the VFS owned if that fails.
            try:
                self.host.unmount(ctx.spec.name, st.device)
            except Exception as undo:
                raise StepFailed(f"mount failed ({exc}) and the disk may be mounted: unmount failed: {undo}",
                                 critical=True) from exc
            raise

    def down(self, ctx: TakeoverContext) -> None:
        if ctx.spec.storage is not None:
            # With the device: the disk is released only once no superblock of it is left on this node.
            self.host.unmount(ctx.spec.name, ctx.spec.storage.device)


@dataclass
class EpochStep(NothingToUndo):
    """The storage epoch guard: never serve a disk that a newer owner has written to."""

    host: StorageHost
    name: str = "epoch_check"
    touches_shared = True

    def up(self, ctx: TakeoverContext) -> None:
        if ctx.spec.storage is None:
            return
        ours = ctx.storage_epoch
        on_disk = self.host.read_epoch(ctx.spec.name)
        if on_disk > ours:
            raise StepFailed(f"storage epoch {on_disk} on {ctx.spec.storage.device} is newer than ours ({ours}): "
                             "a newer owner has used this disk; refusing it. If etcd was restored from a "
                             f"snapshot (its revisions went back), run: nfs-ha raise-epoch {on_disk}")
        self.host.write_epoch(ctx.spec.name, ours)



@dataclass
class NfsStep:
    host: NfsHost
    name: str = "nfs_server"
    critical_down = False
    has_down = True
    touches_shared = True

    def up(self, ctx: TakeoverContext) -> None:
        if ctx.spec.storage is not None:
            self.host.nfs_start(ctx.spec, ctx.holding.epoch)

    def down(self, ctx: TakeoverContext) -> None:
        if ctx.spec.storage is not None:
            self.host.nfs_stop(ctx.spec.name)

    def healthy(self, ctx: TakeoverContext) -> bool:
        return ctx.spec.storage is None or self.host.nfs_alive(ctx.spec.name)


class FileserverHost(VipHost, StorageHost, NfsHost, Protocol):
    pass


def takeover_steps(host: FileserverHost) -> list[Step]:
    """The whole takeover, in protocol order (see the module docstring)."""
    return [ReleaseBoundWait(), ProbeStep(host), MountStep(host), EpochStep(host), NfsStep(host), VipStep(host),
            AnnounceStep(host)]


def bring_up(steps: Sequence[Step], ctx: TakeoverContext) -> None:
    """Run the steps in order; on failure undo the ones done, in reverse, and raise StepFailed."""
    done: list[Step] = []
    for step in steps:
        needed = getattr(step, "needed", None)
        if needed is not None and not needed(ctx):
            continue
        started = time.monotonic()
        try:
            if getattr(step, "touches_shared", False) and not ctx.holding.valid():
                raise StepFailed(f"the holding is no longer valid (fenced, released or past its deadline) "
                                 f"before step {step.name}; not touching shared state")
            with ctx.observe(step.name):
                step.up(ctx)
            ctx.timings[step.name] = round(time.monotonic() - started, 4)
        except Exception as exc:
            undone = bring_down(done, ctx)
            reason = str(exc) if isinstance(exc, StepFailed) else f"{step.name} failed: {exc}"
            if undone.errors:
                reason += f" (undo errors: {'; '.join(undone.errors)})"
            own_critical = isinstance(exc, StepFailed) and exc.critical
            raise StepFailed(reason, critical=undone.critical or own_critical) from exc
        done.append(step)


@dataclass
class DownResult:
    errors: list[str]
    critical: bool  # a step failed whose failure leaves shared state behind (a mounted disk)


def bring_down(steps: Sequence[Step], ctx: TakeoverContext) -> DownResult:
    """Run every step's down in reverse order; go on past failures and report them."""
    errors, critical = [], False
    for step in reversed(steps):
        if not step.has_down:
            continue
        started = time.monotonic()
        try:
            with ctx.observe(f"{step.name}_down"):
                step.down(ctx)
            ctx.timings[f"{step.name}_down"] = round(time.monotonic() - started, 4)
        except Exception as exc:
            log.exception("%s: step %s down failed", ctx.spec.name, step.name)
            errors.append(f"{step.name}: {exc}")
            critical = critical or step.critical_down
    return DownResult(errors, critical)


class RestartBudget:
    """How many restarts of a held VFS's dead NFS server are allowed before the VFS is given up.

    More than `allowed` within `window` seconds means the server cannot stay up on this node;
    another candidate may do better. The clock is injectable for tests.
    """

    def __init__(self, allowed: int = 3, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.allowed, self.window, self._clock = allowed, window, clock
        self._times: list[float] = []

    def spend(self) -> bool:
        """Count one restart; False once the budget is exceeded."""
        now = self._clock()
        self._times = [t for t in self._times if now - t < self.window] + [now]
        return len(self._times) <= self.allowed

    def used(self) -> int:
        return len(self._times)


def restart_dead(steps: Sequence[Step], ctx: TakeoverContext, budget: RestartBudget) -> str | None:
    """Restart every step that reports itself unhealthy; the reason to give the VFS up, or None."""
    for step in steps:
        healthy = getattr(step, "healthy", None)
        if healthy is None or healthy(ctx):
            continue
        if not budget.spend():
            return f"{step.name} died {budget.used()} times in {budget.window:.0f}s"
        log.warning("%s: %s is not running; restarting it", ctx.spec.name, step.name)
        try:
            step.down(ctx)
            step.up(ctx)
        except Exception as exc:
            return f"{step.name} died and could not be restarted: {exc}"
    return None
