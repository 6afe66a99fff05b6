"""The Lab facade: build, inspect, break and tear down the namespace lab."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import blockdev, build, disks, etcd, faketime, faults, mntns, mountinfo, netns, procs
from .errors import LabError
from .freeze import FreezeWatch, freeze_mount, thaw_everywhere
from .nscmd import netns_exec, node_enter
from .probe import probe_argv
from .report import node_report
from .runner import DEFAULT_TIMEOUT, run
from .state import StateDir, forget_proc, read_pidfile, record_proc, resolve_state_dir
from .topology import ETCD_MEMBERS, MEMBERS, NODES, Member, client_url, etcd_member, lab_namespaces


class Lab:
    """Three etcd members, three nfs-ha nodes and a client on one bridge, all in namespaces.

    Host names: ``node-a``, ``node-b``, ``node-c`` (10.77.0.21-23), ``client`` (10.77.0.50),
    ``etcd1``..``etcd3`` (10.77.0.11-13). Nodes run in their network namespace *and* a
    persistent private mount namespace (own /sys, own tmpfs on /run/nfs-ha); other hosts run
    via ``ip netns exec``. All state (pids, logs, etcd data, namespace pins) lives in
    ``state_dir`` ($NFSHA_LAB_DIR, default /run/nfsha-lab), so a later process can act on a
    running lab (see ``Lab.attach``).
    """

    def __init__(
        self, state_dir: str | os.PathLike[str] | None = None, heartbeat_ms: int = 50, election_ms: int = 500
    ) -> None:
        self.state = StateDir(resolve_state_dir(state_dir))
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        # Our own children, kept so they get reaped instead of lingering as zombies.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        # SIGSTOPped processes -> the timer that will SIGCONT them (None: wait for agent_sigcont).
        self._stopped: dict[int, threading.Timer | None] = {}
        self._stopped_lock = threading.Lock()

    @classmethod
    def attach(cls, state_dir: str | os.PathLike[str] | None = None) -> Lab:
        """Lab object for an already running lab, with the etcd timings its `up` recorded."""
        lab = cls(state_dir)
        config = lab.state.read_config()
        lab.heartbeat_ms = int(config.get("heartbeat_ms", lab.heartbeat_ms))
        lab.election_ms = int(config.get("election_ms", lab.election_ms))
        return lab

    @property
    def state_dir(self) -> Path:
        return self.state.root

    # ----- names and commands -------------------------------------------------------------

    @property
    def etcd_endpoints(self) -> list[str]:
        """["http://10.77.0.11:2379", "http://10.77.0.12:2379", "http://10.77.0.13:2379"]."""
        return list(etcd.ENDPOINTS)

    @property
    def etcd_endpoints_arg(self) -> str:
        """The endpoints comma-joined, as etcdctl --endpoints wants them."""
        return ",".join(etcd.ENDPOINTS)

    def node_cmd(self, node: str, argv: list[str]) -> list[str]:
        """argv running ``argv`` in the node's network + persistent mount namespace (cwd "/")."""
        return node_enter(_node(node), str(self.state.mntns_file(node)), list(argv))

    def client_cmd(self, argv: list[str]) -> list[str]:
        """argv running ``argv`` in the client namespace."""
        return netns_exec(MEMBERS["client"], list(argv))

    def ns_cmd(self, name: str, argv: list[str]) -> list[str]:
        """argv running ``argv`` in any lab host (node, client or etcdN)."""
        if name in NODES:
            return self.node_cmd(name, argv)
        return netns_exec(_member(name), list(argv))

    def run(
        self, name: str, argv: list[str], check: bool = True, timeout: float = DEFAULT_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in host ``name``, text output captured; CommandError if check and rc != 0."""
        return run(self.ns_cmd(name, argv), check=check, timeout=timeout)

    def etcdctl(
        self,
        *args: str,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        endpoints: list[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``etcdctl --endpoints=<all three, or endpoints> ARGS`` (API v3) from the client ns."""
        env = {**os.environ, "ETCDCTL_API": "3"}
        argv = etcd.etcdctl_argv(list(args), endpoints)
        return run(self.client_cmd(argv), check=check, timeout=timeout, env=env)

    def probe(self, name: str, ip: str, port: int, timeout: float = 1.0) -> str:
        """TCP connect from host ``name`` (the lab has no ping): "open" or "refused" (both mean
        reachable), "timeout", or "error:<ERRNO>" (e.g. "error:EINVAL" through a blackhole)."""
        return self.run(name, probe_argv(ip, port, timeout), timeout=timeout + 10).stdout.strip()

    def mac_of(self, node: str) -> str:
        """MAC address of eth0 in that node, lowercase aa:bb:cc:dd:ee:ff."""
        return netns.mac_of(_node(node).ns)

    # ----- lifecycle -----------------------------------------------------------------------

    def up(self, timeout: float = 30.0) -> None:
        """Clean leftovers of any earlier run, build the lab, wait for a healthy etcd cluster.

        Raises LabError (with the etcd log tails) if etcd is not healthy within ``timeout``;
        the half-built lab is then left for inspection and ``down()`` removes it.
        """
        self._teardown(leftovers=True)  # also loop devices of any other /run/nfsha-lab* dir
        self.state.make()
        self.state.write_config({"heartbeat_ms": self.heartbeat_ms, "election_ms": self.election_ms})
        build.build_hosts(self.state)
        for member in ETCD_MEMBERS.values():
            self._start_etcd(member, new=True)
        etcd.wait_healthy(self._etcdctl_nocheck, self.state, timeout, self._all_etcd_alive)

    @contextlib.contextmanager
    def running(self) -> Iterator[Lab]:
        """The lab, up for the `with` block and removed after it, even on failure."""
        try:
            self.up()
            yield self
        finally:
            self.down()

    def down(self) -> None:
        """Kill every process in any nfsha-* namespace (by PID, found via namespace inodes),
        unpin the node mount namespaces, delete the namespaces, detach the loop devices of
        this lab's disks (even ones still mounted in a node: they go with its namespace),
        remove the state dir. Idempotent and copes with a killed run's leftovers; raises
        LabError only if a lab mount cannot be removed or a lab disk is mounted outside the lab.
        """
        self._teardown(leftovers=False)

    def _teardown(self, leftovers: bool) -> None:
        self.sigcont_all()
        try:
            build.teardown(self.state, leftovers)
        finally:
            for pid, proc in list(self._children.items()):
                if proc.poll() is not None:
                    del self._children[pid]

    def status(self) -> dict[str, Any]:
        """Snapshot: {"up": bool, "state_dir", "namespaces": {ns: exists}, "etcd": {name: {ip,
        pid, alive}}, "nodes": {node: {ip, mac, link_up, switch_port_up, partitioned_from,
        mntns, pids, spawned}}, "disks": {name: device}}. "up" means every namespace exists and
        etcd is healthy."""
        present = set(netns.existing_lab_namespaces())
        result: dict[str, Any] = {
            "state_dir": str(self.state.root),
            "namespaces": {ns: ns in present for ns in lab_namespaces()},
            "etcd": {},
            "nodes": {node: node_report(m, self.state, present) for node, m in NODES.items()},
        }
        for name, member in ETCD_MEMBERS.items():
            pid = self._etcd_pid(member)
            result["etcd"][name] = {"ip": member.ip, "pid": pid, "alive": pid is not None}
        result["disks"] = self.disks()
        healthy = all(result["namespaces"].values()) and self._all_etcd_alive()
        if healthy:
            healthy = self._etcdctl_nocheck([*etcd.POLL_FLAGS, "endpoint", "health"]).returncode == 0
        result["up"] = healthy
        return result

    # ----- processes -----------------------------------------------------------------------

    def spawn(
        self, name: str, argv: list[str], log_path: str | os.PathLike[str], env: dict[str, str] | None = None
    ) -> int:
        """Start ``argv`` detached (own session) in host ``name``; stdout+stderr appended to
        ``log_path``; ``env`` entries are added to the current environment. Returns the pid
        once the process is inside the host's namespaces; it is recorded under
        STATE/procs/<name>/ and found again by kill_node and down."""
        cmd = self.ns_cmd(name, argv)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **env} if env else None,
            )
        self._children[proc.pid] = proc
        record_proc(self.state.procs_dir(name), proc.pid, {"argv": list(argv), "log": str(log_path)})
        self._wait_entered(name, proc.pid)
        return proc.pid

    def stop(self, pid: int, sig: int = signal.SIGTERM, timeout: float = 5.0) -> int | None:
        """Send ``sig`` to a lab process, wait for it, SIGKILL after ``timeout``.

        Returns the exit code (negative = killed by that signal) when known, i.e. when it is
        our child; otherwise /proc is polled and None returned. Refuses (LabError) a live pid
        that is neither our child nor inside a lab namespace.
        """
        popen = self._children.pop(pid, None)
        if popen is None and procs.is_alive(pid) and pid not in build.lab_pids(self.state):
            raise LabError(f"pid {pid} is not a lab process; not signalling it")
        self.agent_sigcont(pid)  # a stopped process would not act on SIGTERM
        code = procs.stop(pid, sig, timeout, popen)
        forget_proc(self.state, pid)
        return code

    def pids(self, name: str) -> list[int]:
        """PIDs of every process now living in host ``name``'s network namespace."""
        inode = procs.ns_inode(_member(name).netns_path)
        return procs.pids_in_namespaces([inode] if inode is not None else [])

    # ----- shared disks ----------------------------------------------------------------------

    def create_disk(self, name: str, size_mb: int = 512, fstype: str | None = "xfs") -> str:
        """Sparse image STATE/disks/<name>.img, formatted (mkfs.xfs / mkfs.ext4; None leaves it
        blank, e.g. for mount-failure tests), attached as a loop device: returns "/dev/loopN".
        Loop devices are global, so every node sees the disk, as with a SAN LUN."""
        return disks.create(self.state, name, size_mb, fstype)

    def disks(self) -> dict[str, str]:
        """{name: "/dev/loopN"} of this lab's attached disks (read from the loop table)."""
        return disks.lab_disks(self.state)

    def destroy_disk(self, name: str, force: bool = False) -> str | None:
        """Detach the disk and delete its image. LabError naming the mount namespaces/pids that
        still mount it; with ``force`` it is instead lazily unmounted in every node, detached
        anyway (freed at its last close) and a note on the holders returned."""
        device = self.disks().get(name)
        note = disks.destroy(self.state, name, force)
        # A later disk may get the same /dev/loopN: it must not inherit this one's blocks.
        for node in NODES:
            if device in blockdev.recorded(self.state, node):
                blockdev.unblock(self.state, node, device)
        return note

    def mounts_of(self, node: str) -> list[tuple[str, str]]:
        """(device, mountpoint) of every /dev/loop* mount in the node's mount namespace."""
        entries = mountinfo.node_entries(self.state, _node(node).name)
        if entries is None:
            raise LabError(f"{node} has no mount namespace (is the lab up?)")
        return [(e.source, e.point) for e in entries if e.source.startswith("/dev/loop")]

    def block_device_on(self, node: str, device: str) -> None:
        """Make ``device`` unmountable on ``node`` only (/dev/null bound over its device node in
        that node's mount namespace), as if the node lost its path to the disk. Kept across
        kill_node; undone by unblock_device_on or heal."""
        blockdev.block(self.state, _node(node).name, device)

    def unblock_device_on(self, node: str, device: str) -> None:
        blockdev.unblock(self.state, _node(node).name, device)

    # ----- node faults ---------------------------------------------------------------------

    def kill_node(self, node: str) -> list[int]:
        """Crash a node: both ends of its cable down, SIGKILL everything in its namespaces, and
        (a crash loses mounts) a fresh mount namespace replaces the old one. Returns the
        killed pids. ``revive_node`` plugs the cable back in."""
        killed = faults.crash(_node(node), self.state)
        for pid in killed:
            self._children.pop(pid, None)
            forget_proc(self.state, pid)
        blockdev.reapply(self.state, node)  # a rebooted node still cannot reach a blocked disk
        return killed

    def reset_node(self, node: str) -> dict[str, Any]:
        """Power-cycle a node, links left up: SIGKILL everything in its namespaces, thaw any
        frozen lab disk it mounts or holds, fresh mount namespace, only its own address. The
        record (node, killed pids, thawed disks, monotonic t) is appended to STATE/resets.jsonl
        (see ``resets``) and returned. What `compose/lab reset NODE` does."""
        member = _node(node)
        if not mntns.is_pinned(self.state.mntns_file(node)):
            # The namespace names are fixed: never power-cycle another lab's node by mistake.
            raise LabError(f"{node} has no mount namespace under {self.state.root} (is this lab up?)")
        record = faults.reset(member, self.state)
        for pid in record["killed"]:
            self._children.pop(pid, None)
            forget_proc(self.state, pid)
        blockdev.reapply(self.state, node)  # a rebooted node still cannot reach a blocked disk
        return record

    def resets(self) -> list[dict[str, Any]]:
        """Every reset so far (also those run by `compose/lab reset` from a fence guard)."""
        return faults.read_resets(self.state)

    def freeze(self, node: str, path: str, watch: bool = True) -> FreezeWatch | None:
        """`fsfreeze -f PATH` inside the node. With ``watch`` (default), a FreezeWatch keeps the
        freeze on that node, as on real hardware: once the node neither mounts nor holds the
        disk any more, its superblock (shared by all lab nodes) is thawed. Stop the watch and
        ``thaw_disk`` to undo."""
        member = _node(node)
        device = next((src for src, point in self.mounts_of(node) if point == path), None)
        if device is None:
            raise LabError(f"no lab disk is mounted at {path} on {node}")
        freeze_mount(self.state, member, path)
        return FreezeWatch(self.state, member, device).start() if watch else None

    def thaw_disk(self, device: str | None = None) -> list[str]:
        """Thaw ``device`` (or every lab disk) wherever the lab reaches it: mounts in node
        namespaces, files held by lab processes, else a private mount. What was thawed."""
        return thaw_everywhere(self.state, device)

    def revive_node(self, node: str) -> None:
        """Both link ends up again; addresses and routes were kept."""
        faults.revive(_node(node))

    def partition_node(self, node: str) -> None:
        """Cut the node off from etcd (blackhole /32 routes to each member, so connects fail
        at once with EINVAL) while the client and the other nodes still reach it."""
        faults.partition(_node(node))

    def heal(self, node: str | None = None) -> None:
        """Remove the etcd and client blackhole routes, bring both link ends up, unblock every
        blocked device and set the faketime clock offset back to +0, for ``node`` or all.
        Without ``node`` also undo every etcd_minority_partition and SIGCONT every process
        stopped by agent_sigstop."""
        for member in [_node(node)] if node else NODES.values():
            faults.heal(member)
            blockdev.unblock(self.state, member.name)
            if faketime.control_file(self.state, member.name).exists():
                faketime.write_offset(self.state, member.name, 0)
        if node is None:
            for member in ETCD_MEMBERS.values():
                faults.heal_etcd(member)
            self.sigcont_all()

    def cut_from_client(self, node: str) -> None:
        """The node and the client namespace can no longer talk (blackhole to 10.77.0.50/32 in
        the node, to the node's address in the client); etcd and the other nodes still reach
        it. Undone by heal(node) or heal()."""
        faults.cut_from_client(_node(node))

    def heal_client(self, node: str) -> None:
        faults.heal_client(_node(node))

    def ganesha_sigkill(self, node: str) -> list[int]:
        """SIGKILL every ganesha.nfsd in the node's network namespace (found by namespace
        inode and /proc/PID/comm); returns their pids."""
        killed = procs.kill_all(faults.ganesha_pids(_node(node)))
        for pid in killed:
            forget_proc(self.state, pid)
        return killed

    def ganesha_pids(self, node: str) -> list[int]:
        return faults.ganesha_pids(_node(node))

    # ----- process faults ------------------------------------------------------------------

    def _check_lab_pid(self, pid: int) -> None:
        if pid not in self._children and pid not in build.lab_pids(self.state):
            raise LabError(f"pid {pid} is not a lab process; not signalling it")

    def agent_sigkill(self, pid: int) -> int | None:
        """SIGKILL one lab process (an agent: what it started - VIP, Ganesha, mount - stays
        behind until an agent is started again on that node). Its exit code when known."""
        self.agent_sigcont(pid)  # forget any pending SIGCONT timer
        return self.stop(pid, signal.SIGKILL)

    def agent_sigstop(self, pid: int, seconds: float | None = None) -> None:
        """SIGSTOP a lab process now; SIGCONT it after ``seconds`` (a timer thread) or, with
        None, at agent_sigcont / heal() / down(). Every stopped process is SIGCONTed on
        heal() and teardown, so nothing stays frozen."""
        self._check_lab_pid(pid)
        timer = None
        if seconds is not None:
            timer = threading.Timer(seconds, self.agent_sigcont, args=(pid,))
            timer.daemon = True
        with self._stopped_lock:
            old = self._stopped.pop(pid, None)
            if old is not None:
                old.cancel()
            self._stopped[pid] = timer
        procs.signal_pid(pid, signal.SIGSTOP)
        if timer is not None:
            timer.start()

    def agent_sigcont(self, pid: int) -> bool:
        """SIGCONT a process stopped by agent_sigstop (cancelling its timer); False if it was
        not stopped by us."""
        with self._stopped_lock:
            if pid not in self._stopped:
                return False
            timer = self._stopped.pop(pid)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        procs.signal_pid(pid, signal.SIGCONT)
        return True

    def stopped_pids(self) -> list[int]:
        with self._stopped_lock:
            return sorted(self._stopped)

    def sigcont_all(self) -> None:
        for pid in self.stopped_pids():
            self.agent_sigcont(pid)

    # ----- clocks (libfaketime, per process) -----------------------------------------------

    def faketime_env(self, node: str) -> dict[str, str]:
        """Env entries for spawn() that run a process under libfaketime, reading its wall-clock
        offset from STATE/faketime/<node> ("+0" at first). Installs Debian's faketime package
        if missing and builds the clock_nanosleep fix (see labkit.faketime)."""
        return faketime.env(self.state, _node(node).name)

    def clock_jump(self, node: str, seconds: float) -> str:
        """Set the wall clock of every process started with faketime_env(node) to real time +
        ``seconds`` (absolute offset, 0 = back to real time; monotonic time is untouched).
        Returns the offset written ("+300s")."""
        return faketime.write_offset(self.state, _node(node).name, seconds)

    def clock_offset(self, node: str) -> str:
        return faketime.read_offset(self.state, _node(node).name)

    # ----- etcd members --------------------------------------------------------------------

    def kill_etcd_member(self, index: int, sig: int = signal.SIGKILL) -> int | None:
        """Stop etcd member ``index`` (1..3), SIGKILL by default (a crash). Returns its exit
        code when known (our child); None if it was not running or not ours."""
        member = etcd_member(index)
        pid = self._etcd_pid(member)
        if pid is None:
            return None
        code = procs.stop(pid, sig, 5.0, self._children.pop(pid, None))
        self.state.etcd_pidfile(member.name).unlink(missing_ok=True)
        return code

    def start_etcd_member(self, index: int, wait: bool = True, timeout: float = 20.0) -> int:
        """(Re)start member ``index`` on its existing data dir (--initial-cluster-state
        existing); with ``wait``, block until it answers health checks. Returns its pid."""
        member = etcd_member(index)
        pid = self._etcd_pid(member)
        if pid is None:
            pid = self._start_etcd(member, new=False)
        if wait:
            self._wait_member_healthy(member, timeout)
        return pid

    def etcd_minority_partition(self, index: int) -> None:
        """Cut etcd member ``index`` off from the two other members, every node and the
        client (blackhole routes both ways). Undone by heal_etcd(index) or heal()."""
        faults.isolate_etcd(etcd_member(index))

    def heal_etcd(self, index: int | None = None) -> None:
        """Undo etcd_minority_partition for member ``index`` or all."""
        for member in [etcd_member(index)] if index else ETCD_MEMBERS.values():
            faults.heal_etcd(member)

    def restart_all_etcd(self, timeout: float = 30.0) -> int:
        """SIGKILL all three members (by PID), start them again on their data dirs, wait until
        all are healthy and one is leader; returns the leader index."""
        for index in (1, 2, 3):
            self.kill_etcd_member(index)
        for member in ETCD_MEMBERS.values():
            self._start_etcd(member, new=False)
        etcd.wait_healthy(self._etcdctl_nocheck, self.state, timeout, self._all_etcd_alive)
        return self.wait_etcd_leader(timeout)

    def etcd_snapshot_save(self, path: str | os.PathLike[str], index: int | None = None) -> int:
        """`etcdctl snapshot save PATH` from member ``index`` (default: the leader); returns the
        snapshot's revision."""
        index = index or self.wait_etcd_leader(10)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.etcdctl("snapshot", "save", str(path), endpoints=[client_url(etcd_member(index))], timeout=60)
        status = run(["etcdctl", "snapshot", "status", str(path), "-w", "json"],
                     env={**os.environ, "ETCDCTL_API": "3"})
        return int(json.loads(status.stdout)["revision"])

    def etcd_snapshot_restore(self, path: str | os.PathLike[str], timeout: float = 30.0) -> int:
        """Restore the whole cluster from a snapshot, as an operator would after losing etcd:
        stop all three members, replace each data dir with `etcdctl snapshot restore` (own
        --name and peer URL, the lab's --initial-cluster), start them, wait until healthy and
        led. Keys, leases and the revision go back to the snapshot's. Returns the leader index.
        If a restore fails, the old data dirs are put back and started before LabError."""
        snapshot = str(Path(path).absolute())
        if not Path(snapshot).is_file():
            raise LabError(f"no snapshot file {snapshot}")
        for index in (1, 2, 3):
            self.kill_etcd_member(index, signal.SIGTERM)
        moved: list[tuple[Path, Path]] = []
        env = {**os.environ, "ETCDCTL_API": "3"}
        try:
            for member in ETCD_MEMBERS.values():
                data = self.state.etcd_data(member.name)
                old = data.with_name(data.name + ".before-restore")
                shutil.rmtree(old, ignore_errors=True)
                if data.exists():
                    data.rename(old)
                moved.append((data, old))
                run(etcd.restore_argv(member, snapshot, str(data)), env=env, timeout=60)
        except Exception:
            for data, old in moved:
                shutil.rmtree(data, ignore_errors=True)
                if old.exists():
                    old.rename(data)
            for member in ETCD_MEMBERS.values():
                self._start_etcd(member, new=False)
            raise
        for _, old in moved:
            shutil.rmtree(old, ignore_errors=True)
        for member in ETCD_MEMBERS.values():
            self._start_etcd(member, new=False)
        etcd.wait_healthy(self._etcdctl_nocheck, self.state, timeout, self._all_etcd_alive)
        return self.wait_etcd_leader(timeout)

    def etcd_pid(self, index: int) -> int | None:
        """PID of etcd member ``index`` (1..3) if it is running, else None."""
        return self._etcd_pid(etcd_member(index))

    def etcd_leader(self) -> int:
        """Index (1..3) of the current etcd leader (asked from the client namespace);
        LabError if no reachable member claims leadership right now."""
        proc = self.etcdctl(*etcd.POLL_FLAGS, "endpoint", "status", "-w", "json", check=False)
        return etcd.leader_index(proc.stdout)

    def wait_etcd_leader(self, timeout: float = 10.0) -> int:
        """Poll until some reachable member reports itself leader; its index (1..3).

        After the leader dies, writes sent before a new election are dropped by etcd and
        hang for the full request timeout (~5 s), so fault tests should wait here first.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.etcd_leader()
            except LabError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    # ----- internals -----------------------------------------------------------------------

    def _start_etcd(self, member: Member, new: bool) -> int:
        proc = etcd.start_member(member, self.state, self.heartbeat_ms, self.election_ms, new)
        self._children[proc.pid] = proc
        self._wait_entered(member.name, proc.pid)
        return proc.pid

    def _wait_entered(self, name: str, pid: int) -> None:
        # Return only once the process is inside the host, so kill_node/down can find it.
        pin = self.state.mntns_file(name)
        mnt = procs.ns_inode(pin) if name in NODES and mntns.is_pinned(pin) else None
        procs.wait_entered(pid, procs.ns_inode(_member(name).netns_path), mnt)

    def _etcd_pid(self, member: Member) -> int | None:
        """Recorded pid if that process is alive *and* inside the member's namespace."""
        pid = read_pidfile(self.state.etcd_pidfile(member.name))
        inode = procs.ns_inode(member.netns_path)
        if pid is None or inode is None or not procs.is_alive(pid):
            return None
        return pid if pid in procs.pids_in_namespaces([inode]) else None

    def _all_etcd_alive(self) -> bool:
        return all(self._etcd_pid(m) is not None for m in ETCD_MEMBERS.values())

    def _etcdctl_nocheck(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        return self.etcdctl(*args, check=False)

    def _wait_member_healthy(self, member: Member, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.etcdctl(*etcd.POLL_FLAGS, "endpoint", "health", check=False,
                                endpoints=[client_url(member)])
            if proc.returncode == 0:
                return
            time.sleep(0.05)
        raise LabError(f"{member.name} not healthy within {timeout}s\n{etcd.log_tail(self.state)}")


def _member(name: str) -> Member:
    try:
        return MEMBERS[name]
    except KeyError:
        raise LabError(f"unknown lab host {name!r}; expected one of {', '.join(MEMBERS)}") from None


def _node(node: str) -> Member:
    if node not in NODES:
        raise LabError(f"unknown node {node!r}; expected one of {', '.join(NODES)}")
    return NODES[node]
