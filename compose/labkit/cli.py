"""`compose/lab` command line: thin wrapper over Lab."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

from .errors import LabError
from .lab import Lab
from .topology import MEMBERS, NODES, STATE_ENV

USAGE = """usage: lab [--state-dir DIR] COMMAND ...
  up [--heartbeat-ms N] [--election-ms N] [--timeout S]
  down | status | leader
  kill-node NODE | revive-node NODE | partition-node NODE | heal [NODE]
  reset NODE                  power cycle, links up: processes killed, mounts and VIPs gone
  resets                      every reset so far (JSON lines)
  freeze NODE PATH | thaw [DEV]
  kill-etcd N | start-etcd N | isolate-etcd N | heal-etcd [N] | restart-etcd
  etcd-snapshot FILE | etcd-restore FILE
  cut-client NODE | heal-client NODE | ganesha-kill NODE | clock-jump NODE SECONDS
  disk-create NAME [--size-mb N] [--fstype xfs|ext4|none] | disk-destroy NAME [--force] | disks
  mounts NODE | block-device NODE DEV | unblock-device NODE DEV
  exec NAME -- ARGV...        NAME: {names}
  etcdctl ARGS...             (client namespace, all three endpoints)
State dir: --state-dir, else $NFSHA_LAB_DIR, else /run/nfsha-lab.""".format(names="|".join(MEMBERS))


def _passthrough(argv: list[str]) -> int:
    # Interactive commands keep our stdin/stdout/stderr; their exit code becomes ours.
    return subprocess.run(argv, check=False).returncode


def _exec(rest: list[str]) -> int:
    if not rest:
        raise LabError("exec needs NAME -- ARGV...")
    name, argv = rest[0], rest[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise LabError("exec needs a command after NAME --")
    return _passthrough(Lab.attach().ns_cmd(name, argv))


def _etcdctl(rest: list[str]) -> int:
    proc = Lab.attach().etcdctl(*rest, check=False, timeout=3600)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def _up(rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lab up")
    parser.add_argument("--heartbeat-ms", type=int, default=50)
    parser.add_argument("--election-ms", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=30.0)
    opts = parser.parse_args(rest)
    started = time.monotonic()
    lab = Lab(heartbeat_ms=opts.heartbeat_ms, election_ms=opts.election_ms)
    lab.up(timeout=opts.timeout)
    print(f"lab up in {time.monotonic() - started:.1f}s (state {lab.state_dir})")
    return 0


def _disk_create(rest: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lab disk-create")
    parser.add_argument("name")
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--fstype", choices=["xfs", "ext4", "none"], default="xfs")
    opts = parser.parse_args(rest)
    print(Lab.attach().create_disk(opts.name, opts.size_mb, None if opts.fstype == "none" else opts.fstype))
    return 0


def _disk_command(command: str, rest: list[str]) -> int:
    lab = Lab.attach()
    if command == "disks":
        print(json.dumps(lab.disks(), indent=2))
    elif command == "disk-destroy":
        if not rest or rest[0].startswith("-") or set(rest[1:]) - {"--force"}:
            raise LabError("disk-destroy needs NAME [--force]")
        note = lab.destroy_disk(rest[0], force="--force" in rest)
        if note:
            print(note, file=sys.stderr)
    elif command == "mounts":
        node = str(_one_arg(command, rest, list(NODES)))
        for device, point in lab.mounts_of(node):
            print(device, point)
    else:  # block-device / unblock-device NODE DEV
        if len(rest) != 2 or rest[0] not in NODES:
            raise LabError(f"{command} needs NODE DEV (NODE one of {' '.join(NODES)})")
        (lab.block_device_on if command == "block-device" else lab.unblock_device_on)(rest[0], rest[1])
    return 0


DISK_COMMANDS = ("disks", "disk-destroy", "mounts", "block-device", "unblock-device")


def _one_arg(command: str, rest: list[str], allowed: list[str], optional: bool = False) -> str | None:
    if not rest and optional:
        return None
    if len(rest) != 1 or rest[0] not in allowed:
        raise LabError(f"{command} needs one of: {' '.join(allowed)}")
    return rest[0]


def _reset(lab: Lab, node: str) -> int:
    """Power-cycle ``node`` in a child in its own session: a fence guard that gives up on its
    reset command SIGKILLs the command's process group, and a reset stopped half-way (the old
    mount namespace dropped, the new one not yet pinned) would leave a node no command can use."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            print(json.dumps(lab.reset_node(node)), flush=True)
            code = 0
        except LabError as exc:
            print(f"lab reset: {exc}", file=sys.stderr, flush=True)
        except BaseException:  # shown, never propagated out of the forked child
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _simple(command: str, rest: list[str]) -> int:
    lab = Lab.attach()
    nodes, members = list(NODES), ["1", "2", "3"]
    if command == "down":
        started = time.monotonic()
        lab.down()
        print(f"lab down in {time.monotonic() - started:.1f}s")
    elif command == "status":
        print(json.dumps(lab.status(), indent=2))
    elif command == "leader":
        print(f"etcd{lab.etcd_leader()}")
    elif command == "kill-node":
        node = str(_one_arg(command, rest, nodes))
        print(f"killed {node}: pids {lab.kill_node(node)}")
    elif command == "reset":
        return _reset(lab, str(_one_arg(command, rest, nodes)))
    elif command == "resets":
        for record in lab.resets():
            print(json.dumps(record))
    elif command == "freeze":
        if len(rest) != 2 or rest[0] not in nodes:
            raise LabError(f"freeze needs NODE PATH (NODE one of {' '.join(nodes)})")
        lab.freeze(rest[0], rest[1], watch=False)
    elif command == "thaw":
        if len(rest) > 1:
            raise LabError("thaw takes at most one device")
        print(json.dumps(lab.thaw_disk(rest[0] if rest else None)))
    elif command == "etcd-snapshot":
        if len(rest) != 1:
            raise LabError("etcd-snapshot needs FILE")
        print(f"revision {lab.etcd_snapshot_save(rest[0])}")
    elif command == "etcd-restore":
        if len(rest) != 1:
            raise LabError("etcd-restore needs FILE")
        print(f"etcd{lab.etcd_snapshot_restore(rest[0])} leads")
    elif command == "revive-node":
        lab.revive_node(str(_one_arg(command, rest, nodes)))
    elif command == "partition-node":
        lab.partition_node(str(_one_arg(command, rest, nodes)))
    elif command == "heal":
        lab.heal(_one_arg(command, rest, nodes, optional=True))
    elif command == "kill-etcd":
        index = int(str(_one_arg(command, rest, members)))
        pid = lab.etcd_pid(index)
        lab.kill_etcd_member(index)
        print(f"etcd{index} (pid {pid}) killed" if pid else f"etcd{index} was not running")
    elif command == "start-etcd":
        print(lab.start_etcd_member(int(str(_one_arg(command, rest, members)))))
    elif command == "isolate-etcd":
        lab.etcd_minority_partition(int(str(_one_arg(command, rest, members))))
    elif command == "heal-etcd":
        index = _one_arg(command, rest, members, optional=True)
        lab.heal_etcd(int(index) if index else None)
    elif command == "restart-etcd":
        print(f"etcd{lab.restart_all_etcd()} leads")
    elif command == "cut-client":
        lab.cut_from_client(str(_one_arg(command, rest, nodes)))
    elif command == "heal-client":
        lab.heal_client(str(_one_arg(command, rest, nodes)))
    elif command == "ganesha-kill":
        print(f"killed ganesha.nfsd pids {lab.ganesha_sigkill(str(_one_arg(command, rest, nodes)))}")
    elif command == "clock-jump":
        if len(rest) != 2 or rest[0] not in nodes:
            raise LabError(f"clock-jump needs NODE SECONDS (NODE one of {' '.join(nodes)})")
        print(lab.clock_jump(rest[0], float(rest[1])))
    else:
        print(USAGE, file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args[0] == "--state-dir" or args[0].startswith("--state-dir="):
        # Lab.attach() reads it from there; a fence guard calls `lab --state-dir DIR reset NODE`.
        value, args = (args[1], args[2:]) if args[0] == "--state-dir" and len(args) > 1 else \
            (args[0].partition("=")[2], args[1:])
        if not value or not args:
            print(USAGE, file=sys.stderr)
            return 2
        os.environ[STATE_ENV] = value
    command, rest = args[0], args[1:]
    try:
        # exec/etcdctl take raw argv (flags included), so they bypass argparse.
        if command == "exec":
            return _exec(rest)
        if command == "etcdctl":
            return _etcdctl(rest)
        if command == "up":
            return _up(rest)
        if command == "disk-create":
            return _disk_create(rest)
        if command in DISK_COMMANDS:
            return _disk_command(command, rest)
        return _simple(command, rest)
    except LabError as exc:
        print(f"lab {command}: {exc}", file=sys.stderr)
        return 1
