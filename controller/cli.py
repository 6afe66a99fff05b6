"""The operator CLI: `nfs-ha status`, `nfs-ha raise-epoch`, `nfs-ha timeline`, and the commands of
controller/operate.py (validate, apply, delete, move, drain, undrain, pause, resume).

Exit codes: 0 done (status: OK), 1 status DEGRADED, 2 an error (bad input, etcd refused or
unreachable; status: FAILING)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import shtab

from controller import operate
from controller.coordination import Coordination
from controller.etcdaccess import EtcdAccess
from controller.keyspace import DEFAULT_PREFIX, Keyspace
from controller.placement import refusals
from controller.store import EtcdStore, StoreError
from controller.timeline import add_timeline_parser, cmd_timeline
from controller.view import ClusterView, parse_epoch_base


def collect(view: ClusterView) -> dict[str, Any]:
    """Everything `status` shows, as plain data."""
    live = view.live_nodes()
    drained = set(view.drained())
    vfs_rows = []
    held: dict[str, list[str]] = {}
    known_nodes = set(live) | drained
    for name in view.vfs_names():
        config = view.config(name)
        owner = view.owner(name)
        status = view.status(name) or {}
        if config.spec:
            known_nodes.update(config.spec.candidates)
        if owner:
            held.setdefault(owner.node, []).append(name)
        errors = [e for e in (config.error, _text(status.get("error"))) if e]
        if len(errors) == 2 and errors[0] in errors[1]:
            errors = errors[1:]  # the status already says it
        errors += [f"{n} refuses: {why}" for n, why in sorted(refusals(config, live).items())
                   if not any(f"{n} refuses" in e for e in errors)]
        vfs_rows.append({
            "vfs": name,
            "spec": view.has_spec(name),
            "vip": config.spec.vip_cidr if config.spec else (_text(status.get("vip")) or None),
            "owner": owner.node if owner else None,
            "phase": _text(status.get("phase")) or "unplaced",
            "epoch": owner.epoch if owner else None,
            "intent": view.raw_intent(name),
            "paused": view.paused(name),
            "error": "; ".join(dict.fromkeys(errors)),
            "status_updated": status.get("updated"),
            "steps": status.get("steps") or {},
        })
    node_rows = []
    for node in sorted(known_nodes):
        info = live.get(node)
        node_rows.append({
            "node": node, "alive": info is not None, "vfs": sorted(held.get(node, [])),
            "drained": node in drained,
            "backoff": {str(k): _text(v) for k, v in _dict((info or {}).get("backoff")).items()},
            "addresses": [a for a in _list((info or {}).get("addresses")) if isinstance(a, str)],
            "guard": [g for g in _list((info or {}).get("guard")) if isinstance(g, dict)],
            "loop_errors": _loop_errors((info or {}).get("loop_errors")),
            "reset": (info or {}).get("reset"),
        })
    data = {"revision": view.revision, "vfs": vfs_rows, "nodes": node_rows}
    code, reasons = health(data)
    data["health"] = {"code": code, "state": HEALTH_STATES[code], "reasons": reasons}
    return data


HEALTH_STATES = ("OK", "DEGRADED", "FAILING")


def health(data: dict[str, Any]) -> tuple[int, list[str]]:
    """`nfs-ha status`'s exit code for a monitoring check, and why.

    2 (FAILING): a VFS with a spec is not being served (no owner, or its owner is not serving yet).
    1 (DEGRADED): every VFS is served, but something needs a look: an error on a VFS (a bad spec
      still served as before, a node refusing it), a dead candidate node, a node backing off from a
      VFS, a VFS served elsewhere than its intent asks, a paused VFS, a drained node.
    0 (OK): none of that. (Not reading etcd at all is 2 too: the CLI fails with that code.)
    """
    rows = [r for r in data["vfs"] if r["spec"] or r["owner"]]  # a deleted VFS being cleaned up is neither
    failing = [f"{r['vfs']} is {r['phase']}" + (f": {r['error']}" if r["error"] else "")
               for r in rows if r["owner"] is None or r["phase"] != "serving"]
    if failing:
        return 2, failing
    degraded = [f"{r['vfs']}: {r['error']}" for r in rows if r["error"]]
    degraded += [f"{r['vfs']} is served by {r['owner']}, its intent asks for {r['intent']}"
                 for r in rows if r["intent"] and r["intent"] != r["owner"]]
    degraded += [f"{r['vfs']} is paused" for r in rows if r["paused"]]
    for n in data["nodes"]:
        if not n["alive"]:
            degraded.append(f"node {n['node']} is down")
        if n["drained"]:
            degraded.append(f"node {n['node']} is drained" + (f", still holding {', '.join(n['vfs'])}"
                                                               if n["vfs"] else ""))
        degraded += [f"node {n['node']} is backing off from {vfs}: {why}" for vfs, why in n["backoff"].items()]
    return (1 if degraded else 0), degraded


# Node registrations and statuses are untrusted input too: junk in one must not break `status`.
def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)[:500]


def _dict(value: Any) -> dict[Any, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _loop_errors(value: Any) -> dict[str, int]:
    """Background-loop error counts a node published (controller/loops.py); junk is dropped."""
    if not isinstance(value, dict):
        return {}
    counts = {k: v.get("count") if isinstance(v, dict) else None for k, v in value.items()}
    return {str(k)[:40]: v for k, v in counts.items() if isinstance(v, int) and not isinstance(v, bool)}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def render(data: dict[str, Any]) -> str:
    vfs = [["VFS", "VIP", "OWNER", "PHASE", "EPOCH", "INTENT", "ERROR"]]
    for r in data["vfs"]:
        phase = r["phase"] + (" (paused)" if r["paused"] else "")
        vfs.append([r["vfs"], r["vip"] or "-", r["owner"] or "-", phase, str(r["epoch"] or "-"),
                    r["intent"] or "-", r["error"] or "-"])
    nodes = [["NODE", "ALIVE", "VFS", "BACKOFF", "LAST GUARD FENCE", "LOOP ERRORS"]]
    for r in data["nodes"]:
        backoff = "; ".join(f"{k}: {v}" for k, v in r["backoff"].items()) or "-"
        last = r["guard"][-1] if r["guard"] else None
        guard = f"{last.get('vfs')} at {last.get('time')} ({last.get('reason')})" if last else "-"
        errors = ",".join(f"{k}:{v}" for k, v in sorted(r.get("loop_errors", {}).items())) or "-"
        alive = ("yes" if r["alive"] else "no") + (" (drained)" if r["drained"] else "")
        nodes.append([r["node"], alive, ",".join(r["vfs"]) or "-", backoff, guard, errors])
    health = data["health"]
    summary = f"{health['state']}" + (": " + "; ".join(health["reasons"]) if health["reasons"] else "")
    return _table(vfs) + "\n\n" + _table(nodes) + "\n\n" + summary


def cmd_status(store: Coordination, args: argparse.Namespace) -> int:
    """Exit code 0 OK, 1 DEGRADED, 2 FAILING or etcd unreadable (health()); --watch: again every N s."""
    if args.watch is None:
        return _status_once(store, args)
    code = 2
    try:
        while True:
            if not args.json and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # a screen that updates in place, as watch(1)
            print(time.strftime("%Y-%m-%d %H:%M:%S"), file=sys.stdout if not args.json else sys.stderr)
            try:
                code = _status_once(store, args)
            except Exception as exc:  # a watch goes on through etcd outages (and anything else)
                code = operate.fail(str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return code


def _status_once(store: Coordination, args: argparse.Namespace) -> int:
    revision, keys = store.load()
    data = collect(ClusterView(store.keyspace, revision, keys))
    if args.json:
        print(json.dumps(data, sort_keys=True, indent=None if args.watch is not None else 2))
    else:
        print(render(data))
    return int(data["health"]["code"])


MAX_EPOCH = 10**18 - 1  # the agents read at most 18 digits (controller/view.py epoch_base)


def cmd_raise_epoch(store: Coordination, args: argparse.Namespace) -> int:
    """Recovery after etcd was restored from a snapshot (docs/safety.md, "etcd restored from a
    snapshot"): every new owner's storage epoch becomes epoch-base + its owner revision, so with a
    base of at least the highest epoch on any disk every new owner's epoch is above it. The base
    is only ever raised (compare-and-set), so two operators cannot lower it by racing."""
    text = args.epoch.strip()
    if not text.isascii() or not text.isdigit() or not 0 < int(text) <= MAX_EPOCH:
        return operate.fail(f"epoch must be a whole number from 1 to {MAX_EPOCH}, got {args.epoch!r}")
    wanted = int(text)
    for _ in range(10):
        rec = store.epoch_base_record()
        current = parse_epoch_base(rec.value if rec else None)
        if current >= wanted:
            print(f"epoch base is already {current} (>= {wanted}); nothing changed")
            return 0
        if store.set_epoch_base(wanted, rec):
            print(f"epoch base raised from {current} to {wanted}: new owners' storage epochs are above {wanted}")
            return 0
    return operate.fail("the epoch base kept changing under us; try again")


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("the interval must be 0.1 to 3600 seconds")
    return value



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nfs-ha", description="operate nfs-ha virtual fileservers")
    parser.add_argument("--etcd", default=os.environ.get("NFS_HA_ETCD", "http://127.0.0.1:2379"),
                        help="comma-separated etcd endpoints (env NFS_HA_ETCD)")
    parser.add_argument("--prefix", default=os.environ.get("NFS_HA_PREFIX", DEFAULT_PREFIX))
    for name, what in (("ca", "PEM CA file that signed etcd's certificate"), ("cert", "PEM client certificate"),
                       ("key", "PEM key of --etcd-cert (mode 0600)"), ("user", "etcd user name"),
                       ("password-file", "file holding the etcd password (mode 0600)")):
        env = f"NFS_HA_ETCD_{name.upper().replace('-', '_')}"
        parser.add_argument(f"--etcd-{name}", default=os.environ.get(env, ""), help=f"{what} (env {env})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="one row per VFS and per node")
    st.set_defaults(func=cmd_status)
    st.add_argument("--json", action="store_true")
    st.add_argument("--watch", nargs="?", const=2.0, type=_interval, metavar="SECONDS",
                    help="show it again every SECONDS (default 2) until interrupted; with --json one object per line")
    re_ = sub.add_parser("raise-epoch", help="after etcd was restored from a snapshot: make every new owner's "
                         "storage epoch higher than N (the number a refused takeover names)")
    re_.add_argument("epoch")
    re_.set_defaults(func=cmd_raise_epoch)
    operate.add_parsers(sub)
    add_timeline_parser(sub)
    shtab.add_argument_to(parser, ["--print-completion"], help="print a shell completion script (bash, zsh, tcsh)")
    args = parser.parse_args(argv)
    if args.cmd == "timeline":
        return cmd_timeline(args)  # reads span files or Jaeger, not etcd
    try:
        # The password only from a file or NFS_HA_ETCD_PASSWORD: an option would show in `ps`.
        access = EtcdAccess.from_settings(args.etcd, ca=args.etcd_ca, cert=args.etcd_cert, key=args.etcd_key,
                                          user=args.etcd_user, password=os.environ.get("NFS_HA_ETCD_PASSWORD", ""),
                                          password_file=args.etcd_password_file)
        store = Coordination(EtcdStore(access, timeout=5.0), Keyspace(args.prefix))
    except ValueError as exc:
        return operate.fail(str(exc))
    try:
        return int(args.func(store, args))
    except StoreError as exc:
        if args.cmd == "validate":  # the file is still checked on its own
            print(f"nfs-ha: not checked against the stored specs: {exc}", file=sys.stderr)
            return int(operate.cmd_validate(None, args))
        return operate.fail(str(exc))
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
