"""Metrics and health scraped over HTTP from the client namespace (node/observe.py, controller/metrics.py):
a VIP-only and an NFS VFS held by node-a show as held, serving, with their epoch, takeover and grace;
/healthz turns 503 naming the VFS whose VIP went missing from the interface."""

from __future__ import annotations

import json

from labkit.cluster import wait_for
from labkit.topology import NODES as HOSTS
from prometheus_client.parser import text_string_to_metric_families

from tests.lab.conftest import Cluster
from tests.lab.test_fileserver import fileserver

PORT = 9640
FETCH = ("import sys, urllib.request, urllib.error\n"
         "try:\n    r = urllib.request.urlopen(sys.argv[1], timeout=5)\n    code, body = r.status, r.read()\n"
         "except urllib.error.HTTPError as e:\n    code, body = e.code, e.read()\n"
         "sys.stdout.write(str(code) + '\\n' + body.decode())\n")


def fetch(cluster: Cluster, node: str, path: str) -> tuple[int, str]:
    """GET http://NODE:9640/PATH from the client namespace."""
    proc = cluster.lab.run("client", [str(cluster.bindir / "python"), "-c", FETCH,
                                      f"http://{HOSTS[node].ip}:{PORT}{path}"], timeout=20)
    code, _, body = proc.stdout.partition("\n")
    return int(code), body


def scrape(cluster: Cluster, node: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, text = fetch(cluster, node, "/metrics")
    assert code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_health_from_the_client_namespace(cluster: Cluster) -> None:
    cluster.agent_args = lambda _node: ["--metrics-address", f"0.0.0.0:{PORT}"]
    cluster.start_agents(nodes=("node-a", "node-b"))
    vip_only = cluster.new_vip()
    cluster.put_spec("plain", vip_only, candidates=("node-a", "node-b"))
    _vip, _device = fileserver(cluster, "files", candidates=("node-a", "node-b"))
    plain = cluster.wait_serving("plain", "node-a")
    files = cluster.wait_serving("files", "node-a", timeout=30)

    got = scrape(cluster, "node-a")
    for vfs, row in (("plain", plain), ("files", files)):
        assert got[("nfsha_vfs_held", (("vfs", vfs),))] == 1
        assert got[("nfsha_vfs_phase", (("phase", "serving"), ("vfs", vfs)))] == 1
        assert got[("nfsha_vfs_epoch", (("vfs", vfs),))] == row["epoch"]
        assert got[("nfsha_vfs_last_takeover_duration_seconds", (("vfs", vfs),))] > 0
        assert sum(v for (name, labels), v in got.items() if name == "nfsha_takeovers_total"
                   and ("vfs", vfs) in labels and ("outcome", "served") in labels) == 1
    assert 0 <= got[("nfsha_vfs_grace_remaining_seconds", (("vfs", "files"),))] <= 5  # GRACE of the fixture
    assert ("nfsha_vfs_grace_remaining_seconds", (("vfs", "plain"),)) not in got  # no NFS server
    assert got[("nfsha_guard_alive", ())] == 1 and got[("nfsha_self_fence_deadline_seconds", ())] > 0
    assert got[("nfsha_lease_renew_latency_seconds_count", ())] > 0
    assert got[("nfsha_step_duration_seconds_count", (("step", "mount"),))] >= 1
    assert scrape(cluster, "node-b")[("nfsha_vfs_held", (("vfs", "plain"),))] == 0
    assert fetch(cluster, "node-a", "/healthz") == (200, '{"ok": true, "problems": []}\n')
    assert fetch(cluster, "node-a", "/readyz")[0] == 200

    # The VIP vanishes from the interface behind the agent's back: health says so, naming the VFS.
    cluster.lab.run("node-a", ["ip", "addr", "del", f"{vip_only}/24", "dev", "eth0"])
    _code, body = wait_for(lambda: (r := fetch(cluster, "node-a", "/healthz"))[0] == 503 and r, 10,
                           "/healthz to fail")
    assert json.loads(body)["problems"] == [f"plain: VIP {vip_only}/24 is not on eth0"]
