"""Issue 2: lease-held VIPs with etcd takeover, intents and self-fencing, in the namespace lab."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.lab.conftest import NODES, Cluster, final_guard_record, guard_pid, wait_for


def two_mac_samples(samples: list[dict]) -> list[dict]:
    return [s for s in samples if len(s["macs"]) > 1]


def macs_seen(samples: list[dict]) -> set[str]:
    return {m for s in samples for m in s["macs"]}


def serving(cluster: Cluster, vfs: str, node: str, timeout: float = 20) -> dict:
    return cluster.wait_serving(vfs, node, timeout)


def test_initial_placement_on_first_candidate(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip, ["node-b", "node-a", "node-c"])
    row = serving(cluster, "home", "node-b")
    assert row["epoch"] > 0 and row["vip"] == f"{vip}/24"
    cluster.wait_served_by(vip, "node-b")
    assert cluster.holders(vip) == ["node-b"]
    owner = cluster.get_json(cluster.key("home", "owner"))
    assert owner["node"] == "node-b" and owner["since"]
    nodes = {n["node"]: n for n in cluster.status()["nodes"]}
    assert nodes["node-b"]["vfs"] == ["home"] and all(nodes[n]["alive"] for n in NODES)


def test_intent_moves_vip_and_deleting_it_stays(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip)
    first = serving(cluster, "home", "node-a")
    sampler = cluster.sampler(vip, duration=60)
    sampler.wait_for_mac(cluster.lab.mac_of("node-a"))
    cluster.put_intent("home", "node-b")  # what an operator does: etcdctl put …/intent node-b
    moved = serving(cluster, "home", "node-b")
    cluster.wait_served_by(vip, "node-b")
    assert moved["epoch"] > first["epoch"]
    assert cluster.holders(vip) == ["node-b"]

    cluster.delete(cluster.key("home", "intent"))
    time.sleep(3 * 2)  # three lease TTLs: nothing may move
    row = cluster.vfs_status("home")
    assert row["owner"] == "node-b" and row["epoch"] == moved["epoch"] and row["intent"] is None
    assert cluster.holders(vip) == ["node-b"]

    # The CLI writes the same intent, after validating it.
    bad = cluster.cli("move", "home", "node-x")
    assert bad.returncode == 2 and "not a candidate" in bad.stderr
    assert cluster.vfs_status("home")["intent"] is None
    ok = cluster.cli("move", "home", "node-c")
    assert ok.returncode == 0, ok.stderr
    serving(cluster, "home", "node-c")
    cluster.wait_served_by(vip, "node-c")

    samples = sampler.stop()
    assert len(samples) > 100
    assert two_mac_samples(samples) == []
    assert macs_seen(samples) == {cluster.lab.mac_of(n) for n in NODES}


def test_returning_intent_node_gets_its_vfs_back(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents(nodes=("node-a", "node-b"))
    cluster.put_intent("home", "node-c")
    cluster.put_spec("home", vip)
    serving(cluster, "home", "node-a")
    cluster.start_agent("node-c")
    serving(cluster, "home", "node-c")
    cluster.wait_served_by(vip, "node-c")


def test_killed_owner_is_replaced_by_next_candidate(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip)
    first = serving(cluster, "home", "node-a")
    sampler = cluster.sampler(vip, duration=60)
    sampler.wait_for_mac(cluster.lab.mac_of("node-a"))
    cluster.kill_node("node-a")
    row = serving(cluster, "home", "node-b")
    cluster.wait_served_by(vip, "node-b")
    assert row["epoch"] > first["epoch"]
    nodes = {n["node"]: n for n in cluster.status()["nodes"]}
    assert not nodes["node-a"]["alive"]
    samples = sampler.stop()
    assert two_mac_samples(samples) == []
    assert macs_seen(samples) == {cluster.lab.mac_of("node-a"), cluster.lab.mac_of("node-b")}


def test_partitioned_owner_drops_vip_before_anyone_raises_it(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip)
    serving(cluster, "home", "node-a")
    mac_a, mac_b = cluster.lab.mac_of("node-a"), cluster.lab.mac_of("node-b")
    sampler = cluster.sampler(vip, duration=60)
    sampler.wait_for_mac(cluster.lab.mac_of("node-a"))
    cluster.lab.partition_node("node-a")  # cut from etcd; the client still reaches it
    wait_for(lambda: not cluster.vip_on("node-a", vip), 10, "node-a dropping the VIP by itself")
    serving(cluster, "home", "node-b")
    cluster.wait_served_by(vip, "node-b")
    time.sleep(1)
    samples = sampler.stop()
    assert two_mac_samples(samples) == []
    last_a = max(s["t"] for s in samples if mac_a in s["macs"])
    first_b = min(s["t"] for s in samples if mac_b in s["macs"])
    assert last_a < first_b, "node-b answered before node-a had stopped answering"
    assert "self-fence" in cluster.agent_log("node-a").read_text()

    cluster.lab.heal("node-a")  # node-a comes back: it must not take the VIP back by itself
    wait_for(lambda: {n["node"]: n for n in cluster.status()["nodes"]}["node-a"]["alive"], 20, "node-a back")
    time.sleep(2)
    assert cluster.holders(vip) == ["node-b"]
    assert cluster.vfs_status("home")["owner"] == "node-b"


def test_stopped_agent_does_not_keep_serving(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip)
    first = serving(cluster, "home", "node-a")
    mac_a = cluster.lab.mac_of("node-a")
    sampler = cluster.sampler(vip, duration=60)
    sampler.wait_for_mac(mac_a)
    pid = cluster.agents["node-a"]
    os.kill(pid, signal.SIGSTOP)
    try:
        # Frozen, node-a's agent cannot drop the VIP; its fence guard does, at the agent's own
        # self-fence deadline, so node-b can take over with nobody else answering.
        row = cluster.wait_serving("home", timeout=30, not_epoch=first["epoch"])
        assert row["owner"] != "node-a"
        assert cluster.holders(vip) == [row["owner"]]
    finally:
        os.kill(pid, signal.SIGCONT)
    # On waking up it finds its lease gone and fences too; it must not serve again by itself.
    wait_for(lambda: "self-fence" in cluster.agent_log("node-a").read_text(), 10, "node-a self-fence")
    time.sleep(2)
    assert cluster.holders(vip) == [row["owner"]] and cluster.vfs_status("home")["owner"] == row["owner"]
    assert "deadline passed" in final_guard_record(cluster, "node-a", "home")["reason"]
    samples = sampler.stop()
    assert two_mac_samples(samples) == []
    new_mac = cluster.lab.mac_of(row["owner"])
    assert max(s["t"] for s in samples if mac_a in s["macs"]) < min(s["t"] for s in samples if new_mac in s["macs"])


def test_killed_agent_is_fenced_by_its_guard(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents(nodes=("node-a", "node-b"))
    cluster.put_spec("home", vip, ["node-a", "node-b"])
    first = serving(cluster, "home", "node-a")
    cluster.stop_agent("node-a", signal.SIGKILL)  # the guard sees its pipe close and fences at once
    wait_for(lambda: not cluster.vip_on("node-a", vip), 5, "the guard removing node-a's VIP")
    row = cluster.wait_serving("home", "node-b", timeout=30)
    assert row["epoch"] > first["epoch"]
    cluster.wait_served_by(vip, "node-b")
    assert final_guard_record(cluster, "node-a", "home")["reason"] == "agent exited"
    cluster.start_agent("node-a")  # it reports what its guard did, in its registration
    wait_for(lambda: any(n["node"] == "node-a" and n.get("guard") for n in cluster.status()["nodes"]), 20,
             "guard record in nfs-ha status")
    assert "guard" in cluster.cli("status").stdout.lower()
    assert cluster.holders(vip) == ["node-b"]


def test_bad_specs_and_intents_move_nothing(cluster: Cluster) -> None:
    vip, vip2 = cluster.new_vip(), cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip)
    first = serving(cluster, "home", "node-a")

    cluster.put(cluster.key("broken", "spec"), "{not json")
    cluster.put(cluster.key("badvip", "spec"), '{"vip": "10.77.0.300/24", "candidates": ["node-a"]}')
    cluster.put_spec("dupe", vip, ["node-b"])                    # same VIP as home
    cluster.put_intent("home", "node-x")                          # not a candidate
    wait_for(lambda: all(cluster.vfs_status(v).get("phase") == "error" for v in ("broken", "badvip", "dupe")),
             20, "status errors for bad specs")
    st = {r["vfs"]: r for r in cluster.status()["vfs"]}
    assert "not valid JSON" in st["broken"]["error"]
    assert "10.77.0.300" in st["badvip"]["error"]
    assert f"VIP {vip} is in use by VFS 'home' on node-a" in st["dupe"]["error"]
    wait_for(lambda: "not a candidate" in cluster.vfs_status("home")["error"], 20, "intent error shown")
    for name in ("broken", "badvip", "dupe"):
        assert st[name]["owner"] is None
        assert cluster.get_json(cluster.key(name, "status"))["error"]  # the error is in etcd too

    # A valid spec that turns bad keeps serving what the last valid spec said.
    cluster.put(cluster.key("home", "spec"), json.dumps({"vip": f"{vip2}/24", "candidates": "node-b"}))
    wait_for(lambda: "still serving" in cluster.vfs_status("home")["error"], 20, "spec error on a serving VFS")
    row = cluster.vfs_status("home")
    assert row["owner"] == "node-a" and row["epoch"] == first["epoch"] and row["phase"] == "serving"
    assert cluster.holders(vip) == ["node-a"] and cluster.holders(vip2) == []

    text = cluster.cli("status")  # FAILING (exit 2): the bad specs' VFS are served by nobody, and it says why
    assert text.returncode == 2 and "not valid JSON" in text.stdout and "is in use by VFS 'home'" in text.stdout
    assert "FAILING: badvip is error" in text.stdout
    for node, pid in cluster.agents.items():
        assert cluster.lab.run(node, ["kill", "-0", str(pid)], check=False).returncode == 0, f"{node} died"
    assert "Traceback" not in "".join(p.read_text() for p in cluster.logdir.glob("agent-*.log"))


def test_sigterm_hands_over_at_once(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents(ttl=10, nodes=("node-a", "node-b"))  # a takeover by expiry would take >= 10 s
    cluster.put_spec("home", vip, ["node-a", "node-b"])
    serving(cluster, "home", "node-a")
    start = time.monotonic()
    assert cluster.stop_agent("node-a", signal.SIGTERM) == 0
    serving(cluster, "home", "node-b", timeout=30)
    took = time.monotonic() - start
    assert took < 7, f"takeover after SIGTERM took {took:.1f}s: the lease was not revoked"
    assert cluster.holders(vip) == ["node-b"]


def test_restarted_agent_removes_leftover_vip(cluster: Cluster) -> None:
    vip = cluster.new_vip()
    cluster.start_agents(nodes=("node-a", "node-b"))
    cluster.put_spec("home", vip, ["node-a", "node-b"])
    serving(cluster, "home", "node-a")
    # Guard and agent both die, so the VIP stays behind on node-a. The agent is frozen first and never
    # resumed: a live agent replaces a dead guard within a second, and that new guard would fence.
    agent, guard = cluster.agents["node-a"], guard_pid(cluster, "node-a")
    cluster.lab.agent_sigstop(agent)
    os.kill(guard, signal.SIGKILL)
    os.kill(agent, signal.SIGKILL)
    cluster.stop_agent("node-a", signal.SIGKILL)  # reaps the agent; the guard was the agent's child
    wait_for(lambda: not os.path.exists(f"/proc/{guard}"), 10, "the guard gone")
    assert cluster.vip_on("node-a", vip)
    # node-b's probe sees node-a still answering and refuses to raise a second copy.
    wait_for(lambda: cluster.lab.mac_of("node-a") in cluster.vfs_status("home").get("error", ""), 20,
             "takeover refused while the leftover answers")
    assert cluster.holders(vip) == ["node-a"]
    cluster.start_agent("node-a")
    wait_for(lambda: "removed leftover VIPs" in cluster.agent_log("node-a").read_text(), 20,
             "leftover cleanup at start-up")
    row = cluster.wait_serving("home", timeout=30)
    cluster.wait_served_by(vip, row["owner"])
    assert cluster.holders(vip) == [row["owner"]]


def client_neighbour_mac(cluster: Cluster, vip: str) -> str | None:
    entries = json.loads(cluster.lab.run("client", ["ip", "-j", "neigh", "show", vip, "dev", "eth0"]).stdout or "[]")
    return entries[0].get("lladdr") if entries else None


def test_owner_defends_its_vip_against_a_stale_claim(cluster: Cluster) -> None:
    """A gratuitous ARP from another node (as a node resumed after a freeze would send) points the
    client at the wrong MAC; the owner claims the VIP back within about a second."""
    vip = cluster.new_vip()
    cluster.start_agents()
    cluster.put_spec("home", vip, ["node-a", "node-b", "node-c"])
    serving(cluster, "home", "node-a")
    mac_a, mac_b = cluster.lab.mac_of("node-a"), cluster.lab.mac_of("node-b")
    cluster.lab.probe("client", vip, 2049)  # the client resolves the VIP: it has a neighbour entry now
    wait_for(lambda: client_neighbour_mac(cluster, vip) == mac_a, 10, "client resolved the VIP to node-a")
    time.sleep(2.5)  # after the takeover's own announcements (the last one 2 s after it)
    cluster.lab.run("node-b", [str(cluster.bindir / "python"), "-m", "node.arp", "announce",
                               "--iface", "eth0", "--ip", vip])
    # A gratuitous ARP overrides a client's entry at once; so does the owner's answer, a few ms
    # later. Without that answer the client would keep node-b's MAC until its entry goes stale.
    wait_for(lambda: f"claimed by {mac_b}" in cluster.agent_log("node-a").read_text(), 5, "the defence logged")
    wait_for(lambda: client_neighbour_mac(cluster, vip) == mac_a, 5, "client points at node-a again")
    time.sleep(1.5)  # the repeated defence, too, leaves it there
    assert client_neighbour_mac(cluster, vip) == mac_a
    assert cluster.holders(vip) == ["node-a"]
