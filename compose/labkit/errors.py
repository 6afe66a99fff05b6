"""Exceptions raised by the lab."""

from __future__ import annotations


class LabError(RuntimeError):
    """The lab could not do what was asked (bad name, failed setup, timeout)."""


class CommandError(LabError):
    """A command run by the lab exited non-zero; keeps its output for the message."""

    def __init__(self, argv: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        tail = (stderr or stdout).strip()[-800:]
        super().__init__(f"command {argv!r} exited {returncode}: {tail}")
