"""Log output of the agent and the fence guard: plain text, or one JSON object per line.

JSON (log_format = "json") is for log shippers: the fields are time (UTC, ISO 8601), level,
program, pid, thread, logger and message, plus exc_info with the traceback when there is one.
Both go to stderr (the journal, under systemd).
"""

from __future__ import annotations

import logging
import sys
import time

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")


class _UtcIsoJson(JsonFormatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created)) + f".{int(record.msecs):03d}Z"


def configure(level: int, log_format: str, program: str, text_format: str) -> None:
    """Replace the root logger's handlers with one to stderr in `log_format`."""
    if log_format not in FORMATS:
        raise ValueError(f"log_format must be one of {list(FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_UtcIsoJson(
            "%(asctime)s %(levelname)s %(process)d %(threadName)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "process": "pid", "threadName": "thread",
                           "name": "logger"},
            static_fields={"program": program}))
    else:
        handler.setFormatter(logging.Formatter(text_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
