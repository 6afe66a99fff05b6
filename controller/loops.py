"""Background loops never die silently: catch, log, count, go on.

Invariants (this module keeps them):

1. `guarded_loop` and `guarded` catch every `Exception` from one pass of a loop body (or one item
   of it), never `BaseException`: SystemExit and KeyboardInterrupt still end a thread. The loop goes
   on with its next pass; only its stop event ends it.
2. Every caught exception is counted under its loop's name in one process-wide registry (`ERRORS`),
   thread-safely, with the text of the last one; `errors()` returns a JSON-ready copy for the node
   registration.
3. Logging is rate-limited per distinct error (loop name, exception type, message): the first one
   is logged at ERROR with its traceback, repeats within `LOG_EVERY` seconds are only counted, and
   the next log line says how many were suppressed. A loop failing every 20 ms cannot flood the log.

Catching is for keeping the *other* work of a thread alive. A failure that leaves something unsafe
behind (a VIP that could not be removed, a disk that could not be unmounted) must also be escalated
by the caller: counting it here is not handling it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY = 60.0  # seconds between two log lines (with traceback) of the same error
_MAX_KEYS = 512  # distinct errors remembered for rate limiting; the oldest are forgotten first


class LoopErrors:
    """Error counts per loop name, and the rate limit of their log lines."""

    def __init__(self, log_every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic) -> None:
        self._log_every = log_every
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._last: dict[str, tuple[str, float]] = {}  # name -> (text, wall clock)
        self._logged: dict[tuple[str, str, str], tuple[float, int]] = {}  # key -> (logged at, suppressed)

    def record(self, name: str, exc: BaseException, what: str = "", logger: logging.Logger | None = None) -> None:
        """Count `exc` under `name`; log it unless the same error was logged less than log_every ago.
        `what` names the item the error belongs to (a VFS, a lease, a VIP)."""
        text = f"{type(exc).__name__}: {exc}"
        key = (name, type(exc).__name__, str(exc))
        now = self._clock()
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            self._last[name] = (f"{what}: {text}" if what else text, time.time())
            logged_at, suppressed = self._logged.pop(key, (None, 0))
            due = logged_at is None or now - logged_at >= self._log_every
            self._logged[key] = (now, 0) if due else (logged_at, suppressed + 1)
            while len(self._logged) > _MAX_KEYS:
                del self._logged[next(iter(self._logged))]
        if due:
            more = f" ({suppressed} more like it not logged)" if suppressed else ""
            (logger or log).error("%s%s: %s%s; going on", name, f" ({what})" if what else "", text, more,
                                  exc_info=(type(exc), exc, exc.__traceback__))

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def total(self) -> int:
        """All errors counted so far: cheap, to notice that the snapshot changed."""
        with self._lock:
            return sum(self._counts.values())

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """{loop name: {"count": n, "last": "what: Type: message", "at": unix time}}, JSON-ready."""
        with self._lock:
            return {name: {"count": n, "last": self._last[name][0], "at": round(self._last[name][1], 3)}
                    for name, n in sorted(self._counts.items())}


ERRORS = LoopErrors()


def record(name: str, exc: BaseException, what: str = "", logger: logging.Logger | None = None) -> None:
    """Count and (rate-limited) log `exc` under loop `name` in the process-wide registry."""
    ERRORS.record(name, exc, what, logger)


def errors() -> dict[str, dict[str, Any]]:
    """The process-wide counts, for the node registration (see LoopErrors.snapshot)."""
    return ERRORS.snapshot()


def total() -> int:
    """All errors counted in the process-wide registry (see LoopErrors.total)."""
    return ERRORS.total()


@contextmanager
def guarded(name: str, what: str = "", logger: logging.Logger | None = None) -> Iterator[None]:
    """`with guarded("keepalive", vfs): ...` — an Exception inside is recorded and swallowed, so a
    loop goes on with its next item."""
    try:
        yield
    except Exception as exc:
        record(name, exc, what, logger)


def guarded_loop(name: str, body: Callable[[], object], stop: threading.Event, interval: float,
                 error_pause: float | None = None, logger: logging.Logger | None = None) -> None:
    """Run `body` every `interval` seconds until `stop` is set; an exception from one pass is recorded
    and the loop waits `error_pause` (default: `interval`) before the next pass."""
    while not stop.is_set():
        try:
            body()
        except Exception as exc:
            record(name, exc, logger=logger)
            stop.wait(interval if error_pause is None else error_pause)
            continue
        stop.wait(interval)
