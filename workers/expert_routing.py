"""Expert routing tables for expert parallelism: which shard serves which (layer, expert), which
replica takes a step's tokens, and the exact combine of the shards' results.

- `build_routes(mapping, moe_layers, replica_ids)`: a placement (mapping[moe_layer][expert] ->
  replica ids, the layout of `cluster.state_messages.Placement`) -> per model layer a
  `LayerRoute` and per replica its assignment (layer -> the experts it must hold).
- `assign_replicas(...)`: THE replica-choice function of moeray (`cluster/placement.py`
  re-exports it): every expert's tokens of one step go to ONE of its replicas, the one whose
  shard has the fewest tokens so far, heaviest experts first. An expert's rows stay one batch,
  so the distributed expert GEMMs see the same rows as the in-process ones (same numbers).
- `dispatch_plan` / `combine_in_expert_order`: per shard the rows and local expert slots it
  serves; back, the shards' per-(token, choice) rows added per token in ascending GLOBAL expert
  id, the order in which the in-process `kernels.fused_moe` adds them. So sharded equals
  in-process bit for bit in fp32 whatever top-k is and however the experts are spread.

Numpy, not torch: on a few dozen ids a numpy op costs ~1 us and a torch op ~5-10 us, and this
runs once per MoE layer per step. Shape letters: docs/SHAPES.md (T tokens, K top-k, E experts,
D hidden, S shards; n_s = the (token, choice) slots shard s serves).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Assignment = dict[int, list[int]]  # model layer -> global expert ids held by one shard


class NoLiveReplica(LookupError):
    """Every replica of an expert is excluded (dead)."""


def _outstanding_of(outstanding: Mapping[int, float] | Sequence[float] | None, r: int) -> float:
    if outstanding is None:
        return 0.0
    if isinstance(outstanding, Mapping):
        return float(outstanding.get(r, 0.0))
    return float(outstanding[r]) if r < len(outstanding) else 0.0


def choose_replica(
    replicas: Sequence[int],
    outstanding: Mapping[int, float] | Sequence[float] | None = None,
    step: int = 0,
    exclude: Collection[int] = (),
) -> int:
    """The replica (shard id) with the fewest outstanding tokens, not in `exclude`; ties go
    round-robin: the candidate order rotates by `step`. Raises NoLiveReplica if none is left."""
    live = [r for r in replicas if r not in exclude]
    if not live:
        raise NoLiveReplica(f"every replica of {list(replicas)} is excluded")
    n = len(live)
    best = min(range(n), key=lambda i: (_outstanding_of(outstanding, live[i]), (i - step) % n))
    return live[best]


def assign_replicas(
    layout: Sequence[Sequence[int]],
    tokens_per_expert: Sequence[int] | np.ndarray,
    step: int = 0,
    exclude: Collection[int] = (),
    outstanding: Mapping[int, float] | None = None,
) -> list[int]:
    """One shard per expert of one layer for one step: layout[E] -> replicas, tokens [E]
    -> shard id per expert [E]. Experts with tokens are assigned heaviest first, each to the
    replica whose shard has the fewest tokens so far (starting from `outstanding`)."""
    tokens = np.asarray(tokens_per_expert)
    if tokens.shape != (len(layout),):
        raise ValueError(
            f"tokens_per_expert must have shape ({len(layout)},) [E], got {tokens.shape}"
        )
    load: dict[int, float] = dict(outstanding or {})
    out = [-1] * len(layout)
    for e in sorted(range(len(layout)), key=lambda e: (-int(tokens[e]), e)):
        s = choose_replica(layout[e], load, step + e, exclude)
        out[e] = s
        load[s] = load.get(s, 0.0) + float(tokens[e])
    return out


@dataclass
class LayerRoute:
    """Where one MoE layer's experts live, as numpy tables for the dispatch.

    fixed_owner [E] int64: the shard index of an expert with one replica, -1 if replicated;
    replicated: (expert, shard indices) for the others; slots [S, E] int32: an expert's row in
    shard s's table for this layer, -1 where s does not hold it.
    """

    fixed_owner: np.ndarray
    replicated: list[tuple[int, list[int]]]
    slots: np.ndarray

    def owners(
        self, topk_ids: np.ndarray, step: int = 0, exclude: Collection[int] = ()
    ) -> np.ndarray:
        """topk_ids [T, K] -> [E] shard index serving each expert in this dispatch.

        Single-replica experts are fixed; the tokens of a replicated expert all go to one of its
        replicas (assign_replicas, counting the fixed experts' tokens first), never to a shard
        in `exclude`. NoLiveReplica when an expert has no replica left outside `exclude`."""
        fixed = self.fixed_owner
        if exclude and bool(np.isin(fixed[fixed >= 0], list(exclude)).any()):
            lost = [e for e, s in enumerate(fixed.tolist()) if s in exclude]
            raise NoLiveReplica(f"experts {lost} live only on excluded shards {sorted(exclude)}")
        if not self.replicated:
            return fixed
        counts = np.bincount(topk_ids.reshape(-1), minlength=fixed.shape[0])  # [E]
        held = fixed >= 0
        load = np.bincount(fixed[held], counts[held], minlength=self.slots.shape[0])  # [S]
        experts = [e for e, _ in self.replicated]
        chosen = assign_replicas(
            [reps for _, reps in self.replicated],
            counts[experts],
            step,
            exclude,
            outstanding=dict(enumerate(load.tolist())),
        )
        owner = fixed.copy()
        owner[experts] = chosen
        return owner


def build_routes(
    mapping: Sequence[Sequence[Sequence[int]]],
    moe_layers: list[int],
    replica_ids: list[int],
    held: Mapping[int, Assignment] | None = None,
) -> tuple[dict[int, LayerRoute], dict[int, Assignment]]:
    """Placement mapping[moe_layer][expert] -> replica ids  =>  per model layer a LayerRoute
    (shard index = position in `replica_ids`) and per replica its assignment.

    held: what each replica's actor actually holds (model layer -> ascending experts), when it
    may hold more than the placement routes to it; the slots then index its real table."""
    if len(mapping) != len(moe_layers):
        raise ValueError(
            f"placement has {len(mapping)} layers but the model has {len(moe_layers)} MoE layers"
        )
    index = {rid: s for s, rid in enumerate(replica_ids)}
    assignments: dict[int, Assignment] = {rid: {} for rid in replica_ids}
    routes: dict[int, LayerRoute] = {}
    for li, layer in enumerate(moe_layers):
        E = len(mapping[li])
        fixed = np.full(E, -1, dtype=np.int64)
        slots = np.full((len(replica_ids), E), -1, dtype=np.int32)
        replicated = []
        for e, reps in enumerate(mapping[li]):
            shards = sorted(index[int(r)] for r in reps)
            if not shards:
                raise ValueError(f"placement mapping[{li}][{e}] lists no replica")
            for s in shards:
                routed = assignments[replica_ids[s]].setdefault(layer, [])
                if held is None:
                    slots[s, e] = len(routed)  # experts visited in ascending order: sorted slots
                else:
                    table = held[replica_ids[s]].get(layer, [])
                    if e not in table:
                        raise ValueError(
                            f"replica {replica_ids[s]} does not hold expert {e} of layer {layer}"
                        )
                    slots[s, e] = table.index(e)
                routed.append(e)
            if len(shards) == 1:
                fixed[e] = shards[0]
            else:
                replicated.append((e, shards))
        routes[layer] = LayerRoute(fixed, replicated, slots)
    return routes, assignments


@dataclass
class ShardPart:
    """What one shard gets of one layer's batch: rows [t] (None = every row), local expert
    slots [t, K] int32 (-1 = another shard's), and mask [T, K] bool, the (token, choice) slots
    it serves; its reply holds one float32 [D] row per True of mask, in row-major order."""

    rows: np.ndarray | None
    local_ids: np.ndarray
    mask: np.ndarray


def dispatch_plan(
    route: LayerRoute, topk_ids: np.ndarray, step: int = 0, exclude: Collection[int] = ()
) -> list[ShardPart]:
    """topk_ids [T, K] -> one ShardPart per shard (shards in `exclude` get nothing)."""
    owner = route.owners(topk_ids, step, exclude)[topk_ids]  # [T, K] shard of each choice
    parts = []
    for s, slots in enumerate(route.slots):
        mask = owner == s  # [T, K]
        local = np.where(mask, slots[topk_ids], -1).astype(np.int32, copy=False)  # [T, K]
        hit = mask.any(axis=1)  # [T]
        if hit.all():
            parts.append(ShardPart(None, local, mask))
        else:
            rows = np.flatnonzero(hit)  # [t]
            parts.append(ShardPart(rows, local[rows], mask))
    return parts


def combine_in_expert_order(
    topk_ids: np.ndarray, parts: Sequence[ShardPart], replies: Sequence[np.ndarray], D: int
) -> np.ndarray:
    """The layer's routed output float32 [T, D] from the shards' per-slot rows.

    replies[s]: float32 [n_s, D], the weighted expert outputs of shard s's slots (row-major
    over parts[s].mask). Per token the rows are added into zeros in ascending global expert id,
    as kernels.fused_moe adds them in-process: the same IEEE additions in the same order."""
    T, K = topk_ids.shape
    slot_rows = np.empty((T, K, D), dtype=np.float32)  # [T, K, D]
    for part, reply in zip(parts, replies):
        if reply.shape[0]:
            slot_rows[part.mask] = reply
    order = np.argsort(topk_ids, axis=1, kind="stable")  # [T, K] choices by expert id
    tokens = np.arange(T)
    out = np.zeros((T, D), dtype=np.float32)
    for k in range(K):
        out += slot_rows[tokens, order[:, k]]
    return out
