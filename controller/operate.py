"""The operator's commands that change what runs where: validate, apply, delete, move, drain, pause.

- Specs are checked by the agents' own code (controller/spec.py, and the view's VIP and device
  clash checks) before anything is written; one bad VFS in a file writes nothing at all.
- `apply` writes only what changed, in one transaction that compares every spec with the version it
  diffed with: all or none, and two operators cannot silently overwrite each other (more than
  SPECS_PER_TXN changed specs go in parts, each all or none); `--dry-run` shows the diff and stops.
- `--wait` commands poll the keyspace (every 0.25 s) until the agents have done it, and say why not
  when they give up: the node refuses, is down, drained or backing off, or the VFS is paused.
Exit codes: 0 done, 1 waited and not done (the reason printed), 2 bad input or etcd failed.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import yaml

from controller.coordination import Coordination
from controller.keyspace import InvalidName, check_name
from controller.placement import refusals
from controller.spec import SpecError, parse_intent, parse_spec
from controller.status import wall_clock
from controller.view import ClusterView, KeyRecord

POLL_SECONDS = 0.25
SPECS_PER_TXN = 100  # under etcd's --max-txn-ops (128): one compare and one put per spec
MAX_FILE_BYTES = 4 * 1024 * 1024


def fail(message: str) -> int:
    """Say what went wrong the CLI's way (stderr) and return its exit code for it (2)."""
    print(f"nfs-ha: {message}", file=sys.stderr)
    return 2


def _view(store: Coordination) -> ClusterView:
    revision, keys = store.load()
    return ClusterView(store.keyspace, revision, keys)


def canonical(spec: dict[str, Any]) -> str:
    """The form a spec is stored in and diffed as."""
    return json.dumps(spec, indent=2, sort_keys=True) + "\n"


def read_specs(path: str) -> dict[str, dict[str, Any]]:
    """A file (JSON or YAML; `-`: stdin) mapping VFS names to specs, each checked as an agent checks it.
    ValueError listing every problem found."""
    try:
        if path == "-":
            raw = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8: {exc}") from None
    try:
        # No anchors and aliases: a few lines of them expand into gigabytes when the specs are encoded.
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ValueError(f"{path}: YAML aliases (*name) are not accepted in spec files")
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: neither JSON nor YAML: {exc}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping of VFS names to specs, e.g. "
                         "{home: {vip: 10.0.0.100/24, candidates: [node-a, node-b]}}")
    problems, specs = [], {}
    for name, spec in data.items():
        try:
            check_name(name, "VFS name")
            if not isinstance(spec, dict):
                raise SpecError("the spec must be a mapping")
            parse_spec(name, canonical(spec))
            specs[name] = spec
        except (InvalidName, SpecError) as exc:
            problems.append(f"{name}: {exc}")
        except (TypeError, ValueError, RecursionError) as exc:  # a date, a set, binary, mixed keys: not JSON
            problems.append(f"{name!s:.64}: not a JSON-compatible spec ({type(exc).__name__}: {str(exc)[:200]})")
    if problems:
        raise ValueError("; ".join(problems))
    return specs


def check_against(view: ClusterView, specs: dict[str, dict[str, Any]]) -> list[str]:
    """The agents' cross-VFS checks (VIP and device clashes) on the cluster as it would be: errors of the
    file's VFS, and of every other VFS the file would make invalid (a clash can cost the other one)."""
    keys = dict(view.keys)
    for name, spec in specs.items():
        old = keys.get(view.keyspace.spec(name))
        keys[view.keyspace.spec(name)] = KeyRecord(canonical(spec).encode(), old.create_revision if old else
                                                   view.revision + 1, view.revision + 1, 0)
    after = ClusterView(view.keyspace, view.revision + 1, keys)
    problems = [f"{name}: {err}" for name in sorted(specs) for err in after.config(name).errors]
    for name in after.vfs_names():  # O(VFS), once per apply
        if name not in specs and after.config(name).errors != view.config(name).errors:
            problems += [f"{name}: {err}" for err in after.config(name).errors]
    return problems


def _diff(name: str, old: KeyRecord | None, new: str) -> str:
    before = ""
    if old is not None:
        try:
            before = canonical(json.loads(old.value))
        except (ValueError, RecursionError):  # the stored spec is junk: shown as it is
            before = old.value.decode(errors="replace")[:100_000] + "\n"
    return "".join(difflib.unified_diff(before.splitlines(True), new.splitlines(True),
                                        f"{name} (stored)", f"{name} (file)"))


def cmd_validate(store: Coordination | None, args: argparse.Namespace) -> int:
    """Checks a file as the agents would; with etcd reachable also against the stored specs."""
    try:
        specs = read_specs(args.file)
    except ValueError as exc:
        return fail(str(exc))
    if store is not None:
        problems = check_against(_view(store), specs)
        if problems:
            return fail("; ".join(problems))
    print(f"{len(specs)} VFS valid: {', '.join(sorted(specs))}")
    return 0


def cmd_apply(store: Coordination, args: argparse.Namespace) -> int:
    try:
        specs = read_specs(args.file)
    except ValueError as exc:
        return fail(str(exc))
    view = _view(store)
    problems = check_against(view, specs)
    if problems:
        return fail("nothing written: " + "; ".join(problems))
    changes = []
    for name in sorted(specs):
        new, old = canonical(specs[name]), view.keys.get(view.keyspace.spec(name))
        diff = _diff(name, old, new)
        if diff:
            changes.append((name, new, old))
            print(diff, end="")
        else:
            print(f"{name}: unchanged")
    if args.dry_run or not changes:
        print(f"{len(changes)} VFS would change (dry run)" if args.dry_run else "nothing to change")
        return 0
    # One transaction: every changed spec, or none (each compared with the version diffed above).
    # etcd takes at most 128 operations per transaction; a bigger apply goes in parts, each all or none.
    parts = [changes[i:i + SPECS_PER_TXN] for i in range(0, len(changes), SPECS_PER_TXN)]
    for number, part in enumerate(parts, 1):
        if not store.put_specs([(name, new, old) for name, new, old in part]):
            done = "nothing written" if number == 1 else f"the first {number - 1} of {len(parts)} parts written"
            return fail(f"a spec of {', '.join(n for n, _new, _old in part)} changed in etcd since it was read; "
                         f"{done} (run apply again to see the new diff)")
        for name, _new, old in part:
            print(f"{name}: {'changed' if old else 'created'}")
    return 0


def cmd_delete(store: Coordination, args: argparse.Namespace) -> int:
    """Delete a VFS: its holder releases it (VIP down, server stopped, disk unmounted: a planned release),
    then its status goes. --wait (default) returns once nothing of it is left but what the agents keep."""
    view = _view(store)
    if not view.has_spec(args.vfs):
        return fail(f"VFS {args.vfs!r} has no spec")
    owner = view.owner(args.vfs)
    store.delete_vfs(args.vfs)
    print(f"{args.vfs}: spec deleted" + (f"; {owner.node} releases it" if owner else ""))
    if not args.wait:
        return 0
    def released(v: ClusterView) -> tuple[bool, str]:
        paused = " (paused: its holder keeps it until nfs-ha resume)" if v.paused(args.vfs) else ""
        return v.owner(args.vfs) is None, _owner_text(v, args.vfs) + paused

    return _wait(store, args.timeout, released, f"{args.vfs} released")


def cmd_move(store: Coordination, args: argparse.Namespace) -> int:
    view = _view(store)
    config = view.config(args.vfs)
    if not view.has_spec(args.vfs):
        return fail(f"VFS {args.vfs!r} has no spec")
    if args.clear:
        store.clear_intent(args.vfs)
        print(f"intent for {args.vfs} cleared: placement decides again")
        return 0
    if args.node is None:
        return fail("move needs NODE, or --clear")
    if config.spec is None:
        return fail(f"VFS {args.vfs!r} has an invalid spec: {config.error}")
    try:
        parse_intent(args.node.encode(), config.spec)
    except SpecError as exc:
        return fail(str(exc))
    store.put_intent(args.vfs, args.node)
    print(f"intent for {args.vfs}: {args.node}")
    if not args.wait:
        if args.node not in view.live_nodes():
            print(f"warning: {args.node} is not alive; {args.vfs} moves there when it registers", file=sys.stderr)
        return 0

    def served_there(v: ClusterView) -> tuple[bool, str]:
        owner, status = v.owner(args.vfs), v.status(args.vfs) or {}
        done = owner is not None and owner.node == args.node and status.get("phase") == "serving" \
            and status.get("node") == args.node
        return done, _why_not_there(v, args.vfs, args.node)

    return _wait(store, args.timeout, served_there, f"{args.vfs} serving on {args.node}")


def _owner_text(view: ClusterView, vfs: str) -> str:
    owner = view.owner(vfs)
    if owner is None:
        return "released"
    status = view.status(vfs) or {}
    error = f": {status['error']}" if status.get("error") else ""
    return f"still held by {owner.node} ({status.get('phase')}{error})"


def _why_not_there(view: ClusterView, vfs: str, node: str) -> str:
    """What keeps `vfs` from serving on `node`, as far as the keyspace tells."""
    config = view.config(vfs)
    live = view.live_nodes()
    status = view.status(vfs) or {}
    if config.paused:
        return f"{vfs} is paused (nfs-ha resume {vfs})"
    if node not in live:
        return f"{node} is not alive"
    if live[node].get("drained"):
        return f"{node} is drained (nfs-ha undrain {node})"
    why = refusals(config, live).get(node)
    if why:
        return f"{node} refuses it: {why}"
    backoff = live[node].get("backoff")
    if isinstance(backoff, dict) and vfs in backoff:
        return f"{node} is backing off from it: {backoff[vfs]}"
    return f"{_owner_text(view, vfs)}; status {status.get('phase', 'unplaced')}" + \
        (f": {status['error']}" if status.get("error") else "")


def _wait(store: Coordination, timeout: float, check: Callable[[ClusterView], tuple[bool, str]], what: str) -> int:
    deadline = time.monotonic() + timeout
    why = ""
    while True:
        done, why = check(_view(store))
        if done:
            print(f"{what}")
            return 0
        if time.monotonic() >= deadline:
            print(f"nfs-ha: not done after {timeout:g}s ({what}): {why}", file=sys.stderr)
            return 1
        time.sleep(POLL_SECONDS)


def cmd_drain(store: Coordination, args: argparse.Namespace) -> int:
    """Mark the node drained (placement puts it last; what it holds moves to another candidate), then
    wait until it holds nothing and what it held serves elsewhere, naming what cannot move and why."""
    before = _view(store)
    moving = [n for n in before.vfs_names() if (o := before.owner(n)) is not None and o.node == args.node]
    store.set_drain(args.node, json.dumps({"since": wall_clock(), "by": "nfs-ha drain"}))
    print(f"{args.node} drained: VFS are placed on it only when no other node can take them; "
          f"what it holds moves away ({', '.join(moving) or 'it holds nothing'})")
    if not args.wait:
        return 0

    def moved(v: ClusterView) -> tuple[bool, str]:
        # Also what it took meanwhile (a drained node is the last resort) or was taking when we looked.
        held = [n for n in v.vfs_names() if (o := v.owner(n)) is not None and o.node == args.node]
        left = sorted(set(held) | {n for n in moving if not _served_elsewhere(v, n, args.node)})
        return not left, "; ".join(f"{n}: {_stuck_reason(v, n, args.node)}" for n in left)

    return _wait(store, args.timeout, moved, f"{args.node} holds nothing; what it held serves elsewhere")


def _served_elsewhere(view: ClusterView, vfs: str, node: str) -> bool:
    """Moved off `node` and serving, or gone (deleted meanwhile)."""
    owner, status = view.owner(vfs), view.status(vfs) or {}
    if not view.has_spec(vfs):
        return owner is None or owner.node != node
    return owner is not None and owner.node != node and status.get("phase") == "serving"


def _stuck_reason(view: ClusterView, vfs: str, node: str) -> str:
    config = view.config(vfs)
    if config.paused:
        return "paused (nfs-ha resume)"
    owner = view.owner(vfs)
    if owner is not None and owner.node != node:
        return f"being taken over by {owner.node} ({(view.status(vfs) or {}).get('phase', '?')})"
    live = view.live_nodes()
    others = [n for n in (config.spec.candidates if config.spec else ()) if n != node]
    usable = [n for n in others if n in live and not live[n].get("drained") and n not in refusals(config, live)]
    ready = [n for n in usable if not isinstance(b := live[n].get("backoff"), dict) or vfs not in b]
    if ready:
        return f"moving to {ready[0]}"
    if usable:
        return f"every other candidate is backing off from it ({', '.join(usable)})"
    return f"no other live candidate can take it (candidates {others})"


def cmd_undrain(store: Coordination, args: argparse.Namespace) -> int:
    store.clear_drain(args.node)
    print(f"{args.node} undrained: placement may use it again (a VFS moves back only where its intent names "
          f"{args.node})")
    return 0


def cmd_pause(store: Coordination, args: argparse.Namespace) -> int:
    target = None if args.all else args.vfs
    if target is not None and not _view(store).has_spec(target):
        return fail(f"VFS {target!r} has no spec")
    store.set_pause(target, json.dumps({"since": wall_clock(), "by": "nfs-ha pause"}))
    print(f"{'every VFS' if target is None else target} paused: nothing moves; holders keep holding")
    return 0


def cmd_resume(store: Coordination, args: argparse.Namespace) -> int:
    store.clear_pause(None if args.all else args.vfs)
    print(f"{'the cluster-wide pause' if args.all else args.vfs} resumed")
    return 0


def add_parsers(sub: Any) -> None:
    """The commands above, on an argparse subparsers object (each sets `func`)."""
    def target(p: argparse.ArgumentParser, what: str) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("vfs", nargs="?", type=_name("VFS name"), help=what)
        group.add_argument("--all", action="store_true", help="every VFS (cluster-wide)")

    def waiting(p: argparse.ArgumentParser, default: bool, seconds: float) -> None:
        p.add_argument("--wait", action=argparse.BooleanOptionalAction, default=default,
                       help=f"wait until done (default {'on' if default else 'off'}); exit 1 with the reason if not")
        p.add_argument("--timeout", type=float, default=seconds, help=f"seconds to wait (default {seconds:g})")

    p = sub.add_parser("validate", help="check a file of specs as the agents would (and against etcd)")
    p.add_argument("-f", "--file", required=True, help="JSON or YAML: {VFS name: spec, ...}; - for stdin")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("apply", help="write the specs of a file that differ from etcd's, showing the diff")
    p.add_argument("-f", "--file", required=True, help="JSON or YAML: {VFS name: spec, ...}; - for stdin")
    p.add_argument("--dry-run", action="store_true", help="show the diff, write nothing")
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("delete", help="delete a VFS: its holder releases it, then its status goes")
    p.add_argument("vfs", type=_name("VFS name"))
    waiting(p, True, 60.0)
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("move", help="ask for a VFS to be served by a node (writes the intent)")
    p.add_argument("vfs", type=_name("VFS name"))
    p.add_argument("node", nargs="?", type=_name("node name"))
    p.add_argument("--clear", action="store_true", help="remove the intent: placement decides again")
    waiting(p, False, 60.0)
    p.set_defaults(func=cmd_move)
    p = sub.add_parser("drain", help="move every VFS away from a node; place VFS there only as the last resort")
    p.add_argument("node", type=_name("node name"))
    waiting(p, True, 300.0)
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("undrain", help="let placement use a drained node again")
    p.add_argument("node", type=_name("node name"))
    p.set_defaults(func=cmd_undrain)
    p = sub.add_parser("pause", help="maintenance: nothing moves (holders keep holding and renewing)")
    target(p, "the VFS to pause")
    p.set_defaults(func=cmd_pause)
    p = sub.add_parser("resume", help="end a pause")
    target(p, "the VFS to resume")
    p.set_defaults(func=cmd_resume)


def _name(what: str) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            return check_name(text, what)
        except InvalidName as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return check
