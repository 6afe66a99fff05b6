"""Virtual IP addresses on one interface, via netlink (pyroute2). Idempotent.

One netlink socket per interface object, used under a lock and opened again after any error:
opening an IPRoute costs ~6 ms of CPU (pyroute2 0.9 sets up an event loop), a call on an open
one ~0.6 ms, and a node with 100 VIPs makes thousands of these calls in a takeover storm.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")


class VipError(RuntimeError):
    pass


class VipInterface:
    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self._lock = threading.Lock()
        self._ipr: IPRoute | None = None
        found = self._netlink(lambda ipr: ipr.link_lookup(ifname=ifname))
        if not found:
            raise VipError(f"interface {ifname!r} not found")
        self.index = found[0]

    def _netlink(self, call: Callable[[Any], T]) -> T:
        """One call on the shared socket; after an error other than the kernel's answer the socket is
        closed (a new one next time)."""
        with self._lock:
            if self._ipr is None:
                self._ipr = IPRoute()
            try:
                return call(self._ipr)
            except NetlinkError:
                raise  # the kernel's answer (EEXIST, ENOENT, ...): the socket is fine
            except BaseException:
                ipr, self._ipr = self._ipr, None
                with contextlib.suppress(Exception):  # the call's own error is the one that matters
                    ipr.close()
                raise

    def close(self) -> None:
        with self._lock:
            ipr, self._ipr = self._ipr, None
        if ipr is not None:
            ipr.close()

    def addresses(self) -> set[ipaddress.IPv4Interface]:
        msgs = self._netlink(lambda ipr: list(ipr.get_addr(index=self.index, family=socket.AF_INET)))
        return {ipaddress.IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}") for m in msgs}

    def has(self, vip: ipaddress.IPv4Interface) -> bool:
        return any(a.ip == vip.ip for a in self.addresses())

    def add(self, vip: ipaddress.IPv4Interface) -> None:
        try:
            self._netlink(lambda ipr: ipr.addr("add", index=self.index, address=str(vip.ip),
                                               prefixlen=vip.network.prefixlen))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise VipError(f"cannot add {vip} to {self.ifname}: {exc}") from exc

    def remove(self, vip: ipaddress.IPv4Interface) -> None:
        """Remove the address whatever prefix length it was added with."""
        for addr in self.addresses():
            if addr.ip != vip.ip:
                continue
            try:
                self._netlink(lambda ipr, addr=addr: ipr.addr("del", index=self.index, address=str(addr.ip),
                                                              prefixlen=addr.network.prefixlen))
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise VipError(f"cannot remove {addr} from {self.ifname}: {exc}") from exc
