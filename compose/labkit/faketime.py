"""Per-process clock jumps with libfaketime (nodes share the kernel clock, so a node's
"clock" is the wall clock its agent process sees).

A process started with ``env(state, node)`` reads its offset from STATE/faketime/<node>
at most a second old (FAKETIME_CACHE_DURATION=1): "+0" at first, ``jump`` writes "+<N>s" /
"-<N>s" there, seen within a second. CLOCK_MONOTONIC is not faked (FAKETIME_DONT_FAKE_MONOTONIC=1).
Not FAKETIME_NO_CACHE=1 (a file read on every time call): under it a gRPC bidirectional stream
(the agent's lease keepalives) answered after 0.5-1.5 s or not at all (measured here), while
unary calls were fine.

libfaketime 0.9.10 (Debian 12) breaks clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME)
when the monotonic clock is not faked (wolfcw/libfaketime#426): Python 3.11's time.sleep
fails with EINVAL. A tiny preload (built here with gcc, loaded before libfaketime) sends
every non-realtime clock_nanosleep straight to the kernel.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import LabError
from .runner import run
from .state import StateDir

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")

SLEEPFIX_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
typedef int (*cns_t)(clockid_t, int, const struct timespec *, struct timespec *);
int clock_nanosleep(clockid_t clock_id, int flags, const struct timespec *req, struct timespec *rem) {
    if (clock_id != CLOCK_REALTIME) {
        long r = syscall(SYS_clock_nanosleep, clock_id, flags, req, rem);
        return r == 0 ? 0 : errno;
    }
    cns_t next = (cns_t)dlsym(RTLD_NEXT, "clock_nanosleep");
    return next ? next(clock_id, flags, req, rem) : ENOSYS;
}
"""


def _dir(state: StateDir) -> Path:
    return state.root / "faketime"


def control_file(state: StateDir, node: str) -> Path:
    return _dir(state) / node


def ensure_libfaketime() -> Path:
    """Debian's faketime package, installed if missing."""
    if not LIBFAKETIME.exists():
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "faketime"], timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not LIBFAKETIME.exists():
        raise LabError(f"{LIBFAKETIME} missing after installing faketime")
    return LIBFAKETIME


def sleepfix(state: StateDir) -> Path:
    """Path of the clock_nanosleep fix, compiled on first use."""
    lib = _dir(state) / "sleepfix.so"
    if lib.exists():
        return lib
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise LabError("faketime agents need a C compiler (gcc) for the clock_nanosleep fix")
    _dir(state).mkdir(parents=True, exist_ok=True)
    src = _dir(state) / "sleepfix.c"
    src.write_text(SLEEPFIX_C)
    tmp = lib.with_suffix(".tmp")
    run([gcc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src), "-ldl"], timeout=120)
    tmp.rename(lib)
    return lib


def env(state: StateDir, node: str) -> dict[str, str]:
    """Environment entries that run a process under libfaketime with the node's control file
    (created with "+0" if missing)."""
    libfaketime = ensure_libfaketime()
    fix = sleepfix(state)
    ctl = control_file(state, node)
    if not ctl.exists():
        write_offset(state, node, 0)
    return {
        "LD_PRELOAD": f"{fix} {libfaketime}",
        "FAKETIME_TIMESTAMP_FILE": str(ctl),
        "FAKETIME_CACHE_DURATION": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def write_offset(state: StateDir, node: str, seconds: float) -> str:
    """Set the node's wall-clock offset (absolute, not cumulative); returns what was written."""
    text = "+0" if seconds == 0 else f"{'+' if seconds > 0 else '-'}{abs(int(seconds))}s"
    path = control_file(state, node)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.rename(path)  # atomic: a reader never sees a half-written offset
    return text


def read_offset(state: StateDir, node: str) -> str:
    try:
        return control_file(state, node).read_text().strip()
    except OSError:
        return "+0"


def reset_all(state: StateDir) -> None:
    """Every existing control file back to "+0"."""
    directory = _dir(state)
    if directory.is_dir():
        for path in directory.iterdir():
            if path.is_file() and "." not in path.name:
                write_offset(state, path.name, 0)
