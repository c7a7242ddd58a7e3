"""Expert placement planning: pure functions of loads and capacity (no Redis, no Ray).

- `initial_placement`: every expert of every layer on `replicas` distinct shards, slot counts
  balanced across shards (they differ by at most one).
- `plan_rebalance`: DeepSeek-EPLB-style planning for one model, layer by layer:
  1. replicate: every expert gets min_replicas; spare slots go, one at a time, to the expert
     with the highest load per replica (up to max_replicas);
  2. pack: replicas, heaviest first, go to the least-loaded shard that has a free slot and does
     not hold the expert yet (longest-processing-time greedy);
  3. keep the best of {packed plan, current layout, initial layout} by max shard load, the
     current layout winning ties, so a plan never moves experts for nothing and is never worse
     than the initial placement for the same loads.
- `positional` / `bind_replica_ids`: the expert autoscaler plans on shard positions 0..S-1 and
  maps the plan back onto replica ids, reusing a shard actor wherever it already holds the
  experts planned for it and naming new shards otherwise; `replica_counts` / `drop_replicas`:
  the replicas the load needs, and giving the others back (scale-down).
- `choose_replica` / `assign_replicas`: which replica of an expert serves a step's tokens (the
  one whose shard has the fewest outstanding tokens, ties rotating with the step number). There
  is ONE such function, in workers/expert_routing.py, where the engine's dispatch runs it every
  layer; it is re-exported here for planners and tests.

Shape letters (docs/SHAPES.md): L MoE layers, E routed experts per layer. Shards are the
replica ids of `Placement`: integers 0..num_shards-1. Everything is deterministic: ties break
by index, never by hash order or randomness. "Load" of a replica = its expert's load / the
expert's replica count (tokens are spread evenly over replicas).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Any

import numpy as np
from moeray.cluster.state_messages import Placement
from moeray.workers.expert_routing import NoLiveReplica, assign_replicas, choose_replica

__all__ = [
    "NoLiveReplica",
    "assign_replicas",
    "bind_replica_ids",
    "choose_replica",
    "drop_replicas",
    "initial_placement",
    "max_shard_loads",
    "plan_rebalance",
    "positional",
    "replica_counts",
    "shard_loads",
]

Layout = list[list[int]]  # [E] -> shard ids of one layer


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def _initial_layer(num_experts: int, num_shards: int, replicas: int) -> Layout:
    """Greedy: replica r of expert e goes to the least-filled shard not holding e (ties: the
    shard nearest e + r, so one replica per expert comes out as plain striping e % S)."""
    counts = [0] * num_shards
    layout: Layout = [[] for _ in range(num_experts)]
    for r in range(replicas):
        for e in range(num_experts):
            free = (s for s in range(num_shards) if s not in layout[e])
            s = min(free, key=lambda s: (counts[s], (s - e - r) % num_shards))
            layout[e].append(s)
            counts[s] += 1
    return [sorted(reps) for reps in layout]


def initial_placement(
    num_layers: int, num_experts: int, num_shards: int, replicas: int = 1
) -> Placement:
    """Every expert on min(replicas, num_shards) distinct shards; per-shard slot counts differ by
    at most one; every layer laid out alike. Returns a Placement with epoch 0."""
    _check_positive(
        num_layers=num_layers, num_experts=num_experts, num_shards=num_shards, replicas=replicas
    )
    layer = _initial_layer(num_experts, num_shards, min(replicas, num_shards))
    return Placement.from_lists([layer] * num_layers, epoch=0)


def shard_loads(
    layer_loads: np.ndarray, layout: Sequence[Sequence[int]], num_shards: int
) -> np.ndarray:
    """Load per shard of one layer: layer_loads [E], layout[E] -> shard ids  ->  float64 [S]."""
    out = np.zeros(num_shards, dtype=np.float64)
    for e, reps in enumerate(layout):
        for s in reps:
            out[s] += layer_loads[e] / len(reps)
    return out


def max_shard_loads(loads: Any, placement: Placement, num_shards: int) -> np.ndarray:
    """The max shard load of every layer: loads [L, E] -> float64 [L]."""
    arr = _check_loads(loads, placement)
    return np.array(
        [shard_loads(arr[li], placement.mapping[li], num_shards).max() for li in range(len(arr))]
    )


def _check_loads(loads: Any, current: Placement) -> np.ndarray:
    if hasattr(loads, "detach"):  # a torch tensor
        loads = loads.detach().cpu().numpy()
    arr = np.asarray(loads, dtype=np.float64)
    expected = (current.num_layers, current.num_experts)
    if arr.shape != expected:
        raise ValueError(f"loads must have shape {expected} [L, E], got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError("loads must be finite and >= 0 everywhere")
    return arr


def _replica_counts(layer_loads: np.ndarray, r_min: int, r_max: int, spare: int) -> list[int]:
    """Step 1: min replicas each, then spare slots to the highest load-per-replica experts."""
    counts = [r_min] * len(layer_loads)
    heap = [(-float(w) / r_min, e) for e, w in enumerate(layer_loads) if w > 0 and r_min < r_max]
    heapq.heapify(heap)
    while spare > 0 and heap:
        _, e = heapq.heappop(heap)
        counts[e] += 1
        spare -= 1
        if counts[e] < r_max:
            heapq.heappush(heap, (-float(layer_loads[e]) / counts[e], e))
    return counts


class _Packer:
    """Step 2 for one layer: LPT greedy packing of replicas onto shards under capacity."""

    def __init__(self, num_experts: int, num_shards: int, slots: int) -> None:
        self.slots = slots
        self.layout: Layout = [[] for _ in range(num_experts)]
        self.held: list[list[int]] = [[] for _ in range(num_shards)]  # shard -> experts
        self.load = [0.0] * num_shards
        self.weight = [0.0] * num_experts  # load of one replica of each expert

    def _put(self, e: int, s: int) -> None:
        self.layout[e].append(s)
        self.held[s].append(e)
        self.load[s] += self.weight[e]

    def _take(self, e: int, s: int) -> None:
        self.layout[e].remove(s)
        self.held[s].remove(e)
        self.load[s] -= self.weight[e]

    def place(self, e: int) -> None:
        """Puts one more replica of e; swaps another expert away if e is blocked (every shard
        with a free slot already holds e); drops the replica if no swap exists either."""
        free = [s for s in range(len(self.held)) if len(self.held[s]) < self.slots]
        ok = [s for s in free if s not in self.layout[e]]
        if ok:
            self._put(e, min(ok, key=lambda s: (self.load[s], len(self.held[s]), s)))
            return
        for t in range(len(self.held)):  # t is full and lacks e; u has room and holds e
            if t in self.layout[e]:
                continue
            for x in sorted(self.held[t]):
                u = next((u for u in free if u not in self.layout[x]), None)
                if u is not None:
                    self._take(x, t)
                    self._put(x, u)
                    self._put(e, t)
                    return


def _pack_layer(layer_loads: np.ndarray, counts: list[int], num_shards: int, slots: int) -> Layout:
    packer = _Packer(len(counts), num_shards, slots)
    packer.weight = [float(w) / c for w, c in zip(layer_loads, counts)]
    # First replicas of every expert before any extra one, so no expert can be left without
    # one; within each round the heaviest replica first (LPT).
    for r in range(max(counts)):
        order = sorted(
            (e for e in range(len(counts)) if counts[e] > r), key=lambda e: (-packer.weight[e], e)
        )
        for e in order:
            packer.place(e)
    return [sorted(reps) for reps in packer.layout]


def _valid_layer(
    layout: Sequence[Sequence[int]], num_shards: int, slots: int, r_min: int, r_max: int
) -> bool:
    used = [0] * num_shards
    for reps in layout:
        if not r_min <= len(reps) <= r_max or any(not 0 <= s < num_shards for s in reps):
            return False
        for s in reps:
            used[s] += 1
    return max(used) <= slots


def plan_rebalance(
    loads: Any,
    current: Placement,
    num_shards: int,
    slots_per_shard: int,
    min_replicas: int = 1,
    max_replicas: int = 4,
) -> Placement:
    """Plans a placement for `loads` [L, E] (tokens per expert, any non-negative numbers).

    Capacity is per layer: each shard holds at most slots_per_shard experts of each layer.
    Replica counts are clamped to num_shards (two replicas on one shard are useless). Returns a
    Placement with current.epoch (publishing assigns the next one); layers whose current layout
    is valid and no worse are returned unchanged.
    """
    _check_positive(
        num_shards=num_shards,
        slots_per_shard=slots_per_shard,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
    )
    if max_replicas < min_replicas:
        raise ValueError(f"max_replicas ({max_replicas}) must be >= min_replicas ({min_replicas})")
    arr = _check_loads(loads, current)
    r_min, r_max = min(min_replicas, num_shards), min(max_replicas, num_shards)
    num_experts = current.num_experts
    if num_shards * slots_per_shard < num_experts * r_min:
        raise ValueError(
            f"slots_per_shard={slots_per_shard} on {num_shards} shards cannot hold "
            f"{num_experts} experts x {r_min} replicas"
        )
    initial = _initial_layer(num_experts, num_shards, r_min)
    spare = num_shards * slots_per_shard - num_experts * r_min
    layers = []
    for li in range(current.num_layers):
        counts = _replica_counts(arr[li], r_min, r_max, spare)
        packed = _pack_layer(arr[li], counts, num_shards, slots_per_shard)
        cur = [list(r) for r in current.mapping[li]]
        # Preference order on ties: current, packed, initial (always valid). The packed plan
        # is dropped if its packing had to give up a replica below min_replicas.
        candidates = [
            c for c in (cur, packed) if _valid_layer(c, num_shards, slots_per_shard, r_min, r_max)
        ] + [initial]
        scores = [shard_loads(arr[li], c, num_shards).max() for c in candidates]
        best = min(scores)
        tol = 1e-9 * max(1.0, best)
        layers.append(next(c for c, sc in zip(candidates, scores) if sc <= best + tol))
    return Placement.from_lists(layers, epoch=current.epoch)


# ---- the autoscaler's bookkeeping: shard positions <-> replica ids --------------------------
def positional(placement: Placement) -> tuple[Placement, list[int]]:
    """The placement with its replica ids renumbered 0..S-1 in ascending order (what
    plan_rebalance works on), and the replica id of each position."""
    rids = placement.replica_ids()
    index = {r: i for i, r in enumerate(rids)}
    layers = [[[index[r] for r in reps] for reps in layer] for layer in placement.mapping]
    return Placement.from_lists(layers, epoch=placement.epoch), rids


def bind_replica_ids(
    planned: Placement, rids: Sequence[int], held: dict[int, list[list[int]]], next_id: int
) -> tuple[Placement, dict[int, list[list[int]]]]:
    """A positional plan -> the same layout on replica ids, and the NEW shards it needs.

    Position p keeps the shard rids[p] when that actor already holds (held[rid][layer]: the
    experts it loaded) every expert planned for p; else an idle existing shard that does;
    else a new replica id (next_id, next_id + 1, ...) whose experts are returned, to start.
    A shard actor never changes what it holds: a plan that moves experts starts new ones."""
    S = max(planned.replica_ids()) + 1
    want = [[[e for e, reps in enumerate(layer) if p in reps] for layer in planned.mapping]
            for p in range(S)]  # fmt: skip
    taken: set[int] = set()
    chosen: dict[int, int] = {}
    new: dict[int, list[list[int]]] = {}

    def fits(rid: int, p: int) -> bool:
        have = held.get(rid)
        return have is not None and all(set(w) <= set(h) for w, h in zip(want[p], have))

    empty = {p for p in range(S) if not any(want[p])}  # a position the plan left unused
    for p in range(S):  # first the shard at the same position, then any idle one that fits
        if p not in empty and p < len(rids) and fits(rids[p], p):
            chosen[p] = rids[p]
            taken.add(rids[p])
    for p in range(S):
        if p in chosen or p in empty:
            continue
        spare = next((r for r in sorted(held) if r not in taken and fits(r, p)), None)
        if spare is None:
            spare, next_id = next_id, next_id + 1
            new[spare] = want[p]
        chosen[p] = spare
        taken.add(spare)
    layers = [[[chosen[p] for p in reps] for reps in layer] for layer in planned.mapping]
    return Placement.from_lists(layers, epoch=planned.epoch), new


def replica_counts(loads: Any, current: Placement, num_shards: int, slots_per_shard: int,
                   min_replicas: int = 1, max_replicas: int = 4) -> np.ndarray:  # fmt: skip
    """How many replicas plan_rebalance would give each expert for `loads` [L, E] -> int [L, E]
    (step 1 of the plan: the replicas the load needs, within the bounds and the capacity)."""
    arr = _check_loads(loads, current)
    r_min, r_max = min(min_replicas, num_shards), min(max_replicas, num_shards)
    spare = max(0, num_shards * slots_per_shard - current.num_experts * r_min)
    return np.array([_replica_counts(arr[li], r_min, r_max, spare) for li in range(len(arr))])


def drop_replicas(current: Placement, keep: np.ndarray) -> Placement:
    """Gives back replicas: expert (l, e) keeps keep[l, e] of its replicas (at least one),
    dropping those on the shards that hold the most experts of the layer (ties: the highest
    replica id, so the newest shards empty first). Returns the placement with current.epoch."""
    layers = []
    for li, layer in enumerate(current.mapping):
        count: dict[int, int] = {}
        for reps in layer:
            for r in reps:
                count[r] = count.get(r, 0) + 1
        out = []
        for e, held in enumerate(layer):
            kept = list(held)
            while len(kept) > max(1, int(keep[li, e])):
                victim = max(kept, key=lambda r: (count[r], r))
                kept.remove(victim)
                count[victim] -= 1
            out.append(kept)
        layers.append(out)
    return Placement.from_lists(layers, epoch=current.epoch)
