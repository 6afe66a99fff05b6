"""TCP reachability probe run inside a namespace (the lab has no ping).

A refused connection proves the host answered, so "refused" means reachable.
"""

from __future__ import annotations

import sys

# Prints one word: open | refused | timeout | error:<ERRNO NAME>.
PROBE_SCRIPT = """
import errno, socket, sys
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    socket.create_connection((ip, port), timeout=timeout).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print("error:" + errno.errorcode.get(exc.errno or 0, str(exc.errno)))
"""


def probe_argv(ip: str, port: int, timeout: float) -> list[str]:
    return [sys.executable, "-c", PROBE_SCRIPT, ip, str(port), str(timeout)]


REACHABLE = ("open", "refused")
