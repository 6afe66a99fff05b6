"""The ordered steps that bring a VFS up on a node and take it down again.

Acquire runs the steps in order after the owner transaction succeeded; release and
self-fence run them in reverse. The order is the protocol:

    up:   probe (nobody else answers the VIP) -> VIP up -> gratuitous ARP
    down: VIP down first (clients stop reaching this node) -> the rest

Storage and NFS steps (mount, epoch check, NFS server) slot in between probe and VIP.
The steps only call a host actuator interface; the host side effects live in node/.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from controller.ownership import Holding
from controller.spec import VfsSpec

log = logging.getLogger(__name__)


class StepFailed(RuntimeError):
    """A takeover step failed; the message says why, for the status `error` field."""


class VipHost(Protocol):
    """What the host must offer for the VIP part of a takeover (see node/host.py)."""

    def vip_up(self, vip: ipaddress.IPv4Interface) -> None: ...

    def vip_down(self, vip: ipaddress.IPv4Interface) -> None: ...

    def foreign_macs(self, vip: ipaddress.IPv4Interface) -> set[str]: ...

    def announce(self, vip: ipaddress.IPv4Interface, still_valid: Callable[[], bool]) -> None: ...


@dataclass
class TakeoverContext:
    spec: VfsSpec
    holding: Holding


class Step(Protocol):
    name: str

    def up(self, ctx: TakeoverContext) -> None: ...

    def down(self, ctx: TakeoverContext) -> None: ...


@dataclass
class ProbeStep:
    """Refuse to touch anything while another MAC still answers for the VIP."""

    host: VipHost
    name: str = "arp_probe"

    def up(self, ctx: TakeoverContext) -> None:
        macs = self.host.foreign_macs(ctx.spec.vip)
        if macs:
            raise StepFailed(f"VIP {ctx.spec.vip_address} still answers ARP from {', '.join(sorted(macs))}; "
                             "not raising it (is the previous owner still up?)")

    def down(self, ctx: TakeoverContext) -> None:
        pass


@dataclass
class VipStep:
    host: VipHost
    name: str = "vip"

    def up(self, ctx: TakeoverContext) -> None:
        ctx.holding.guarded(lambda: self.host.vip_up(ctx.spec.vip))

    def down(self, ctx: TakeoverContext) -> None:
        self.host.vip_down(ctx.spec.vip)


@dataclass
class AnnounceStep:
    """Gratuitous ARP, so clients re-learn the MAC at once instead of after ~35 s."""

    host: VipHost
    name: str = "gratuitous_arp"

    def up(self, ctx: TakeoverContext) -> None:
        holding = ctx.holding
        self.host.announce(ctx.spec.vip, lambda: not holding.fenced)

    def down(self, ctx: TakeoverContext) -> None:
        pass


def vip_steps(host: VipHost) -> list[Step]:
    return [ProbeStep(host), VipStep(host), AnnounceStep(host)]


def bring_up(steps: Sequence[Step], ctx: TakeoverContext) -> None:
    """Run the steps in order; on failure undo the ones done, in reverse, and raise StepFailed."""
    done: list[Step] = []
    for step in steps:
        try:
            step.up(ctx)
        except Exception as exc:
            errors = bring_down(done, ctx)
            reason = str(exc) if isinstance(exc, StepFailed) else f"{step.name} failed: {exc}"
            if errors:
                reason += f" (undo errors: {'; '.join(errors)})"
            raise StepFailed(reason) from exc
        done.append(step)


def bring_down(steps: Sequence[Step], ctx: TakeoverContext) -> list[str]:
    """Run every step's down in reverse order; go on past failures and return them."""
    errors = []
    for step in reversed(steps):
        try:
            step.down(ctx)
        except Exception as exc:
            log.exception("%s: step %s down failed", ctx.spec.name, step.name)
            errors.append(f"{step.name}: {exc}")
    return errors
