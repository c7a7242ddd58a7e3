"""The Ray expert backend: a model's routed experts served by expert-shard actors.

`RayExperts` implements `workers.moe.ExpertBackend` behind the same Dispatch/Combine seam as
`LocalExperts`. Per step and per MoE layer it sends every shard that has work ONE message holding
all the rows of the batch bound for it, and adds the per-(token, choice) float32 rows it gets
back per token in global expert order (exact: the in-process numbers, bit for bit). Shared
experts stay with the engine (the MoE block adds them). The parts, by concern:

    workers/shard_pool.py       the actors: resources, placement by Ray, replacement
    workers/shard_transport.py  the wire: Unix socket / TCP by locality (or plain calls), deadline
    workers/expert_routing.py   routing tables, the one replica-choice function, exact combine
    this file                   the backend: the step seam, placement epochs, recovery

The step seam: the engine calls `begin_step()` before each forward (the only point where a new
placement, read from the injected `placement_source` — a cached table, never a network call — is
swapped in) and `end_step(expert_counts)` after it (the step's tokens per (layer, expert), handed
to the injected `on_load`, e.g. a LoadReporter's local add).

Failure: a dispatch has a deadline (`dispatch_deadline_s` for up to DEADLINE_ROWS tokens, more
for bigger batches). A shard that misses it (hung: e.g. stopped with SIGSTOP) or whose
connection breaks (its actor or node died) is killed and replaced by a fresh actor with the same
experts on surviving capacity (Ray places it); any other shard that no longer answers is
replaced too; the transport is rebuilt and the same messages re-run, so the step's output is
unchanged. Each retry doubles the deadline (a slow machine is not a dead shard). Registry updates
(`on_replica_started`, `on_replica_dead`) run on a background thread: nothing here waits on Redis.

Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import ray
import torch
from moeray.workers.expert_routing import (
    Assignment,
    build_routes,
    combine_in_expert_order,
    dispatch_plan,
)
from moeray.workers.expert_shard import pack_batch, raw_rows
from moeray.workers.shard_pool import (
    ShardInfo,
    ShardPool,
    ShardResources,
    ShardStartError,
    WeightSource,
)
from moeray.workers.shard_transport import (
    TRANSPORTS,
    Reply,
    ShardLost,
    ShardTimeout,
    Transport,
    make_transport,
)
from ray.exceptions import RayActorError

log = logging.getLogger(__name__)

MAX_RECOVERIES = 3
#: The dispatch deadline holds for batches of up to this many tokens; bigger ones (prefill
#: chunks) get proportionally longer.
DEADLINE_ROWS = 64

__all__ = [
    "Assignment",
    "PlacementLike",
    "RayExperts",
    "Recovery",
    "ShardFailure",
    "ShardResources",
    "WeightSource",
]


class PlacementLike(Protocol):
    """What the backend reads of a placement (cluster.state_messages.Placement has it)."""

    @property
    def epoch(self) -> int: ...

    @property
    def mapping(self) -> Sequence[Sequence[Sequence[int]]]:  # [moe_layer][expert] -> replica ids
        ...


class ShardFailure(RuntimeError):
    """Shards kept failing after MAX_RECOVERIES replacements."""


@dataclass(frozen=True)
class Recovery:
    """One recovery: why, which replicas were replaced, and how long after the dispatch began
    the failure was detected (tests and logs read it)."""

    reason: str  # "timeout" | "lost"
    replaced: tuple[int, ...]
    detected_after_s: float
    recovered_after_s: float


class RayExperts:
    """ExpertBackend over expert-shard actors. Build with `RayExperts.start(...)`; `close()` it.

    Hooks (all optional, injected by cluster/expert_parallel.py):
    - placement_source() -> the latest cached placement or None; read in begin_step, never blocks.
    - on_load(counts int64 [L_moe, E]): a step's tokens per (MoE layer, expert); must be cheap.
    - on_replica_started(ShardInfo), on_replica_dead(rid): registry updates, run on a background
      thread.
    """

    def __init__(
        self,
        pool: ShardPool,
        placement: PlacementLike,
        moe_layers: list[int],
        *,
        transport: str = "socket",
        dispatch_deadline_s: float = 0.5,
        placement_source: Callable[[], PlacementLike | None] | None = None,
        on_load: Callable[[np.ndarray], None] | None = None,
        on_replica_started: Callable[[ShardInfo], None] | None = None,
        on_replica_dead: Callable[[int], None] | None = None,
    ) -> None:
        if not dispatch_deadline_s > 0:
            raise ValueError(f"dispatch_deadline_s must be > 0, got {dispatch_deadline_s}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.pool = pool
        self.moe_layers = list(moe_layers)
        self.transport = transport
        self.dispatch_deadline_s = dispatch_deadline_s
        self.placement_source = placement_source
        self.on_load = on_load
        self.on_replica_started = on_replica_started
        self.on_replica_dead = on_replica_dead
        self.recoveries: list[Recovery] = []
        self.step = 0
        self.here = str(ray.get_runtime_context().get_node_id())
        self._hooks = ThreadPoolExecutor(1, thread_name_prefix="moeray-experts-hooks")
        self._transport: Transport | None = None
        self.epoch = -1
        try:
            self._apply_placement(placement)
        except BaseException:
            self.close()
            raise

    @classmethod
    def start(
        cls,
        source: WeightSource,
        placement: PlacementLike,
        moe_layers: list[int],
        *,
        resources: ShardResources | None = None,
        **kwargs: Any,
    ) -> RayExperts:
        """Starts one shard actor per replica id of `placement` and returns the backend."""
        return cls(ShardPool(source, resources), placement, moe_layers, **kwargs)

    # ---- the seam -----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Called by the engine before each step's forward: swaps in a newer placement."""
        self.step += 1
        p = self.placement_source() if self.placement_source is not None else None
        if p is not None and p.epoch > self.epoch:
            self._swap(p)

    def end_step(self, expert_counts: torch.Tensor) -> None:
        """Called by the engine after each step's forward with its tokens per (model layer,
        expert), int64 [num_layers, E]; hands the MoE layers' rows to on_load."""
        if self.on_load is not None:
            self.on_load(expert_counts[self.moe_layers].cpu().numpy())  # [L_moe, E]

    def forward_layer(
        self, layer: int, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, D], topk_weights [T, K] f32, topk_ids [T, K] int32 -> [T, D] routed output
        (weighted, summed over K in global expert order) in hidden's dtype. One message per
        shard that serves any of these tokens."""
        T, D = hidden.shape
        ids = topk_ids.cpu().numpy()  # [T, K]
        weights = topk_weights.cpu().float().numpy()  # [T, K]
        raw = raw_rows(hidden.cpu())  # [T, D * itemsize] uint8 view
        parts = dispatch_plan(self.routes[layer], ids, self.step)
        msgs: list[bytes | None] = []
        for p in parts:
            if not p.mask.any():
                msgs.append(None)
            elif p.rows is None:
                msgs.append(pack_batch(layer, raw, hidden.dtype, weights, p.local_ids))
            else:
                msgs.append(
                    pack_batch(layer, raw[p.rows], hidden.dtype, weights[p.rows], p.local_ids)
                )
        replies = self._round_trip(msgs, T)
        rows = [np.frombuffer(r, dtype=np.float32).reshape(-1, D) for r in replies]  # [n_s, D]
        out = combine_in_expert_order(ids, parts, rows, D)  # [T, D] f32
        return torch.from_numpy(out).to(device=hidden.device, dtype=hidden.dtype)

    # ---- placement ----------------------------------------------------------------------------
    def _apply_placement(self, placement: PlacementLike) -> None:
        """Moves to `placement`: starts, replaces (experts changed) and retires actors, then
        rebuilds the transport. Runs at construction and in begin_step only."""
        rids = sorted({int(r) for layer in placement.mapping for reps in layer for r in reps})
        routes, assignments = build_routes(placement.mapping, self.moe_layers, rids)
        self._close_transport()
        for rid in [r for r in self.pool.handles if r not in assignments]:
            self.pool.retire(rid)
            self._hook(self.on_replica_dead, rid)
        changed = {r: a for r, a in assignments.items() if self.pool.assignments.get(r) != a}
        for rid in changed:
            self.pool.retire(rid)
        for info in self.pool.start(changed):
            self._hook(self.on_replica_started, info)
        self.replica_ids, self.routes, self.epoch = rids, routes, placement.epoch
        self._mapping = placement.mapping
        self._transport = self._make_transport()

    def _swap(self, p: PlacementLike) -> None:
        if p.mapping == self._mapping:
            self.epoch = p.epoch
            return
        try:
            self._apply_placement(p)
        except ValueError as exc:  # a placement for another model shape: keep serving
            log.error("ignoring placement epoch %d: %s", p.epoch, exc)
            self.epoch = p.epoch
            if self._transport is None:
                self._transport = self._make_transport()

    def _make_transport(self) -> Transport:
        infos = [self.pool.info[r] for r in self.replica_ids]
        handles = [self.pool.handles[r] for r in self.replica_ids]
        return make_transport(self.transport, handles, [i.node_id for i in infos], self.here)

    def _close_transport(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def _hook(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is not None:
            self._hooks.submit(_logged, fn, *args)

    @property
    def shards(self) -> list[ShardInfo]:
        """The running shards in dispatch order."""
        return [self.pool.info[r] for r in self.replica_ids]

    # ---- failure ------------------------------------------------------------------------------
    def _round_trip(self, msgs: list[bytes | None], rows: int) -> list[Reply]:
        deadline = self.dispatch_deadline_s * max(1.0, rows / DEADLINE_ROWS)
        for attempt in range(MAX_RECOVERIES + 1):
            start = time.monotonic()
            try:
                assert self._transport is not None
                return self._transport.round_trip(msgs, deadline)
            except (ShardTimeout, ShardLost, RayActorError, OSError) as exc:
                detected = time.monotonic() - start
                if attempt == MAX_RECOVERIES:
                    raise ShardFailure(f"expert shards failed {attempt + 1} times: {exc}") from exc
                suspects = getattr(exc, "late", None) or getattr(exc, "lost", None) or []
                reason = "timeout" if isinstance(exc, ShardTimeout) else "lost"
                log.warning("expert dispatch failed (%s); replacing shards", exc)
                self._recover(reason, [self.replica_ids[j] for j in suspects], start, detected)
                deadline *= 2  # a loaded machine is not a dead shard: give the retry more time
        raise AssertionError("unreachable")

    def _recover(self, reason: str, suspects: list[int], start: float, detected: float) -> None:
        """Tears the transport down, replaces the suspects and every other shard that no longer
        answers, rebuilds it. The failed dispatch's messages stay valid: shard indices and slots
        are unchanged."""
        self._close_transport()
        others = [r for r in self.replica_ids if r not in suspects]
        bad = sorted({*suspects, *self.pool.dead(others)})
        for rid in bad:
            self._hook(self.on_replica_dead, rid)
        try:
            started = self.pool.replace(bad)
        except ShardStartError as exc:
            raise ShardFailure(str(exc)) from exc
        for info in started:
            self._hook(self.on_replica_started, info)
        self._transport = self._make_transport()
        self.recoveries.append(Recovery(reason, tuple(bad), detected, time.monotonic() - start))

    def close(self) -> None:
        """Closes the connections, kills the actors, drains the hook thread."""
        self._close_transport()
        self.pool.close()
        self._hooks.shutdown(wait=True)


def _logged(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a registry hook must never take the backend down
        log.exception("expert backend hook %s failed", getattr(fn, "__name__", fn))
