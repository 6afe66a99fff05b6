"""Virtual IP addresses on one interface, via netlink (pyroute2). Idempotent."""

from __future__ import annotations

import errno
import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError


class VipError(RuntimeError):
    pass


class VipInterface:
    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise VipError(f"interface {ifname!r} not found")
        self.index = found[0]

    def addresses(self) -> set[ipaddress.IPv4Interface]:
        with IPRoute() as ipr:
            msgs = ipr.get_addr(index=self.index, family=socket.AF_INET)
        return {ipaddress.IPv4Interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}") for m in msgs}

    def has(self, vip: ipaddress.IPv4Interface) -> bool:
        return any(a.ip == vip.ip for a in self.addresses())

    def add(self, vip: ipaddress.IPv4Interface) -> None:
        try:
            with IPRoute() as ipr:
                ipr.addr("add", index=self.index, address=str(vip.ip), prefixlen=vip.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise VipError(f"cannot add {vip} to {self.ifname}: {exc}") from exc

    def remove(self, vip: ipaddress.IPv4Interface) -> None:
        """Remove the address whatever prefix length it was added with."""
        for addr in self.addresses():
            if addr.ip != vip.ip:
                continue
            try:
                with IPRoute() as ipr:
                    ipr.addr("del", index=self.index, address=str(addr.ip), prefixlen=addr.network.prefixlen)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT):
                    raise VipError(f"cannot remove {addr} from {self.ifname}: {exc}") from exc
