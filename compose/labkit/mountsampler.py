"""Dual-mount sampler: every ~20 ms, which lab nodes mount (or still hold open) each lab disk.

    python -m labkit.mountsampler --state-dir DIR --out FILE [--interval 0.02] [--duration S]

(started by ``LabCluster.mount_sampler``). A sample records, per lab disk (a loop device backed by
STATE/disks/NAME.img), every lab node that

- mounts it: in the node's pinned mount namespace, or in the mount namespace of any process of
  the node (a process is the node's when its network namespace is the node's or its mount
  namespace is the node's pinned one); or
- holds its filesystem through a process of the node (cwd, root, an open file, a file mapping:
  compared by st_dev; mappings every 10th sample) while that process's own mount table does not
  show the disk - a lazily unmounted superblock still in use.

A *dual-mount sample* is one in which some disk has two or more such nodes: on real hardware,
two machines would have the filesystem at once.

Invariants:

- Only lab disks and lab node namespaces are looked at, never the host's other mounts.
- No reference to a node's mount namespace is kept between samples (an open namespace fd or a
  process left inside would keep a crashed node's mounts alive): the pinned namespace is entered
  with setns() for one read of /proc/self/mountinfo and left at once, holding the node's lock
  shared (labkit.nodelock) so that a crash or reset, which holds it exclusively, never finds the
  sampler inside (its scan would SIGKILL it). A node whose lock is taken, or whose namespace is
  not pinned, is *blind* in that sample (recorded). If leaving a node's namespace ever failed,
  the process exits at once rather than stay there.
- Single-threaded (setns into a mount namespace requires it) and runs in the root namespaces.
- Bounded: exits after --duration, on SIGTERM/SIGINT, or when its parent process goes away.

Output, JSON lines, times CLOCK_MONOTONIC (comparable with time.monotonic() of any process):
``{"event": "start", ...}``, then run-length encoded samples - one record per run of identical
samples, ``{"t0", "t1", "n", "disks": {disk: {node: [how, ...]}}, "dual": [disk, ...],
"blind": [node, ...]}`` ("dual" and "blind" only when not empty), flushed when the picture
changes and at least every second - and ``{"event": "stop", "samples", "max_gap_s", ...}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from . import disks, nodelock
from .mountinfo import parse as parse_mountinfo
from .state import StateDir
from .topology import NODES

CLONE_NEWNS = 0x00020000
DISK_REFRESH_S = 0.5  # how often the set of lab disks is re-read from sysfs
# File mappings are read every MAPS_EVERY-th sample only: /proc/PID/maps costs ~0.3 ms per
# process, and a mapping is the one use of a filesystem that needs no open fd (nfs-ha's processes
# map no file of a disk; a mapping alone would hold a lazily unmounted superblock).
MAPS_EVERY = 10
FLUSH_EVERY_S = 1.0


class Scanner:
    """Takes one sample of who mounts or holds which lab disk (see the module docstring)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._root_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        self._nsfs_dev = os.fstat(self._root_mnt).st_dev
        self._locks: dict[str, int] = {}
        self._me = os.getpid()
        self.devs: dict[int, str] = {}
        self._devs_at = -math.inf
        self._count = 0
        self._maps = True  # read file mappings in this sample
        self._mapped: dict[int, set[int]] = {}  # pid -> lab devices it maps, as last read

    # --- namespaces -----------------------------------------------------------------------

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def _leave(self) -> None:
        try:
            self._setns(self._root_mnt)
        except OSError:
            os._exit(70)  # never stay inside a node's mount namespace

    def _lock_fd(self, node: str) -> int | None:
        fd = self._locks.get(node)
        if fd is None:
            path = nodelock.lock_path(self.state, node)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                return None
            self._locks[node] = fd
        return fd

    def pinned_mountinfo(self, node: str) -> tuple[int | None, str | None]:
        """(inode, mountinfo text) of the node's pinned mount namespace; text None when it
        cannot be read now (not pinned, being replaced)."""
        pin = self.state.mntns_file(node)
        try:
            st = os.stat(pin)
        except OSError:
            return None, None
        if st.st_dev != self._nsfs_dev:
            return None, None  # the pin is not mounted: lab down, or a crash replaces it
        lock = self._lock_fd(node)
        if lock is None or not nodelock.try_shared(lock):
            return st.st_ino, None
        try:
            fd = os.open(pin, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if os.fstat(fd).st_ino != st.st_ino:
                    return st.st_ino, None
                self._setns(fd)
                try:
                    with open("/proc/self/mountinfo") as fh:
                        text = fh.read()
                finally:
                    self._leave()
            finally:
                os.close(fd)
        except OSError:
            return st.st_ino, None
        finally:
            nodelock.release(lock)
        return st.st_ino, text

    def processes(self) -> dict[int, tuple[str | None, str | None]]:
        """pid -> (network ns link, mount ns link), e.g. ("net:[4026532281]", "mnt:[4026532400]"),
        of every process but this one (compared as text: this runs for every process, every sample)."""
        found: dict[int, tuple[str | None, str | None]] = {}
        readlink = os.readlink
        me = str(self._me)
        for name in os.listdir("/proc"):
            if not name.isdigit() or name == me:
                continue
            try:
                found[int(name)] = (readlink(f"/proc/{name}/ns/net"), readlink(f"/proc/{name}/ns/mnt"))
            except OSError:
                continue  # gone, or a process we may not inspect
        return found

    # --- one sample -----------------------------------------------------------------------

    def refresh_disks(self, now: float) -> None:
        if now - self._devs_at >= DISK_REFRESH_S:
            self.devs = disks.lab_disk_devs(self.state)
            self._devs_at = now

    def sample(self, now: float) -> dict[str, Any]:
        """{"disks": {disk: {node: [how, ...]}}, "dual": [...], "blind": [...]}."""
        self.refresh_disks(now)
        self._count += 1
        self._maps = self._count % MAPS_EVERY == 1
        held: dict[str, dict[str, set[str]]] = {}
        blind: list[str] = []
        if self.devs:
            wanted = {f"{os.major(d)}:{os.minor(d)}": d for d in self.devs}
            table = self.processes()
            for node, member in NODES.items():
                if not self._sample_node(node, member.netns_path, wanted, table, held):
                    blind.append(node)
        if self._maps:
            self._mapped = {pid: devs for pid, devs in self._mapped.items() if devs and pid in table}
        result: dict[str, Any] = {"disks": {disk: {node: sorted(hows) for node, hows in sorted(nodes.items())}
                                            for disk, nodes in sorted(held.items())}}
        dual = sorted(disk for disk, nodes in held.items() if len(nodes) > 1)
        if dual:
            result["dual"] = dual
        if blind:
            result["blind"] = blind
        return result

    def _sample_node(self, node: str, netns_path: str, wanted: dict[str, int],
                     table: dict[int, tuple[str | None, str | None]], held: dict[str, dict[str, set[str]]]) -> bool:
        """Adds what ``node`` mounts or holds to ``held``; False if the node was blind."""
        try:
            net: int | None = os.stat(netns_path).st_ino
        except OSError:
            net = None
        pin, text = self.pinned_mountinfo(node)
        net_link = f"net:[{net}]" if net is not None else None
        pin_link = f"mnt:[{pin}]" if pin is not None else None
        seeing = text is not None or (net is None and pin is None)  # no lab at all: nothing to miss

        def add(dev: int, how: str) -> None:
            held.setdefault(self.devs[dev], {}).setdefault(node, set()).add(how)

        mounted: dict[int | None, set[int]] = {}
        if text is not None:
            mounted[pin] = self._mounted(text, wanted, lambda dev, point: add(dev, point))
        pids = [pid for pid, (n, m) in table.items()
                if (net_link is not None and n == net_link) or (pin_link is not None and m == pin_link)]
        for pid in pids:
            link = table[pid][1]
            mnt = pin if link == pin_link else _link_inode(link)
            if mnt not in mounted:
                try:
                    with open(f"/proc/{pid}/mountinfo") as fh:
                        other = fh.read()
                except OSError:
                    continue  # gone
                mounted[mnt] = self._mounted(
                    other, wanted, lambda dev, point, p=pid, m=mnt: add(dev, f"{point} (mount ns {m} of pid {p})"))
            if self._maps:
                mapped = _mapped(pid, self.devs)
                if mapped is not None:
                    self._mapped[pid] = mapped
            used = _used(pid, self.devs)
            for dev in self._mapped.get(pid, ()):
                used.setdefault(dev, set()).add("mmap")
            for dev, kinds in used.items():
                if dev not in mounted[mnt]:
                    add(dev, f"pid {pid} ({_comm(pid)}) {'+'.join(sorted(kinds))}, not mounted in its namespace")
        return seeing

    @staticmethod
    def _mounted(text: str, wanted: dict[str, int], add: Any) -> set[int]:
        found: set[int] = set()
        keys = [f" {key} " for key in wanted]
        if not any(key in text for key in keys):
            return found
        lines = "\n".join(line for line in text.splitlines() if any(key in line for key in keys))
        for entry in parse_mountinfo(lines):
            dev = wanted.get(entry.majmin)
            if dev is not None:
                found.add(dev)
                add(dev, entry.point)
        return found


def _link_inode(link: str | None) -> int | None:
    """4026532281 of "mnt:[4026532281]"."""
    if link is None:
        return None
    return int(link[link.index("[") + 1: -1])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return "?"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return "X"
    return stat[stat.rindex(")") + 2]


def _used(pid: int, devs: dict[int, str]) -> dict[int, set[str]]:
    """Lab devices whose filesystem ``pid`` uses: {dev: {"cwd", "root", "fd"}}."""
    found: dict[int, set[str]] = {}
    base = f"/proc/{pid}"
    paths = [(f"{base}/cwd", "cwd"), (f"{base}/root", "root")]
    try:
        paths += [(f"{base}/fd/{fd}", "fd") for fd in os.listdir(f"{base}/fd")]
    except OSError:
        return found  # gone
    for path, kind in paths:
        try:
            dev = os.stat(path).st_dev
        except OSError:
            continue
        if dev in devs:
            found.setdefault(dev, set()).add(kind)
    return found


def _mapped(pid: int, devs: dict[int, str]) -> set[int] | None:
    """Lab devices with a file mapped by ``pid`` (None: not read now). Reading maps takes the
    process's mmap lock; a process blocked in D state (a frozen filesystem) could make us wait
    behind it, so it is skipped and its last answer kept (its open files still show)."""
    if _state(pid) == "D":
        return None
    try:
        with open(f"/proc/{pid}/maps") as fh:
            maps = fh.read()
    except OSError:
        return None
    return {dev for dev in devs if f" {os.major(dev):02x}:{os.minor(dev):02x} " in maps}


class RunWriter:
    """Writes identical consecutive samples as one record (flushed on change, and every second)."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.key: str | None = None
        self.run: dict[str, Any] = {}
        self.flushed_at = time.monotonic()
        self.samples = 0

    def add(self, t: float, sample: dict[str, Any]) -> None:
        self.samples += 1
        key = json.dumps(sample, sort_keys=True)
        if key == self.key and t - self.flushed_at < FLUSH_EVERY_S:
            self.run["t1"] = round(t, 4)
            self.run["n"] += 1
            return
        self.flush()
        self.key = key
        self.run = {"t0": round(t, 4), "t1": round(t, 4), "n": 1, **sample}

    def flush(self) -> None:
        if self.run:
            self.write(self.run)
            self.run = {}
            self.key = None
        self.flushed_at = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record, sort_keys=True) + "\n")
        self.out.flush()


def summarize(records: list[dict[str, Any]], first: int = 5) -> dict[str, Any]:
    """What a chaos report keeps of a sampler's records."""
    runs = [r for r in records if "n" in r]
    duals = [r for r in runs if r.get("dual")]
    stop = next((r for r in records if r.get("event") == "stop"), None)
    return {
        "samples": sum(int(r["n"]) for r in runs),
        "dual_mount_samples": sum(int(r["n"]) for r in duals),
        "blind_samples": sum(int(r["n"]) for r in runs if r.get("blind")),
        "errors": sum(1 for r in records if r.get("event") == "error"),
        "max_gap_s": stop.get("max_gap_s") if stop else None,
        "stopped_cleanly": stop is not None,
        "first_dual": duals[:first],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mountsampler", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--duration", type=float, default=600.0)
    args = parser.parse_args(argv)
    parent = os.getppid()
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    scanner = Scanner(StateDir(Path(args.state_dir).absolute()))
    with open(args.out, "a") as out:
        writer = RunWriter(out)
        started = time.monotonic()
        writer.write({"event": "start", "t": round(started, 4), "state_dir": args.state_dir,
                      "interval": args.interval, "pid": os.getpid()})
        deadline = started + args.duration
        next_t = started
        last: float | None = None
        max_gap = 0.0
        busy = 0.0
        errors = 0
        while not stopping and time.monotonic() < deadline and os.getppid() == parent:
            t = time.monotonic()
            if last is not None:
                max_gap = max(max_gap, t - last)
            last = t
            try:
                sample = scanner.sample(t)
            except Exception as exc:  # a sampler bug must show, not end the sampling
                errors += 1
                if errors <= 20:
                    writer.flush()
                    writer.write({"event": "error", "t": round(t, 4), "error": repr(exc)[:500]})
                sample = {"disks": {}, "blind": ["*"]}
            writer.add(t, sample)
            busy += time.monotonic() - t
            next_t += args.interval
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()  # late: do not try to catch up with a burst
        writer.flush()
        why = "signal" if stopping else "parent gone" if os.getppid() != parent else "duration"
        writer.write({"event": "stop", "t": round(time.monotonic(), 4), "samples": writer.samples,
                      "max_gap_s": round(max_gap, 4), "mean_sample_ms": round(1000 * busy / max(1, writer.samples), 3),
                      "errors": errors, "why": why})
    return 0


if __name__ == "__main__":
    sys.exit(main())
