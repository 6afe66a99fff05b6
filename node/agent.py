"""The node agent: registers the node, watches the keyspace, runs one reconciler per VFS.

Start-up order matters: leftover VIPs are removed before any reconciler runs, so this
agent never serves something it does not hold. SIGTERM hands every VFS over at once
(VIP down, then owner key deleted and lease revoked).

Reconcilers: one per VFS that has a spec, owner or status key (an intent alone starts none;
junk keys, see controller/keyspace.py, start none and are logged once at warning). When a
VFS loses all three, its reconciler is stopped and dropped, but only once its thread holds
nothing: a VFS still held is released first (its spec is gone), never abandoned.

Threads (issue 9: threads only where they pay for themselves; a node with 100 VFS runs ~110):
- main: signals only; "agent": start-up, then registration and replacing a dead fence guard;
- "watch" (controller/watcher.py): applies watch batches to the view and calls _on_view, which
  wakes only the reconcilers of the VFS a batch concerns (ClusterView.affected);
- one "vfs-<name>" per VFS with a spec, owner or status key (controller/reconcile.py): sleeps on
  an event while nothing concerns it (a held VIP-only VFS waits for events and the 5 s resync; an
  NFS VFS checks its server every second), so 100 idle ones cost memory, not CPU. A thread per
  VFS keeps a slow step (a mount, a release-bound wait, a stuck unmount) from delaying any
  other VFS; how many of them run a takeover at once is bounded (TakeoverGate, parallel_takeovers);
- "keepalive" sends the keepalives of all leases, in rounds, on one stream (controller/leasestream.py),
  "lease-stream" applies etcd's answers, "fence-monitor" fences holdings past their deadline,
  "guard-renewals" tells the fence guard the renewed deadlines in batches (controller/ownership.py);
- one ARP defender per interface (node/arp.py Defender, "arp-defence-<if>") announces and defends
  every held VIP, while any is held; NFS server supervisors (node/ganesha.py), one per server;
- short-lived: retiring a deleted VFS's reconciler, handing every VFS over on SIGTERM.

Signals: SIGTERM and SIGINT stop the agent at any time, also while start-up still waits
for etcd (exit 0; nothing is held before start-up ends). SIGHUP re-reads the configuration
and applies only its log_level (options and NFS_HA_* still win over the file, as at start);
without a config file it changes nothing. It never stops the agent.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

from controller import loops, metrics, tracing
from controller.coordination import Coordination
from controller.diskrisk import restore_hold
from controller.gate import Backoff, TakeoverGate
from controller.keyspace import Keyspace
from controller.ownership import Holding, LeaseKeeper, guard_deadline
from controller.reconcile import AgentContext, VfsReconciler
from controller.spec import SpecError, parse_spec
from controller.status import wall_clock
from controller.store import EtcdStore, StoreError
from controller.takeover import Step, takeover_steps
from controller.view import ClusterView
from controller.watcher import ViewKeeper
from node import config as agent_config
from node import logsetup, sdnotify
from node.fencing import FenceCommand
from node.guard import GuardClient, read_actions
from node.host import Host
from node.observe import ObservabilityServer
from node.vip import VipError
from node.watchdog import MIN_TTL as WATCHDOG_MIN_TTL
from node.watchdog import WatchdogArm, WatchdogDevice, WatchdogStep, check_device

log = logging.getLogger("nfs-ha-agent")
T = TypeVar("T")


MAX_REFUSALS_PUBLISHED = 100
MAX_REFUSED_NAMES = 500  # with 100 reasons of 200 bytes and 63-byte names, under the view's 64 KiB
MAX_REFUSAL_TEXT = 200


class StopRequested(Exception):
    """A stop (SIGTERM, SIGINT) came while start-up was still waiting for etcd."""


class Agent:
    def __init__(self, cfg: agent_config.AgentConfig) -> None:
        self.cfg = cfg
        access = cfg.etcd_access()
        self.store = Coordination(EtcdStore(access), Keyspace(cfg.prefix))
        self._etcd_endpoints = len(access.endpoints)
        self.host = Host(cfg.interface, cfg.node_state_dir)
        self.keeper = LeaseKeeper(self.store, on_deadline=self._guard_hold, on_deadlines=self._guard_holds,
                                  on_removed=self._guard_release,
                                  on_drop_failed=self._vip_drop_failed)
        self.guard: GuardClient | None = None
        self.watchdog = (WatchdogArm(WatchdogDevice(cfg.watchdog), self.keeper.holdings,
                                     release_bound=cfg.release_bound) if cfg.watchdog else None)
        self._guard_records: list[dict[str, object]] = []
        self.backoff = Backoff(on_change=self._register_soon)
        self.policy = cfg.node_policy()
        self.observer = None if cfg.metrics_address == "off" else ObservabilityServer(
            cfg.metrics_address, metrics.REGISTRY, self.health_problems, self.ready)
        self._collector = metrics.AgentCollector(self.metrics_state)
        self._refused: dict[str, str] = {}  # VFS this node's policy refuses, with why (published)
        self.views = ViewKeeper(self.store, lambda view: self._on_view(view, self.views.affected),
                                on_went_back=self._etcd_went_back)
        self._quiet_until = 0.0  # monotonic; no takeover before (etcd restored from a snapshot)
        self._went_back_at: float | None = None  # monotonic; when etcd was last seen going back
        self.host.on_nfs_exit(self._wake_vfs)
        self.host.on_nfs_started(self._guard_hold_vfs)  # the guard learns a new server pid at once
        self.reconcilers: dict[str, VfsReconciler] = {}
        self._retiring: dict[str, threading.Thread] = {}  # VFS whose reconciler is being stopped
        self._junk_seen: set[str] = set()  # junk keys already logged
        self._lock = threading.Lock()
        self._node_lease = 0
        self._stopping = threading.Event()
        self._registration_due = threading.Event()
        self._ready = False  # no reconciler may run before leftovers are cleaned up
        self.ctx = AgentContext(me=cfg.name, store=self.store, keeper=self.keeper,
                                steps=self._steps(), view=lambda: self.views.view,
                                default_ttl=cfg.lease_ttl, rank_delay=cfg.rank_delay, backoff=self.backoff,
                                vip_down=self.host.vip_down,
                                fence=FenceCommand(cfg.fence_command, cfg.fence_timeout) if cfg.fence_command else None,
                                fence_required=cfg.fence_required,
                                min_ttl=WATCHDOG_MIN_TTL if cfg.watchdog else 1,
                                release_bound=cfg.release_bound,
                                hold_off=lambda: max(0.0, self._quiet_until - time.monotonic()),
                                takeovers=TakeoverGate(cfg.takeover_limit()),
                                refuses=self.policy.refuses, note_refusal=self._note_refusal)
        gate = self.ctx.takeovers
        assert gate is not None
        tracing.defer_while(gate.busy)  # span exports wait for a takeover storm to pass

    def _steps(self) -> list[Step]:
        steps = takeover_steps(self.host)
        if self.watchdog is not None:
            steps.insert(0, WatchdogStep(self.watchdog))
        return steps

    # --- metrics and health (node/observe.py) ----------------------------------------------------

    def ready(self) -> bool:
        return self._ready and not self._stopping.is_set()

    def metrics_state(self) -> metrics.NodeState:
        """What the metrics read at a scrape: O(VFS), from the view and the reconcilers."""
        view, now = self.views.view, time.monotonic()
        with self._lock:
            recs = dict(self.reconcilers)
            refused = len(self._refused)
        rows = []
        for name in view.vfs_names():
            rec = recs.get(name)
            h = rec.holding if rec is not None else None
            held = h is not None and not h.fenced
            act = rec.act if rec is not None else None
            spec = act.held_spec if act is not None else None
            grace = None
            if held and spec is not None and spec.nfs is not None and act is not None and act.serving_since:
                grace = max(0.0, spec.nfs.grace_seconds - (now - act.serving_since))
            rows.append(metrics.VfsState(
                name, held, str((view.status(name) or {}).get("phase", "unplaced")),
                epoch=h.epoch if held and h is not None else None, grace_remaining=grace,
                last_takeover=act.last_takeover if act is not None else None,
                last_steps=dict(act.last_steps) if act is not None else {}))
        margins = [h.deadline - now for h in self.keeper.holdings() if not h.fenced]
        return metrics.NodeState(
            rows, min(margins) if margins else None, self.guard is not None and self.guard.alive(),
            {"grpc": self.store.endpoint(), "keepalive": self.keeper.stream_endpoint()},
            {name: int(v.get("count", 0)) for name, v in loops.errors().items()}, refused)

    def health_problems(self) -> list[str]:
        """Why /healthz fails: the guard is gone, or a VFS held and serving lacks its VIP or its mount,
        or a holding is within one keepalive interval (TTL/4) of its self-fence deadline."""
        problems = []
        if self.guard is None or not self.guard.alive():
            problems.append("the fence guard is not running")
        with self._lock:
            recs = list(self.reconcilers.values())
        addresses = {a.ip for a in self.host.iface.addresses()} if recs else set()
        now = time.monotonic()
        for rec in recs:
            h, act = rec.holding, rec.act
            spec = act.held_spec
            if h is None or h.fenced or spec is None or act.serving_since is None:
                continue  # not held, or still being taken over or released
            if spec.vip.ip not in addresses:
                problems.append(f"{rec.vfs}: VIP {spec.vip_cidr} is not on {self.cfg.interface}")
            if spec.storage is not None and not self.host.storage.mounted(rec.vfs):
                problems.append(f"{rec.vfs}: its disk is not mounted")
            if h.deadline - now < h.ttl / 4:
                problems.append(f"{rec.vfs}: {h.deadline - now:.2f}s to its self-fence deadline (keepalives late)")
        return problems

    # --- node registration -------------------------------------------------------------

    def _registration(self) -> str:
        refused, refused_more = self._published_refusals()
        return json.dumps({
            "version": _version(), "interface": self.cfg.interface, "mac": self.host.mac,
            "addresses": sorted(a.with_prefixlen for a in self.host.iface.addresses()),
            "hostname": socket.gethostname(), "started": self._started, "backoff": self.backoff.published(),
            "refused": refused, "refused_more": refused_more,
            "guard": self._guard_records[-5:], "watchdog": self.cfg.watchdog or None,
            "release_bound": self.cfg.release_bound, "reset": self._reset_means(), "loop_errors": loops.errors(),
            # The TTLs this node holds leases with, for the hold after an etcd restore (restore_hold).
            "lease_ttl": self.cfg.lease_ttl, "min_ttl": self.ctx.min_ttl,
            "max_held_ttl": max((h.ttl for h in self.keeper.holdings()), default=0),
        }, sort_keys=True)

    def _reset_means(self) -> str:
        """How this node enforces the disk bound when an unmount hangs (docs/safety.md)."""
        means = [m for m, on in (("reset command", self.cfg.reset_command), ("watchdog", self.cfg.watchdog)) if on]
        return " + ".join(means) or "none"

    def register(self) -> None:
        if not self._node_lease:
            self._node_lease, ttl = self.store.grant(self.cfg.lease_ttl)
            self.keeper.add_plain(self._node_lease, ttl, self._node_lease_lost)
        self.store.register(self.cfg.name, self._registration(), self._node_lease)

    def _node_lease_lost(self, _lease_id: int) -> None:
        log.warning("node lease lost; registering again")
        self._node_lease = 0
        self._registration_due.set()

    def _note_refusal(self, vfs: str, why: str | None) -> None:
        """A reconciler's policy verdict on its VFS; a change is published (placement skips this node)."""
        with self._lock:
            if self._refused.get(vfs) == why:
                return
            if why is None:
                del self._refused[vfs]
            else:
                self._refused[vfs] = why[:MAX_REFUSAL_TEXT]
                log.error("%s: refused by this node's policy: %s", vfs, why)
        self._register_soon()

    def _published_refusals(self) -> tuple[dict[str, str], list[str]]:
        """The refusals with their reasons, at most MAX_REFUSALS_PUBLISHED, and the names of the rest: a
        registration must stay far below the view's value limit (controller/view.py reads a bigger one
        as empty), but every refusal must be seen, or a holder would move a VFS here by intent and take
        it back (placement.refusals)."""
        with self._lock:
            items = sorted(self._refused.items())
        names = [name for name, _why in items[MAX_REFUSALS_PUBLISHED:]]
        if len(names) > MAX_REFUSED_NAMES:
            log.error("this node's policy refuses %d VFS; only %d are published (placement may try this "
                      "node for the others)", len(items), MAX_REFUSALS_PUBLISHED + MAX_REFUSED_NAMES)
        return dict(items[:MAX_REFUSALS_PUBLISHED]), names[:MAX_REFUSED_NAMES]

    def _initial_refusals(self, view: ClusterView) -> None:
        """Before the first registration: a restarted node must not look willing for a moment (a holder
        would move a VFS to it by intent, and it would refuse and send it on)."""
        for name in view.vfs_names():
            spec = view.config(name).spec
            if spec is not None and self.cfg.name in spec.candidates:
                why = self.policy.refuses(spec)
                if why is not None:
                    self._note_refusal(name, why)

    def _register_soon(self) -> None:
        self._registration_due.set()

    # --- start-up ------------------------------------------------------------------------

    def start(self) -> None:
        self._started = wall_clock()
        metrics.REGISTRY.register(self._collector)
        if self.observer is not None:
            self.observer.start()  # from the start: /readyz says "not yet" while etcd is awaited
        if self.cfg.watchdog:
            try:
                check_device(self.cfg.watchdog)
            except ValueError as exc:
                log.critical("%s", exc)
                raise SystemExit(2) from exc
        if not self.cfg.allowed_devices:
            log.warning("no allowed_devices in the node policy: a spec may name any device under /dev/ "
                        "(docs/operations.md, \"Node policy\")")
        view = self._retry("initial load", self.views.load)
        try:
            removed = self.host.remove_leftovers(_managed_vips(view))
        except Exception as exc:
            # Serving anything while an old mount or server lingers could double-mount a disk.
            log.critical("cannot clean up what an earlier run left behind: %s", exc)
            raise SystemExit(1) from exc
        if removed:
            log.warning("removed leftover VIPs of an earlier run: %s", removed)
        self._take_guard_records()
        self._start_guard()
        self.keeper.start()
        if self.watchdog is not None:
            self.watchdog.start()
        self._initial_refusals(view)
        self._retry("registration", self.register)
        self._ready = True
        self.views.start()
        self._on_view(self.views.view)
        log.info("agent %s started on %s (lease TTL %ds, prefix %s)", self.cfg.name, self.cfg.interface,
                 self.cfg.lease_ttl, self.store.keyspace.prefix)
        # Type=notify: `systemctl start` returns once the node is registered and its VFS are being placed.
        sdnotify.notify("READY=1", f"STATUS=registered as {self.cfg.name}, prefix {self.store.keyspace.prefix}")

    def request_stop(self) -> None:
        """Ask start-up (and the registration loop) to give up; safe from a signal handler."""
        self._stopping.set()

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        refusals = 0
        while not self._stopping.is_set():
            try:
                return fn()
            except StoreError as exc:
                refusals = refusals + 1 if exc.refused else 0
                # A wrong password, CA or certificate, or a missing role: nothing is held yet, and
                # retrying will not help; exit with the reason (as a bad config file does). Only once
                # every endpoint had its turn: one member with a bad certificate is not all of etcd.
                if refusals > self._etcd_endpoints:
                    log.critical("%s: etcd refused this agent, fix the etcd settings: %s", what, exc)
                    raise SystemExit(2) from exc
                log.warning("%s failed, retrying: %s", what, exc)
                self._stopping.wait(1.0)
        raise StopRequested(what)

    def _on_view(self, view: ClusterView, affected: set[str] | None = None) -> None:
        """A new view: start reconcilers of new VFS, retire those of deleted ones, and wake the ones
        the change concerns (`affected`, ClusterView.affected; None: all of them). With `affected`
        given this costs O(VFS it names), so a status write is not paid for by every VFS."""
        with self._lock:
            if self._stopping.is_set() or not self._ready:
                return
            if self._went_back_at is not None and time.monotonic() < self._quiet_until:
                # Nodes re-register after a restore (their node lease is not in the snapshot): what
                # they publish now may lengthen the hold. Only during the hold: it parses every spec.
                self._quiet_until = max(self._quiet_until, self._went_back_at + restore_hold(
                    view, self.cfg.lease_ttl, self.cfg.release_bound))
            junk = view.index.junk.keys()
            if junk != self._junk_seen:
                for key in sorted(junk - self._junk_seen):
                    log.warning("ignoring key %r: not an nfs-ha key (invalid name or unknown field)", key[:200])
                self._junk_seen = set(junk)
            names = sorted(view.index.fields) + sorted(self.reconcilers) if affected is None else sorted(affected)
            for name in dict.fromkeys(names):
                rec = self.reconcilers.get(name)
                wanted = view.has_reconcilable_keys(name)
                if rec is None and wanted:
                    rec = self.reconcilers[name] = VfsReconciler(name, self.ctx)
                    rec.start()
                elif rec is not None and not wanted and name not in self._retiring:
                    t = threading.Thread(target=self._retire, args=(name, rec), name=f"retire-{name}", daemon=True)
                    self._retiring[name] = t
                    t.start()
                if rec is not None:
                    rec.wake()

    def _retire(self, name: str, rec: VfsReconciler) -> None:
        """Stop the reconciler of a deleted VFS once it holds nothing, then drop it.

        It stays in self.reconcilers until its thread has ended, so no second reconciler starts
        beside it should it (re)acquire meanwhile.
        """
        while not rec.stop(release=False, timeout=5.0):
            if self._stopping.is_set():
                return  # stop() hands it over
        with self._lock:
            if self.reconcilers.get(name) is rec:
                del self.reconcilers[name]
            self._retiring.pop(name, None)
        metrics.forget(name)
        log.info("%s: no spec, owner or status left: its reconciler stopped", name)
        self._on_view(self.views.view)  # a spec written meanwhile gets a new reconciler

    # --- the fence guard (node/guard.py) ------------------------------------------------------

    def _take_guard_records(self) -> None:
        """What the guard did while no agent was watching: log it and publish it once."""
        state_dir = self.cfg.node_state_dir
        self._guard_records = [{k: r.get(k) for k in ("time", "vfs", "reason", "actions", "errors")}
                               for r in read_actions(state_dir)]
        for rec in self._guard_records:
            log.warning("the fence guard fenced %s at %s (%s): %s", rec["vfs"], rec["time"], rec["reason"],
                        rec["actions"])
        if self._guard_records:
            src = state_dir / "guard-actions.jsonl"
            src.replace(state_dir / "guard-actions.seen.jsonl")

    def _start_guard(self) -> None:
        if not (self.cfg.reset_command or self.cfg.watchdog):
            log.warning("neither reset_command nor watchdog is configured: a disk whose unmount hangs after a "
                        "fence cannot be forced off this node within release_bound (docs/safety.md)")
        self.guard = GuardClient(self.cfg.node_state_dir, self.cfg.interface, release_bound=self.cfg.release_bound,
                                 reset_command=self.cfg.reset_command, watchdog=bool(self.cfg.watchdog),
                                 nfs_workroot=self.host.nfs_workroot, log_level=self.cfg.log_level,
                                 log_format=self.cfg.log_format)
        self.keeper.tell_all()  # from the keeper, not reconciler state: never a holding already released

    def _guard_hold(self, h: Holding) -> None:
        self._guard_holds([h])

    def _guard_holds(self, holdings: list[Holding]) -> None:
        """Tell the guard these holdings' deadlines (the keeper's renewals come in batches). What it needs
        comes from each holding itself (its VIP and disk, fixed at acquire), not from reconciler state."""
        if self.guard is None:
            return
        holds = []
        for h in holdings:  # renewals are of unfenced holdings (the keeper's filter); tell_all's may be fenced
            if not h.vip:
                continue
            with loops.guarded("guard-hold", h.vfs, log):  # one holding's error spoils only its own renewal
                holds.append({"vfs": h.vfs, "vip": h.vip, "deadline": guard_deadline(h),
                              "mountpoint": str(self.host.storage.mountpoint(h.vfs)) if h.device else None,
                              "nfs_pid": self.host.nfs_pid(h.vfs), "epoch": h.epoch, "device": h.device})
        if holds:
            self.guard.hold_many(holds)

    def _guard_hold_vfs(self, vfs: str) -> None:
        with self._lock:
            rec = self.reconcilers.get(vfs)
        h = rec.holding if rec is not None else None
        if h is not None and not h.fenced:  # a fenced one is being torn down by its reconciler
            self._guard_hold(h)

    def _etcd_went_back(self, view: ClusterView) -> None:
        """etcd was restored from a snapshot: its owner keys no longer say who has which disk. Every
        holder whose lease is not in the snapshot fences itself within a TTL and releases its disk
        within T_release (its guard's bound); until then nobody here takes anything over."""
        self._went_back_at = time.monotonic()
        quiet = restore_hold(view, self.cfg.lease_ttl, self.cfg.release_bound)
        # max(): a second restore seen meanwhile never shortens the first one's hold.
        self._quiet_until = max(self._quiet_until, self._went_back_at + quiet)
        log.warning("etcd's revisions went back (restored from a snapshot?): no takeover for %.0fs", quiet)

    def _vip_drop_failed(self, h: Holding, exc: BaseException) -> None:
        """The agent could not take a fenced VIP down itself: the guard fences that VFS now (and the
        keeper keeps retrying); a release of the holding does not cancel the guard's fence."""
        log.critical("%s: could not remove the VIP after a fence (%s); asking the fence guard", h.vfs, exc)
        if self.guard is not None:
            self.guard.fence_now(h.vfs, h.epoch, f"agent could not remove the VIP: {exc}")

    def _guard_release(self, h: Holding) -> None:
        if self.guard is not None:
            self.guard.release(h.vfs, h.epoch)

    def _wake_vfs(self, vfs: str) -> None:
        with self._lock:
            rec = self.reconcilers.get(vfs)
        if rec is not None:
            rec.wake()

    # --- main loop and stop ----------------------------------------------------------------

    def run_until_stopped(self) -> None:
        published_errors = loops.total()
        while not self._stopping.is_set():
            try:
                published_errors = self._registration_round(published_errors)
            except Exception as exc:  # e.g. a netlink error reading addresses: counted, never the end
                loops.record("registration", exc, logger=log)
                self._registration_due.set()
                self._stopping.wait(1.0)

    def _registration_round(self, published_errors: int) -> int:
        """Replace a dead guard, re-register when due; returns the error count now published."""
        if loops.total() != published_errors:
            published_errors = loops.total()
            self._registration_due.set()  # operators see new background errors in `nfs-ha status`
        if self.guard is not None and self.guard.proc.poll() is not None and not self._stopping.is_set():
            # Only a guard that has exited is replaced: a full pipe is not a dead guard.
            log.error("the fence guard exited (%s); starting a new one", self.guard.proc.returncode)
            self._take_guard_records()
            self._registration_due.set()
            self._start_guard()
        if self._registration_due.wait(1.0):
            self._registration_due.clear()
            try:
                self.register()
            except StoreError as exc:
                log.warning("registration failed: %s", exc)
                self._registration_due.set()
                self._stopping.wait(1.0)
        return published_errors

    def stop(self) -> None:
        """Hand everything over: VIPs down, owner keys deleted, leases revoked."""
        sdnotify.notify("STOPPING=1", "STATUS=handing every VFS over")
        self._stopping.set()
        self.views.stop()
        with self._lock:
            reconcilers = list(self.reconcilers.values())
        done: dict[str, bool] = {}
        threads = [threading.Thread(target=lambda r=r: done.__setitem__(r.vfs, r.stop(True))) for r in reconcilers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # stop() is True only once the loop has ended holding nothing: a pass still running may yet
        # create an owner key and mount, so it counts as held.
        still_held = sorted(r.vfs for r in reconcilers if not done.get(r.vfs))
        if self.watchdog is not None:
            self.watchdog.stop()  # disarms only if nothing is held any more (else the reset is due)
        self.keeper.stop()
        if still_held:
            # Not handed over (a release stuck on its unmount, or a pass that did not end): the guard
            # must not be told all is clear. It sees EOF when this process exits and fences these
            # (VIP, server, holders, unmount, reset) within the disk bound.
            log.critical("stopping while still holding %s: leaving them to the fence guard", still_held)
        elif self.guard is not None:
            self.guard.close_clean()  # everything is released: nothing for it to fence
        if self._node_lease:
            try:
                self.store.revoke(self._node_lease)
            except StoreError as exc:
                log.warning("could not revoke node lease: %s", exc)
        self.store.close()
        if self.observer is not None:
            self.observer.stop()
        with contextlib.suppress(KeyError):
            metrics.REGISTRY.unregister(self._collector)


def _managed_vips(view: ClusterView) -> list[ipaddress.IPv4Interface]:
    vips = []
    for name in view.vfs_names():
        rec = view.spec_record(name)
        if rec is None:
            continue
        try:
            vips.append(parse_spec(name, rec.value).vip)
        except SpecError:
            continue
    return vips


def _version() -> str:
    try:
        return metadata.version("nfs-ha")
    except metadata.PackageNotFoundError:
        return "unknown"


def _log_level(name: str) -> int:
    level = logging.getLevelName(str(name).upper())
    if not isinstance(level, int):
        raise ValueError(f"invalid log_level {name!r}: use DEBUG, INFO, WARNING or ERROR")
    return level


def _set_log_level(level: int) -> None:
    logging.getLogger().setLevel(level)
    for noisy in ("pyroute2", "grpc"):  # their DEBUG output drowns ours
        logging.getLogger(noisy).setLevel(max(logging.INFO, level))


def _reload_log_level(argv: list[str] | None, environ: dict[str, str]) -> None:
    """SIGHUP: the log level of the configuration as loaded now; nothing else changes. `environ`: the
    environment as at start (the password taken out of os.environ since)."""
    try:
        level = _log_level(agent_config.load(argv, environ).log_level)
    except (ValueError, OSError) as exc:
        log.warning("SIGHUP: configuration not reloaded, log level kept: %s", exc)
        return
    if level != logging.getLogger().level:
        _set_log_level(level)
        log.warning("SIGHUP: log level now %s", logging.getLevelName(level))
    else:
        log.info("SIGHUP: log level unchanged (%s)", logging.getLevelName(level))


def main(argv: list[str] | None = None) -> int:
    # Handlers first, so a stop works at any time. They only append to a list (no lock: a handler
    # runs in the main thread between two bytecodes, where taking a lock that thread holds, as
    # Event.set() can, would hang it); the main loop below acts on what they recorded.
    signals: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda num, _frame: signals.append(num))
    start_environ = dict(os.environ)
    try:
        cfg, options = agent_config.load_with_options(argv)
        level = _log_level(cfg.log_level)
        os.environ.pop("NFS_HA_ETCD_PASSWORD", None)  # read; no child (Ganesha, commands) inherits it
        sdnotify.claim()
    except (ValueError, OSError) as exc:
        print(f"nfs-ha-agent: {exc}", file=sys.stderr)
        return 2
    if options.check_config:
        return _check_config(cfg)
    logsetup.configure(level, cfg.log_format, "nfs-ha-agent",
                       "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    _set_log_level(level)
    provider = tracing.setup(cfg.name, cfg.span_file)
    try:
        agent = Agent(cfg)
    except VipError as exc:
        print(f"nfs-ha-agent: {exc}", file=sys.stderr)
        return 2
    # Start-up (which waits for etcd as long as it takes) and then the registration loop run in
    # their own thread, so the main thread stays free to notice signals.
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            agent.start()
        except BaseException as exc:  # handed to the main thread, which decides the exit code
            outcome.append(exc)
            return
        outcome.append(None)
        agent.run_until_stopped()

    runner = threading.Thread(target=run, name="agent", daemon=True)
    runner.start()
    handled = 0
    while True:
        count = len(signals)
        new, handled = signals[handled:count], count
        if signal.SIGHUP in new:
            _reload_log_level(argv, start_environ)
        if signal.SIGTERM in new or signal.SIGINT in new:
            break
        if outcome and outcome[0] is not None:
            return _start_failed(outcome[0])
        time.sleep(0.1)
    agent.request_stop()
    if not outcome:
        log.info("stop requested during start-up; waiting for it to give up")
        runner.join()
    failed = outcome[0] if outcome else None
    if failed is not None and not isinstance(failed, StopRequested):
        return _start_failed(failed)
    log.info("stopping: %s", "start-up did not finish, nothing is held" if failed else "handing over every VFS")
    agent.stop()
    _flush(provider)
    log.info("stopped")
    return 0


def _check_config(cfg: agent_config.AgentConfig) -> int:
    """--check-config (as keepalived -t): the values were checked by loading them; now this machine."""
    problems = agent_config.check_environment(cfg)
    print(agent_config.describe(cfg))
    for problem in problems:
        print(f"nfs-ha-agent: {problem}", file=sys.stderr)
    if not problems:
        print("configuration OK", file=sys.stderr)
    return 2 if problems else 0


def _start_failed(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    log.critical("start-up failed", exc_info=exc)
    return 1


def _flush(provider: object) -> None:
    """Export what is queued, but never let a dead collector hold up the exit for long."""
    tracing.stop_deferring()
    t = threading.Thread(target=provider.shutdown, daemon=True, name="trace-flush")
    t.start()
    t.join(timeout=3.0)


if __name__ == "__main__":
    sys.exit(main())
