"""compose/labkit/procs.py: kill_until_none_left also gets what was forked between a scan and
the kill (as a lab reset must: a power cycle leaves no process of the node behind)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from labkit import procs


def group(pgid: int) -> list[int]:
    """Pids of process group `pgid` (the forker and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def test_a_process_that_keeps_forking_leaves_nothing_behind() -> None:
    forker = subprocess.Popen(["sh", "-c", "while :; do sleep 60 & done"], start_new_session=True)
    try:
        assert procs.is_alive(forker.pid)
        # The shell needs a moment to exec and fork its first child; kill only once it has one,
        # so the test is about what was forked, not about scheduling.
        deadline = time.monotonic() + 10.0
        while len(group(forker.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(group(forker.pid)) >= 2, "the forker never forked"
        hit = procs.kill_until_none_left(lambda: group(forker.pid), timeout=10.0)
        assert forker.pid in hit and len(hit) > 1  # the shell and children it forked
        assert [pid for pid in group(forker.pid) if procs.is_alive(pid)] == []
    finally:
        forker.poll()
        for pid in group(forker.pid):
            procs.signal_pid(pid, signal.SIGKILL)
        forker.wait()
