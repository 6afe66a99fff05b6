"""The host side of a takeover: VIP, ARP, the VFS filesystem and its NFS server.

Implements controller.takeover.FileserverHost. It decides nothing; the controller tells
it what to do and in which order.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from controller import loops
from controller.spec import VfsSpec
from node import arp
from node.ganesha import GaneshaServer
from node.kernel_nfsd import KernelNfsd
from node.localstate import RaisedVips
from node.nfs_server import NfsInstance, NfsServer, NfsServerError
from node.storage import Storage
from node.vip import VipInterface

log = logging.getLogger(__name__)

# Gratuitous ARP at once, then a few more spaced out, for clients that missed the first; after
# that only to defend the VIP (arp.keep_claim).
ANNOUNCE_AT = (0.0, 0.2, 0.5, 1.0, 2.0)
NFS_START_TIMEOUT = 20.0
NFS_STOP_TIMEOUT = 10.0


class Host:
    def __init__(self, ifname: str, state_dir: Path, nfs_backends: dict[str, NfsServer] | None = None) -> None:
        self.ifname = ifname
        self.iface = VipInterface(ifname)
        self.raised = RaisedVips(state_dir)
        self.storage = Storage(state_dir)
        self.nfs_workroot = state_dir / "nfs"
        self.nfs_backends: dict[str, NfsServer] = nfs_backends or {
            "ganesha": GaneshaServer(self.nfs_workroot), "kernel": KernelNfsd(self.nfs_workroot)}
        self._nfs_of: dict[str, NfsServer] = {}
        self._nfs_started: list[Callable[[str], None]] = []

    @property
    def mac(self) -> str:
        return arp.interface_mac(self.ifname)

    def vip_up(self, vip: ipaddress.IPv4Interface) -> None:
        # Remember first: a crash right after the netlink call must still leave a trace.
        self.raised.add(vip.with_prefixlen)
        self.iface.add(vip)

    def vip_down(self, vip: ipaddress.IPv4Interface) -> None:
        """Raises only if the address may still be up: that is what a fence retries and escalates."""
        self.iface.remove(vip)
        # The address is gone. A record that cannot be rewritten (ENOSPC) only makes the next start
        # remove an address that is not there: counted, never turned into a failed VIP removal.
        with loops.guarded("vip-record", vip.with_prefixlen, log):
            self.raised.discard(vip.with_prefixlen)

    def interface_networks(self) -> set[ipaddress.IPv4Interface]:
        """The interface's own addresses: without the VIPs this node raised (a VIP must not vouch
        for another VIP's subnet)."""
        raised = {ipaddress.IPv4Interface(v).ip for v in self.raised.load()}
        return {a for a in self.iface.addresses() if a.ip not in raised}

    def foreign_macs(self, vip: ipaddress.IPv4Interface) -> set[str]:
        # A socket per probe, in the takeover's own thread: a shared prober (one socket and thread for
        # all, tried) made a kill of the node of 100 slower, 4.60-4.85 s against 3.66-4.03 s (bench/scale).
        return arp.probe(self.ifname, str(vip.ip))

    def announce(self, vip: ipaddress.IPv4Interface, still_valid: Callable[[], bool]) -> None:
        """Gratuitous ARP now; then this node's ARP defender (one thread and socket for all VIPs,
        arp.Defender) repeats it (ANNOUNCE_AT) and defends the VIP against foreign claims for as
        long as the holding is valid. Never raises: a failed announcement (no socket, EMFILE) is
        counted and the defender announces at once; the VIP is up and ours either way."""
        schedule = ANNOUNCE_AT[1:]
        try:
            if not arp.announce(self.ifname, str(vip.ip), still_valid):
                return
        except Exception as exc:
            loops.record("arp-announce", exc, str(vip.ip), log)
            schedule = ANNOUNCE_AT  # starts with 0.0: the defender announces at once
        start = time.monotonic()

        def defended(macs: set[str]) -> None:
            log.warning("VIP %s claimed by %s; announced it again", vip.ip, ", ".join(sorted(macs)))

        try:
            self._arp_defender().add(str(vip.ip), still_valid, [start + at for at in schedule],
                                     lambda: self.iface.has(vip), on_defend=defended)
        except Exception as exc:  # RuntimeError "can't start new thread": nothing defends this VIP
            loops.record("arp-defence", exc, str(vip.ip), log)

    def _arp_defender(self) -> arp.Defender:
        return self.__dict__.setdefault("_defender", arp.Defender(self.ifname))  # type: ignore[no-any-return]

    # --- storage (controller.takeover.StorageHost) -----------------------------------------

    def mount(self, vfs: str, device: str, fstype: str, options: tuple[str, ...]) -> Path:
        return self.storage.mount(vfs, device, fstype, options)

    def unmount(self, vfs: str, device: str | None = None) -> None:
        self.storage.unmount(vfs, device)

    def read_epoch(self, vfs: str) -> int:
        return self.storage.read_epoch(vfs)

    def write_epoch(self, vfs: str, epoch: int) -> None:
        self.storage.write_epoch(vfs, epoch)

    # --- NFS server (controller.takeover.NfsHost) -------------------------------------------

    def nfs_start(self, spec: VfsSpec, epoch: int) -> None:
        assert spec.nfs is not None and spec.storage is not None
        self.storage.check_mounted(spec.name, spec.storage.device)
        backend = self.nfs_backends.get(spec.nfs.backend)
        if backend is None:
            raise NfsServerError(f"NFS backend {spec.nfs.backend!r} is not available on this node "
                                 f"(have: {sorted(self.nfs_backends)})")
        inst = NfsInstance(vfs=spec.name, vip=spec.vip_address, mountpoint=self.storage.mountpoint(spec.name),
                           workdir=self.nfs_workroot / spec.name, exports=spec.exports,
                           grace_seconds=spec.nfs.grace_seconds, lease_seconds=spec.nfs.lease_seconds, epoch=epoch)
        self._nfs_of[spec.name] = backend
        backend.start(inst, NFS_START_TIMEOUT)
        for callback in self._nfs_started:
            callback(spec.name)

    def nfs_stop(self, vfs: str) -> None:
        backend = self._nfs_of.pop(vfs, None)
        if backend is not None:
            backend.stop(vfs, NFS_STOP_TIMEOUT)

    def nfs_alive(self, vfs: str) -> bool:
        backend = self._nfs_of.get(vfs)
        return backend is not None and backend.alive(vfs)

    def nfs_pid(self, vfs: str) -> int | None:
        backend = self._nfs_of.get(vfs)
        return backend.pid(vfs) if backend is not None else None

    def on_nfs_started(self, callback: Callable[[str], None]) -> None:
        """`callback(vfs)` right after a server of that VFS started (the fence guard learns its pid)."""
        self._nfs_started.append(callback)

    def on_nfs_exit(self, callback: Callable[[str], None]) -> None:
        for backend in self.nfs_backends.values():
            backend.on_exit(callback)

    # --- start-up -------------------------------------------------------------------------------

    def remove_leftovers(self, managed: Iterable[ipaddress.IPv4Interface]) -> list[str]:
        """Remove what an earlier run left: VIPs first, then NFS servers, then mounts.

        Called at start-up, when this agent holds nothing yet. VIPs: the managed ones
        and those it remembers raising.
        """
        wanted_gone = {v.ip for v in managed} | {ipaddress.IPv4Interface(v).ip for v in self.raised.load()}
        removed = []
        for addr in self.iface.addresses():
            if addr.ip in wanted_gone:
                self.iface.remove(addr)
                removed.append(addr.with_prefixlen)
        for vip in self.raised.load():
            self.raised.discard(vip)
        leftover_vfs = set(self.storage.leftover_mounts())
        if self.nfs_workroot.is_dir():
            leftover_vfs.update(p.name for p in self.nfs_workroot.iterdir() if p.is_dir())
        for vfs in sorted(leftover_vfs):
            for backend in self.nfs_backends.values():
                if backend.remove_leftovers(vfs):
                    removed.append(f"{backend.name} server of {vfs}")
            if self.storage.mounted(vfs):
                self.storage.unmount(vfs)
                removed.append(f"mount of {vfs}")
        return removed
