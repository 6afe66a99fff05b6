"""A stray server of a VFS is found by its own config path, and nothing else is (node/ganesha.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from node.ganesha import stray_pids


def test_stray_is_found_by_its_exact_config_path(tmp_path: Path) -> None:
    conf = tmp_path / "home" / "ganesha.conf"
    other = tmp_path / "home2" / "ganesha.conf"
    # Stands in for `ganesha.nfsd -F -f CONF`: only the argv matters.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-F", "-f", str(conf)])
    try:
        # Right after Popen the child may not have exec'd yet (its argv is still the parent's).
        deadline = time.monotonic() + 10
        while stray_pids(conf) != [proc.pid] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stray_pids(conf) == [proc.pid]
        assert stray_pids(other) == []
        assert stray_pids(tmp_path / "home") == []  # a prefix of the path is not the path
    finally:
        proc.kill()
        proc.wait()
    assert stray_pids(conf) == []
