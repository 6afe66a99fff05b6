"""The host side of a VIP takeover: address, ARP probe and announcements on one interface.

Implements controller.takeover.VipHost. It decides nothing; the controller tells it what
to do and when.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from node import arp
from node.localstate import RaisedVips
from node.vip import VipInterface

log = logging.getLogger(__name__)

# Gratuitous ARP at once, then a few more spaced out, for clients that missed the first.
ANNOUNCE_AT = (0.0, 0.2, 0.5, 1.0, 2.0)


class Host:
    def __init__(self, ifname: str, state_dir: Path) -> None:
        self.ifname = ifname
        self.iface = VipInterface(ifname)
        self.raised = RaisedVips(state_dir)

    @property
    def mac(self) -> str:
        return arp.interface_mac(self.ifname)

    def vip_up(self, vip: ipaddress.IPv4Interface) -> None:
        # Remember first: a crash right after the netlink call must still leave a trace.
        self.raised.add(vip.with_prefixlen)
        self.iface.add(vip)

    def vip_down(self, vip: ipaddress.IPv4Interface) -> None:
        self.iface.remove(vip)
        self.raised.discard(vip.with_prefixlen)

    def foreign_macs(self, vip: ipaddress.IPv4Interface) -> set[str]:
        return arp.probe(self.ifname, str(vip.ip))

    def announce(self, vip: ipaddress.IPv4Interface, still_valid: Callable[[], bool]) -> None:
        arp.announce(self.ifname, str(vip.ip))
        threading.Thread(target=self._announce_later, args=(vip, still_valid), daemon=True,
                         name=f"garp-{vip.ip}").start()

    def _announce_later(self, vip: ipaddress.IPv4Interface, still_valid: Callable[[], bool]) -> None:
        start = time.monotonic()
        for at in ANNOUNCE_AT[1:]:
            time.sleep(max(0.0, start + at - time.monotonic()))
            if not still_valid() or not self.iface.has(vip):
                return
            try:
                arp.announce(self.ifname, str(vip.ip))
            except OSError as exc:
                log.warning("gratuitous ARP for %s failed: %s", vip.ip, exc)
                return

    def remove_leftovers(self, managed: Iterable[ipaddress.IPv4Interface]) -> list[str]:
        """Remove VIPs this agent does not hold: the managed ones and those it remembers raising.

        Called at start-up, when this agent holds nothing yet.
        """
        wanted_gone = {v.ip for v in managed} | {ipaddress.IPv4Interface(v).ip for v in self.raised.load()}
        removed = []
        for addr in self.iface.addresses():
            if addr.ip in wanted_gone:
                self.iface.remove(addr)
                removed.append(addr.with_prefixlen)
        for vip in self.raised.load():
            self.raised.discard(vip)
        return removed
