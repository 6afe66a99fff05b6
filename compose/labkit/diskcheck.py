"""Check acknowledged writes on a lab disk itself, once no node has it mounted.

Reading 10,000+ files back through NFS takes an hour with libnfs-utils (one process, one TCP
connection and one NFSv4 client per file); reading them from the disk takes seconds, and it
proves the bytes reached the shared disk, not just some node's page cache.

The disk is mounted read-only in a private mount namespace of a child process
(``unshare --mount --propagation private``), so the mount disappears with that process even if
it is killed: nothing can be left mounted. A disk that is still mounted anywhere is refused (its
exclusive open fails): a second mount of a live filesystem is how shared disks get corrupted.

    python -m labkit.diskcheck MOUNTPOINT DEVICE FSTYPE < {"name": "sha256", ...}
    -> {"checked": N, "missing": [...], "wrong": [...]}   (child side, run by check())
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import disks
from .errors import LabError

COMPOSE_DIR = Path(__file__).resolve().parents[1]


def wait_unmounted(devices: list[str], timeout: float) -> list[str]:
    """Wait until none of ``devices`` is mounted anywhere; the ones still busy."""
    deadline = time.monotonic() + timeout
    while True:
        busy = [d for d in devices if disks.is_busy(d)]
        if not busy or time.monotonic() >= deadline:
            return busy
        time.sleep(0.2)


def check(device: str, fstype: str, expected: dict[str, str], timeout: float = 300.0) -> dict[str, object]:
    """Mount ``device`` read-only in a throw-away mount namespace and compare every file named in
    ``expected`` (name in the filesystem's top directory -> sha256 of its content)."""
    if disks.is_busy(device):
        raise LabError(f"{device} is still mounted: {disks.describe_holders(device, None)}")
    with tempfile.TemporaryDirectory(prefix="nfsha-diskcheck-") as point:
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                sys.executable, "-m", "labkit.diskcheck", point, device, fstype]
        proc = subprocess.run(argv, input=json.dumps(expected), capture_output=True, text=True,
                              timeout=timeout, cwd=COMPOSE_DIR, check=False)
    if proc.returncode != 0:
        raise LabError(f"disk check of {device} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def compare(root: Path, expected: dict[str, str]) -> dict[str, object]:
    missing, wrong = [], []
    for name, digest in expected.items():
        try:
            data = (root / name).read_bytes()
        except FileNotFoundError:
            missing.append(name)
            continue
        if hashlib.sha256(data).hexdigest() != digest:
            wrong.append(name)
    return {"checked": len(expected), "missing": missing, "wrong": wrong}


def _child(point: str, device: str, fstype: str) -> int:
    expected = json.load(sys.stdin)
    subprocess.run(["mount", "-t", fstype, "-o", "ro", device, point], check=True)
    try:
        result = compare(Path(point), expected)
    finally:
        subprocess.run(["umount", point], check=False)
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m labkit.diskcheck MOUNTPOINT DEVICE FSTYPE < expected.json")
    sys.exit(_child(*sys.argv[1:]))
