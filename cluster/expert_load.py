"""Per-expert load of a sharded tier, as operators see it: balancedness and the live status.

- `balancedness(load, placement)`: pure. The tokens each shard served per MoE layer (an expert's
  tokens split evenly over its replicas, as `placement.shard_loads` counts them), then
  sum over layers of the mean shard load / sum over layers of the max shard load: 1.0 when every
  shard does equal work, 1/S when one shard does it all. Every layer waits for its busiest
  shard, so this is the fraction of the step's expert time spent usefully (vLLM's EPLB logs the
  same quantity). A window without tokens counts as 1.0.
- `ExpertStatus` / `read_expert_status(state, model)`: the live placement (layer, expert ->
  replicas and their nodes), the replicas' registry records, the per-expert load of the recent
  windows and since the start, and the balancedness: what `moeray experts` prints
  (cluster/cli_experts.py) and what the router exports on /metrics, with the expert
  autoscaler's latest plan and its plan counts by (mode, outcome).

Shape letters (docs/SHAPES.md): L MoE layers, E routed experts per layer, S shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from moeray.cluster.placement import shard_loads
from moeray.cluster.state_messages import Placement, PlanRecord, ReplicaInfo


def layer_shard_loads(load: Any, placement: Placement) -> np.ndarray:
    """load [L, E] tokens -> float64 [L, S] tokens per shard (S = highest replica id + 1)."""
    arr = np.asarray(load, dtype=np.float64)
    if arr.shape != (placement.num_layers, placement.num_experts):
        raise ValueError(
            f"load must have shape ({placement.num_layers}, {placement.num_experts}) [L, E], "
            f"got {arr.shape}"
        )
    S = max(placement.replica_ids()) + 1
    return np.stack([shard_loads(arr[li], placement.mapping[li], S) for li in range(len(arr))])


def balancedness(load: Any, placement: Placement) -> float:
    """Sum over layers of mean shard load / sum over layers of max shard load, in (0, 1]."""
    per_shard = layer_shard_loads(load, placement)[:, placement.replica_ids()]  # [L, S']
    worst = float(per_shard.max(axis=1).sum())
    return float(per_shard.mean(axis=1).sum()) / worst if worst > 0 else 1.0


@dataclass(frozen=True)
class ExpertStatus:
    """One sharded model's experts as Redis holds them now.

    load [L, E]: tokens in the recent windows (`window_s` seconds); total [L, E]: since start."""

    model: str
    placement: Placement
    replicas: list[ReplicaInfo]
    load: np.ndarray
    total: np.ndarray
    window_s: float
    plan: PlanRecord | None = None
    plans: dict[tuple[str, str], int] | None = None  # (mode, outcome) -> count

    @property
    def balancedness(self) -> float:
        return balancedness(self.load, self.placement)

    def replica_counts(self) -> np.ndarray:
        """Replicas per (layer, expert) of the placement -> int64 [L, E]."""
        return np.array([[len(r) for r in layer] for layer in self.placement.mapping])

    def shard_tokens(self) -> dict[int, int]:
        """Replica id -> tokens it served in the recent windows (all layers)."""
        per = layer_shard_loads(self.load, self.placement).sum(axis=0)  # [S]
        return {r: round(float(per[r])) for r in self.placement.replica_ids()}

    def to_json(self) -> dict[str, Any]:
        """One JSON-ready object: placement with nodes, load, totals, balancedness."""
        where = {r.replica_id: r for r in self.replicas}
        return {
            "model": self.model,
            "epoch": self.placement.epoch,
            "balancedness": round(self.balancedness, 6),
            "window_s": self.window_s,
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "actor": r.actor_name,
                    "node": r.node,
                    "node_id": r.node_id,
                    "state": r.state,
                    "num_experts": len(r.experts),
                }
                for r in self.replicas
            ],
            "shard_tokens": {str(k): v for k, v in self.shard_tokens().items()},
            "plan": json.loads(self.plan.to_json()) if self.plan is not None else None,
            "plans": [
                {"mode": m, "outcome": o, "count": n}
                for (m, o), n in sorted((self.plans or {}).items())
            ],
            "layers": [
                [
                    {
                        "expert": e,
                        "replicas": list(reps),
                        "nodes": [where[r].node_id if r in where else "" for r in reps],
                        "tokens": int(self.load[li, e]),
                        "total": int(self.total[li, e]),
                    }
                    for e, reps in enumerate(layer)
                ]
                for li, layer in enumerate(self.placement.mapping)
            ],
        }


def read_expert_status(state: Any, model: str, num_windows: int = 6) -> ExpertStatus | None:
    """The model's ExpertStatus from a ClusterState (six round trips), or None when no
    placement is published (not a sharded tier, or not started yet)."""
    placement = state.read_placement(model)
    if placement is None:
        return None
    L, E = placement.num_layers, placement.num_experts
    return ExpertStatus(
        model=model,
        placement=placement,
        replicas=state.live_replicas(model),
        load=state.read_load(model, L, E, num_windows=num_windows),
        total=state.read_load_total(model, L, E),
        window_s=state.load_window_s * num_windows,
        plan=state.read_plan(model),
        plans=state.read_plan_counts(model),
    )
