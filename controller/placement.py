"""Placement: which node should serve a VFS, and what this node should do about it.

Pure functions of the cluster view, so every agent reaches the same answer from the same
view. Safety never rests on these answers (the owner transaction and the self-fence do
that); placement only decides who tries first.

Preference order for a VFS: the intent node, if it is a live candidate; then the live
candidates in spec order. Nodes that are backing off from the VFS after a failed
takeover go last, so they are not chosen again while another candidate can serve.
Nodes whose own policy refuses the VFS (controller/policy.py; they publish why in their
registration) are no candidates at all, and a holder that refuses it releases it.

Operator controls:
- A drained node (`nfs-ha drain`) comes last, after every other live candidate (even those backing
  off): it takes a VFS only when nobody else can. A VFS it holds moves to the first candidate that
  can take it (live, not drained, not refusing, not backing off), and stays if there is none: a
  drain never stops a VFS that has nowhere to go.
- A paused VFS (`nfs-ha pause`, or the whole cluster) does not move: nobody takes it over and its
  holder keeps it, whatever intent, spec, drain or policy say. Only a stale owner key of this very
  node's earlier run is still cleared (that moves nothing). The self-fence rules still apply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from controller.view import Owner, VfsConfig


class Action(enum.Enum):
    NOTHING = "nothing"
    ACQUIRE = "acquire"
    RELEASE = "release"
    CLEAR_STALE = "clear-stale"  # an owner key of ours from an earlier life of this agent


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    rank: int = 0  # ACQUIRE: 0 = first choice; wait rank * rank_delay before trying


def backing_off(node_info: dict[str, Any], vfs: str) -> bool:
    backoff = node_info.get("backoff")
    return isinstance(backoff, dict) and vfs in backoff


def refusals(config: VfsConfig, live: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Live candidates whose node policy refuses this VFS, with their reasons (as they published them)."""
    if config.spec is None:
        return {}
    out = {}
    for node in config.spec.candidates:
        info = live.get(node, {})
        refused, more = info.get("refused"), info.get("refused_more")
        if isinstance(refused, dict) and config.name in refused:
            out[node] = str(refused[config.name])[:300]
        elif isinstance(more, list) and config.name in more:
            out[node] = "refused by its node policy (the reason is in that node's log)"
    return out


def preference(config: VfsConfig, live: dict[str, dict[str, Any]]) -> list[str]:
    """Live candidates, best first."""
    if config.spec is None:
        return []
    order = list(config.spec.candidates)
    if config.intent in order:
        order.remove(config.intent)
        order.insert(0, config.intent)
    refusing = refusals(config, live)
    alive = [n for n in order if n in live and n not in refusing]
    usable = [n for n in alive if not live[n].get("drained")]
    ready = [n for n in usable if not backing_off(live[n], config.name)]
    return ready + [n for n in usable if n not in ready] + [n for n in alive if n not in usable]


def decide(me: str, config: VfsConfig, owner: Owner | None, live: dict[str, dict[str, Any]],
           held_vip: str | None, refused: str | None = None) -> Decision:
    """What `me` should do for one VFS. `held_vip`: the VIP this agent process holds it with;
    `refused`: why this node's own policy refuses the spec (None: it does not)."""
    if owner is not None and owner.node == me and held_vip is None:
        return Decision(Action.CLEAR_STALE, "owner key left by an earlier run of this agent")
    if config.paused:
        return Decision(Action.NOTHING, "paused")
    if held_vip is not None:
        if refused and config.spec is not None:
            return Decision(Action.RELEASE, f"spec_changed: refused by this node's policy: {refused}")
        return _decide_holder(me, config, live, held_vip)
    if owner is not None or config.spec is None or refused:
        return Decision(Action.NOTHING)
    order = preference(config, live)
    if me not in order:
        return Decision(Action.NOTHING)
    cause = "intent" if config.intent == me else "placement"
    return Decision(Action.ACQUIRE, cause, rank=order.index(me))


def _decide_holder(me: str, config: VfsConfig, live: dict[str, dict[str, Any]], held_vip: str) -> Decision:
    if config.spec is None:
        if config.errors == ("no spec",):
            return Decision(Action.RELEASE, "spec_changed: spec deleted")
        # A bad spec moves nothing: keep serving what the last valid spec said.
        return Decision(Action.NOTHING)
    if me not in config.spec.candidates:
        return Decision(Action.RELEASE, "spec_changed: this node is no longer a candidate")
    if config.spec.vip_cidr != held_vip:
        return Decision(Action.RELEASE, f"spec_changed: VIP is now {config.spec.vip_cidr}")
    target = config.intent
    ready = [n for n in preference(config, live) if n != me and not live[n].get("drained")
             and not backing_off(live[n], config.name)]
    if target and target in ready:
        return Decision(Action.RELEASE, f"intent: move to {target}")
    if live.get(me, {}).get("drained") and ready:
        return Decision(Action.RELEASE, f"drain: move to {ready[0]}")
    return Decision(Action.NOTHING)
