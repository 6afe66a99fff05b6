"""etcd over its HTTP/JSON gateway and /metrics, from inside a lab namespace (stdlib only).

    python -m labkit.etcdhttp --endpoints http://10.77.0.11:2379,...

(started in the client namespace by ``EtcdHttp`` below). It reads one JSON request per line on
stdin and answers with one JSON line on stdout, so a benchmark can write many keys in a few
transactions and poll a prefix without starting etcdctl each time:

    {"op": "put_many", "kvs": [[key, value], ...], "batch": 100}
        puts in transactions of `batch` keys (etcd's default --max-txn-ops is 128), one after
        another: {"t0": monotonic before the first, "t1": after the last, "revision": last}
    {"op": "range", "prefix": P}
        every key below P: {"t": monotonic, "revision": R, "kvs": [[key, value, create_revision,
        mod_revision, lease], ...]}
    {"op": "metrics", "names": [metric, ...]}
        /metrics of every endpoint, only the samples of those metric names:
        {"t": monotonic, "members": {endpoint: {"name{labels}": value}}}
Errors: {"error": "..."}. Exits at EOF on stdin.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMEOUT = 10.0


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode(errors="replace")


def _prefix_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return base64.b64encode(bytes(raw)).decode()


class Gateway:
    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        last: Exception | None = None
        for ep in self.endpoints:
            req = urllib.request.Request(ep + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                    return dict(json.loads(resp.read()))
            except Exception as exc:  # the next member may answer
                last = exc
        raise RuntimeError(f"no etcd member answered {path}: {last}")

    def put_many(self, kvs: list[list[str]], batch: int) -> dict[str, Any]:
        t0 = time.monotonic()
        revision = 0
        for i in range(0, len(kvs), batch):
            ops = [{"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in kvs[i:i + batch]]
            resp = self._post("/v3/kv/txn", {"success": ops})
            revision = int(resp.get("header", {}).get("revision", 0))
        return {"t0": t0, "t1": time.monotonic(), "revision": revision}

    def range(self, prefix: str) -> dict[str, Any]:
        resp = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        kvs = [[_unb64(kv.get("key")), _unb64(kv.get("value")), int(kv.get("create_revision", 0)),
                int(kv.get("mod_revision", 0)), int(kv.get("lease", 0))] for kv in resp.get("kvs", [])]
        return {"t": time.monotonic(), "revision": int(resp.get("header", {}).get("revision", 0)), "kvs": kvs}

    def metrics(self, names: list[str]) -> dict[str, Any]:
        wanted = set(names)
        members: dict[str, dict[str, float]] = {}
        for ep in self.endpoints:
            try:
                with urllib.request.urlopen(ep + "/metrics", timeout=TIMEOUT) as resp:
                    text = resp.read().decode(errors="replace")
            except Exception:
                continue
            samples: dict[str, float] = {}
            for line in text.splitlines():
                if not line or line.startswith("#"):
                    continue
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name in wanted:
                    key, _, value = line.rpartition(" ")
                    try:
                        samples[key] = float(value)
                    except ValueError:
                        continue
            members[ep] = samples
        return {"t": time.monotonic(), "members": members}


def serve(gateway: Gateway) -> None:
    handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "put_many": lambda r: gateway.put_many(r["kvs"], int(r.get("batch", 100))),
        "range": lambda r: gateway.range(r["prefix"]),
        "metrics": lambda r: gateway.metrics(list(r.get("names", []))),
    }
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
            reply = handlers[req["op"]](req)
        except Exception as exc:
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply, separators=(",", ":")) + "\n")
        sys.stdout.flush()


class EtcdHttp:
    """This module running in a lab namespace (``prefix``: e.g. Lab.client_cmd([])), our child;
    ``call`` sends one request and returns its answer. Close with ``close`` (EOF: it exits)."""

    def __init__(self, prefix: list[str], python: str, endpoints: list[str]) -> None:
        compose_dir = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [compose_dir, os.environ.get("PYTHONPATH")]))}
        argv = [*prefix, python, "-m", "labkit.etcdhttp", "--endpoints", ",".join(endpoints)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=compose_dir)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"labkit.etcdhttp exited ({self.proc.poll()})")
        reply = dict(json.loads(line))
        if "error" in reply:
            raise RuntimeError(f"etcd {op}: {reply['error']}")
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labkit.etcdhttp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", required=True, help="comma-separated http://IP:PORT")
    args = parser.parse_args(argv)
    serve(Gateway([e for e in args.endpoints.split(",") if e]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
