"""`moeray experts`: the live expert placement and load of a running cluster, read from Redis.

    moeray experts --config FILE [--tier NAME] [--output text|json] [--redis-url URL] [--plan]

For every tier with expert shards (or the one named): the placement epoch, the balancedness
(cluster/expert_load.py), each shard replica with its node and the tokens it served in the recent
load windows, and per MoE layer a heat strip (one character per expert, darker = more tokens)
followed by which replicas hold each expert. `--output json` prints one object
{"cluster": ..., "tiers": [ExpertStatus.to_json() + {"tier": name}]}.
`--plan` prints the expert autoscaler's latest plan instead (cluster/expert_autoscaler.py): mode,
outcome, the epoch it was made from (and the one it became), balancedness before and after,
and the planned replicas per expert, which in advisory mode is what active mode would apply;
with `--output json`, {"cluster": ..., "tiers": [{"tier": name, "plan": PlanRecord or null}]}.
The Redis URL comes from the config's state.redis_url (or MOERAY_REDIS_URL), or --redis-url.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEAT = " ▁▂▃▄▅▆▇█"  # 0 tokens, then eight levels up to the busiest expert of the tier


def register(sub: Any) -> None:
    p = sub.add_parser("experts", help="live expert placement, per-expert load and balancedness")
    p.add_argument("--config", type=Path, required=True, help="the cluster's YAML config file")
    p.add_argument("--tier", default=None, help="only this tier (default: every sharded tier)")
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.add_argument(
        "--redis-url", default=None, help="state.redis_url: the cluster's Redis (default: config)"
    )
    p.add_argument(
        "--plan", action="store_true", help="the expert autoscaler's latest plan (any mode)"
    )
    p.set_defaults(func=_experts)


def heat_strip(tokens: Any, peak: float) -> str:
    """One character per expert: its tokens on a 0..peak scale (blank = none)."""
    top = len(HEAT) - 1
    return "".join(
        HEAT[0] if n <= 0 or peak <= 0 else HEAT[max(1, round(top * float(n) / peak))]
        for n in tokens
    )


def _experts(args: argparse.Namespace) -> int:
    from moeray.cluster.config import apply_environment, config_with, load_config
    from moeray.cluster.expert_load import read_expert_status
    from moeray.cluster.state import ClusterState

    config = apply_environment(load_config(args.config))
    if args.redis_url:
        config = config_with(config, "state", {"redis_url": args.redis_url})
    if not config.state.redis_url:
        raise ValueError(
            "state.redis_url is not set: give the cluster's Redis with --redis-url or in the "
            "config (`moeray serve` prints the URL of its private redis-server)"
        )
    names = [t.name for t in config.tiers]
    if args.tier is not None and args.tier not in names:
        raise ValueError(
            f"--tier: {args.tier!r} is not a tier of the config; choose one of {names}"
        )
    sharded = [t.name for t in config.tiers if t.experts.shards > 0]
    wanted = [args.tier] if args.tier else sharded
    state = ClusterState.from_config(config.state, config.state.redis_url)
    try:
        if args.plan:
            plans = [(name, state.read_plan(name)) for name in wanted]
        else:
            statuses = [(name, read_expert_status(state, name)) for name in wanted]
    finally:
        state.close()
    if args.plan:
        return _print_plans(config.state.cluster, plans, args.output)
    if args.output == "json":
        tiers = [{"tier": n, **(s.to_json() if s else {"epoch": 0})} for n, s in statuses]
        print(json.dumps({"cluster": config.state.cluster, "tiers": tiers}))
        return 0
    if not wanted:
        print("no tier has expert shards (experts.shards > 0)")
    for name, status in statuses:
        print(_text(name, status))
    return 0


def _text(tier: str, status: Any) -> str:
    if status is None:
        return f"tier {tier}: no expert placement in Redis (in-process experts, or not started)"
    p = status.placement
    lines = [
        f"tier {tier} · epoch {p.epoch} · balancedness {status.balancedness:.3f} · "
        f"{int(status.load.sum())} tokens in the last {status.window_s:g} s · "
        f"{int(status.total.sum())} since start"
    ]
    tokens = status.shard_tokens()
    lines.append("  shard  node             node id   state   experts  tokens")
    for r in status.replicas:
        lines.append(
            f"  {r.replica_id:<5}  {r.node:<15}  {r.node_id[:8]:<8}  {r.state:<6}  "
            f"{len(r.experts):>7}  {tokens.get(r.replica_id, 0):>6}"
        )
    missing = sorted(set(tokens) - {r.replica_id for r in status.replicas})
    if missing:
        lines.append(f"  (replicas {missing} are in the placement but not registered)")
    peak = float(status.load.max()) if status.load.size else 0.0
    for li, layer in enumerate(p.mapping):
        strip = heat_strip(status.load[li], peak)
        lines.append(f"  layer {li:<3} |{strip}|  max {int(status.load[li].max())}")
        held = " ".join(f"{e}:{','.join(str(r) for r in reps)}" for e, reps in enumerate(layer))
        lines.append(f"            expert:shards {held}")
    return "\n".join(lines)


def _print_plans(cluster: str, plans: list[tuple[str, Any]], output: str) -> int:
    if output == "json":
        tiers = [{"tier": n, "plan": json.loads(p.to_json()) if p else None} for n, p in plans]
        print(json.dumps({"cluster": cluster, "tiers": tiers}))
        return 0
    for name, p in plans:
        if p is None:
            print(f"tier {name}: no autoscaler plan yet (experts.autoscale off, or too early)")
            continue
        became = f" -> epoch {p.to_epoch}" if p.to_epoch else ""
        print(
            f"tier {name} · {p.mode} · {p.outcome} · from epoch {p.from_epoch}{became} · "
            f"balancedness {p.balancedness_before:.3f} -> {p.balancedness_after:.3f}"
            + (f" · {p.detail}" if p.detail else "")
        )
        for li, layer in enumerate(p.placement.mapping):
            counts = " ".join(f"{e}:{len(reps)}" for e, reps in enumerate(layer))
            print(f"  layer {li:<3} expert:replicas {counts}")
    return 0
