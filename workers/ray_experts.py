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

Who owns the shard actors is a `ShardSource`: `OwnedShards` (this engine starts and kills them:
the offline LLM and the CLI), or the served tier's controller, which owns one set of shards for
all the tier's engine replicas (cluster/expert_parallel.py `TierShards`, reading the controller's
directory in Redis; cluster/expert_autoscaler.py).

The step seam: the engine calls `begin_step()` before each forward and `end_step(expert_counts)`
after it (the step's tokens per (layer, expert), handed to the injected `on_load`). A new
placement (`placement_changed(p)`, from the Redis watcher's thread) is PREPARED on a background
thread: the source resolves (or starts) its shards, the routes and the connections are built.
`begin_step()` only swaps the prepared set in; an engine that is between steps gets it at once.
So no step waits for an actor start, a weight load or a connection. `on_epoch(epoch)` then says
which epoch the engine dispatches on (the controller retires old shards once every engine said
so).

Failure: a dispatch has a deadline (`dispatch_deadline_s` for up to DEADLINE_ROWS tokens, more
for bigger batches). A shard that misses it (hung: e.g. stopped with SIGSTOP) or whose
connection breaks (its actor or node died) is a suspect; with every other shard that no longer
answers it is either left out (each of its experts has a live replica elsewhere: the layer
re-runs at once, and the shard is replaced in the background) or replaced now (a fresh actor
with the same experts on surviving capacity). The same layer then re-runs, so the step's output
is unchanged. Each retry doubles the deadline (a slow machine is not a dead shard).

Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import ray
import torch
from moeray.workers.expert_routing import (
    Assignment,
    LayerRoute,
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
    unanswered,
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
    "OwnedShards",
    "PlacementLike",
    "RayExperts",
    "Recovery",
    "Shard",
    "ShardFailure",
    "ShardResources",
    "ShardSource",
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
class Shard:
    """One shard actor as the backend uses it: its handle and where it runs. info.assignment is
    what the actor HOLDS (model layer -> experts), which may be more than the placement routes
    to it (the controller gives cold replicas back without reloading the shard)."""

    handle: Any
    info: ShardInfo


class ShardSource(Protocol):
    """Who owns the shard actors. Every method may block (actor starts, Ray and Redis calls):
    the backend calls them on its background thread, or in a recovery."""

    def resolve(self, placement: PlacementLike, moe_layers: list[int]) -> dict[int, Shard]:
        """A live Shard for every replica id of `placement` (started when needed)."""
        ...

    def replace(self, shards: list[Shard]) -> dict[int, Shard]:
        """Fresh actors for these (dead or hung) shards, with the same experts."""
        ...

    def release(self, shards: list[Shard]) -> None:
        """These shards are no longer used by this backend."""
        ...

    def close(self) -> None: ...


class OwnedShards:
    """A ShardSource whose actors this backend starts and kills itself (offline engines).
    on_started(ShardInfo) / on_dead(rid) are registry hooks, run on a background thread."""

    def __init__(
        self,
        pool: ShardPool,
        on_started: Callable[[ShardInfo], None] | None = None,
        on_dead: Callable[[int], None] | None = None,
    ) -> None:
        self.pool, self.on_started, self.on_dead = pool, on_started, on_dead
        self._hooks = ThreadPoolExecutor(1, thread_name_prefix="moeray-experts-hooks")

    def _hook(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is not None:
            self._hooks.submit(_logged, fn, *args)

    def _shards(self, rids: Iterable[int]) -> dict[int, Shard]:
        return {r: Shard(self.pool.handles[r], self.pool.info[r]) for r in rids}

    def resolve(self, placement: PlacementLike, moe_layers: list[int]) -> dict[int, Shard]:
        rids = _replica_ids(placement)
        _, assignments = build_routes(placement.mapping, moe_layers, rids)
        changed = {r: a for r, a in assignments.items() if self.pool.assignments.get(r) != a}
        for info in self.pool.start(changed):  # new incarnations; the old ones go in release
            self._hook(self.on_started, info)
        return self._shards(rids)

    def replace(self, shards: list[Shard]) -> dict[int, Shard]:
        rids = [s.info.rid for s in shards]
        for rid in rids:
            self._hook(self.on_dead, rid)
        started = self.pool.replace(rids)
        for info in started:
            self._hook(self.on_started, info)
        return self._shards(rids)

    def release(self, shards: list[Shard]) -> None:
        for s in shards:
            current = self.pool.info.get(s.info.rid)
            if current is not None and current.name == s.info.name:
                self.pool.retire(s.info.rid)  # its replica id left the placement
                self._hook(self.on_dead, s.info.rid)
            else:  # an older incarnation, superseded by a changed assignment
                with contextlib.suppress(Exception):
                    ray.kill(s.handle, no_restart=True)

    def close(self) -> None:
        self.pool.close()
        self._hooks.shutdown(wait=True)


def _replica_ids(placement: PlacementLike) -> list[int]:
    return sorted({int(r) for layer in placement.mapping for reps in layer for r in reps})


def dead_shards(shards: Sequence[Shard], timeout_s: float = 5.0) -> list[int]:
    """Replica ids of the shards whose actor does not answer a plain call within timeout_s."""
    return unanswered({s.info.rid: s.handle for s in shards}, timeout_s)


@dataclass(frozen=True)
class Recovery:
    """One recovery: why, which replicas were replaced (or left out), and how long after the
    dispatch began the failure was detected (tests and logs read it)."""

    reason: str  # "timeout" | "lost"
    replaced: tuple[int, ...]
    detected_after_s: float
    recovered_after_s: float
    left_out: bool = False  # served by other replicas while replaced in the background


@dataclass
class _Active:
    """Everything one dispatch needs, swapped as one value: the placement's routes, the shards
    in dispatch order, the connections to the shards not left out."""

    epoch: int
    mapping: Any
    rids: list[int]
    routes: dict[int, LayerRoute]
    shards: list[Shard]
    excluded: set[int] = field(default_factory=set)  # shard indices left out (dead)
    transport: Transport | None = None
    live: list[int] = field(default_factory=list)  # shard indices the transport connects

    def connect(self, kind: str, here: str) -> _Active:
        self.live = [j for j in range(len(self.shards)) if j not in self.excluded]
        shards = [self.shards[j] for j in self.live]
        self.transport = make_transport(
            kind, [s.handle for s in shards], [s.info.node_id for s in shards], here
        )
        return self

    def round_trip(self, msgs: list[bytes | None], deadline_s: float) -> list[Reply]:
        assert self.transport is not None
        if not self.excluded:
            return self.transport.round_trip(msgs, deadline_s)
        try:
            got = self.transport.round_trip([msgs[j] for j in self.live], deadline_s)
        except ShardTimeout as exc:  # indices in the live list -> shard indices
            raise ShardTimeout([self.live[j] for j in exc.late], deadline_s) from None
        except ShardLost as exc:
            raise ShardLost([self.live[j] for j in exc.lost], exc) from None
        out: list[Reply] = [b""] * len(self.shards)
        for j, reply in zip(self.live, got):
            out[j] = reply
        return out

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class RayExperts:
    """ExpertBackend over expert-shard actors. Build with `RayExperts.start(...)` (owned shards)
    or `RayExperts(source, placement, ...)`; `close()` it.

    Hooks (all optional, injected by cluster/expert_parallel.py):
    - on_load(counts int64 [L_moe, E]): a step's tokens per (MoE layer, expert); must be cheap.
    - on_epoch(epoch): the engine now dispatches on this placement epoch; run on a background
      thread.
    """

    def __init__(
        self,
        source: ShardSource,
        placement: PlacementLike,
        moe_layers: list[int],
        *,
        transport: str = "socket",
        dispatch_deadline_s: float = 0.5,
        on_load: Callable[[np.ndarray], None] | None = None,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if not dispatch_deadline_s > 0:
            raise ValueError(f"dispatch_deadline_s must be > 0, got {dispatch_deadline_s}")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.source = source
        self.moe_layers = list(moe_layers)
        self.transport = transport
        self.dispatch_deadline_s = dispatch_deadline_s
        self.on_load = on_load
        self.on_epoch = on_epoch
        self.recoveries: list[Recovery] = []
        self.swaps = 0
        self.step = 0
        self.here = str(ray.get_runtime_context().get_node_id())
        self._lock = threading.Lock()  # guards _active/_ready/_in_step against the background
        self._in_step = False
        self._ready: _Active | None = None  # prepared on the background thread
        self._wanted = -1  # newest epoch asked for (prepared or being prepared)
        self._background = ThreadPoolExecutor(1, thread_name_prefix="moeray-experts-prepare")
        self._hooks = ThreadPoolExecutor(1, thread_name_prefix="moeray-experts-hooks")
        self._closed = False
        try:
            self._active = self._prepare(placement, excluded=set())
            self._wanted = self._active.epoch
        except BaseException:
            self._background.shutdown(wait=False)
            self._hooks.shutdown(wait=False)
            source.close()
            raise
        self._hook(self.on_epoch, self._active.epoch)

    @classmethod
    def start(
        cls,
        source: WeightSource,
        placement: PlacementLike,
        moe_layers: list[int],
        *,
        resources: ShardResources | None = None,
        on_replica_started: Callable[[ShardInfo], None] | None = None,
        on_replica_dead: Callable[[int], None] | None = None,
        **kwargs: Any,
    ) -> RayExperts:
        """Starts one shard actor per replica id of `placement`, owned by this backend."""
        owned = OwnedShards(ShardPool(source, resources), on_replica_started, on_replica_dead)
        return cls(owned, placement, moe_layers, **kwargs)

    # ---- the seam -----------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Called by the engine before each step's forward: swaps in a prepared placement."""
        self.step += 1
        with self._lock:
            self._in_step = True
            ready, self._ready = self._ready, None
            if ready is not None:
                old, self._active = self._active, ready
        if ready is not None:
            self._swapped(old, ready)

    def end_step(self, expert_counts: torch.Tensor) -> None:
        """Called by the engine after each step's forward with its tokens per (model layer,
        expert), int64 [num_layers, E]; hands the MoE layers' rows to on_load."""
        with self._lock:
            self._in_step = False
        if self.on_load is not None:
            self.on_load(expert_counts[self.moe_layers].cpu().numpy())  # [L_moe, E]
        if self._ready is not None:
            self._background.submit(self._swap_if_idle)

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
        deadline = self.dispatch_deadline_s * max(1.0, T / DEADLINE_ROWS)
        for attempt in range(MAX_RECOVERIES + 1):
            a = self._active
            parts = dispatch_plan(a.routes[layer], ids, self.step, a.excluded)
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
            start = time.monotonic()
            try:
                replies = a.round_trip(msgs, deadline)
            except (ShardTimeout, ShardLost, RayActorError, OSError) as exc:
                detected = time.monotonic() - start
                if attempt == MAX_RECOVERIES:
                    raise ShardFailure(f"expert shards failed {attempt + 1} times: {exc}") from exc
                log.warning("expert dispatch failed (%s); recovering", exc)
                suspects = getattr(exc, "late", None) or getattr(exc, "lost", None) or []
                reason = "timeout" if isinstance(exc, ShardTimeout) else "lost"
                self._recover(a, reason, [a.rids[j] for j in suspects], start, detected)
                deadline *= 2  # a loaded machine is not a dead shard: give the retry more time
                continue
            rows = [np.frombuffer(r, dtype=np.float32).reshape(-1, D) for r in replies]  # [n_s, D]
            out = combine_in_expert_order(ids, parts, rows, D)  # [T, D] f32
            return torch.from_numpy(out).to(device=hidden.device, dtype=hidden.dtype)
        raise AssertionError("unreachable")

    # ---- placement ----------------------------------------------------------------------------
    def placement_changed(self, placement: PlacementLike) -> None:
        """A newer placement exists (called from any thread, never blocks): prepare it in the
        background; the engine swaps it in between steps."""
        with self._lock:
            if placement.epoch <= self._wanted or self._closed:
                return
            self._wanted = placement.epoch
        self._background.submit(self._prepare_and_offer, placement)

    def _prepare(self, placement: PlacementLike, excluded: set[int]) -> _Active:
        """Resolves (or starts) the placement's shards, builds routes and connections."""
        shards = self.source.resolve(placement, self.moe_layers)
        rids = sorted(shards)
        held = {r: s.info.assignment for r, s in shards.items()}
        routes, _ = build_routes(placement.mapping, self.moe_layers, rids, held=held)
        active = _Active(
            placement.epoch, placement.mapping, rids, routes, [shards[r] for r in rids]
        )
        active.excluded = {j for j, r in enumerate(rids) if r in excluded}
        return active.connect(self.transport, self.here)

    def _prepare_and_offer(self, placement: PlacementLike) -> None:
        if placement.epoch < self._wanted or self._closed:
            return  # a newer one was asked for meanwhile
        if placement.mapping == self._active.mapping:  # same layout: nothing to reconnect
            self._active.epoch = placement.epoch
            self._hook(self.on_epoch, placement.epoch)
            return
        try:
            ready = self._prepare(placement, excluded=set())
        except Exception:  # a placement for another model shape, shards that did not start
            log.exception(
                "could not prepare placement epoch %d; keeping the current one", placement.epoch
            )
            return
        self._offer(ready)

    def _offer(self, ready: _Active) -> None:
        with self._lock:
            newest = self._ready.epoch if self._ready is not None else self._active.epoch
            stale: _Active | None = ready
            if ready.epoch >= newest:  # (else a newer placement won meanwhile)
                stale, self._ready = self._ready, ready
        if stale is not None:
            self._hook(stale.close)
        self._swap_if_idle()

    def _swap_if_idle(self) -> None:
        """An engine between steps takes the prepared set now (so it acknowledges new epochs
        even without traffic); a busy one in its next begin_step."""
        with self._lock:
            if self._in_step or self._ready is None:
                return
            ready, self._ready = self._ready, None
            old, self._active = self._active, ready
        self._swapped(old, ready)

    def _swapped(self, old: _Active, new: _Active) -> None:
        self.swaps += 1
        old.close()
        kept = {s.info.name for s in new.shards}
        gone = [s for s in old.shards if s.info.name not in kept]
        if gone:
            self._hook(self.source.release, gone)
        if new.epoch != old.epoch:
            self._hook(self.on_epoch, new.epoch)

    def _hook(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is not None and not self._closed:
            self._hooks.submit(_logged, fn, *args)

    @property
    def epoch(self) -> int:
        return self._active.epoch

    @property
    def routes(self) -> dict[int, LayerRoute]:
        """Model layer -> the routing table of the placement dispatched on now."""
        return self._active.routes

    @property
    def replica_ids(self) -> list[int]:
        return list(self._active.rids)

    @property
    def shards(self) -> list[ShardInfo]:
        """The running shards in dispatch order."""
        return [s.info for s in self._active.shards]

    # ---- failure ------------------------------------------------------------------------------
    def _recover(
        self, a: _Active, reason: str, suspects: list[int], start: float, detected: float
    ) -> None:
        """Tears the connections down and finds every shard that no longer answers. If each of
        their experts has a live replica elsewhere, they are left out now and replaced in the
        background; otherwise they are replaced now. The failed layer's new plan is made by the
        caller from the new active set."""
        a.close()
        others = [
            s for j, s in enumerate(a.shards) if a.rids[j] not in suspects and j not in a.excluded
        ]
        bad = sorted({*suspects, *dead_shards(others)})
        excluded = {a.rids[j] for j in a.excluded} | set(bad)
        if _all_served_elsewhere(a, excluded):
            new = _Active(a.epoch, a.mapping, a.rids, a.routes, a.shards)
            new.excluded = {j for j, r in enumerate(a.rids) if r in excluded}
            self._set_active(new.connect(self.transport, self.here))
            self._background.submit(self._replace_in_background, a, bad)
            left_out = True
        else:
            try:
                fresh = self.source.replace([a.shards[a.rids.index(r)] for r in bad])
            except ShardStartError as exc:
                raise ShardFailure(str(exc)) from exc
            shards = [fresh.get(r, s) for r, s in zip(a.rids, a.shards)]
            keep = {a.rids[j] for j in a.excluded} - set(bad)
            new = _Active(a.epoch, a.mapping, a.rids, a.routes, shards)
            new.excluded = {j for j, r in enumerate(a.rids) if r in keep}
            self._set_active(new.connect(self.transport, self.here))
            left_out = False
        rec = Recovery(reason, tuple(bad), detected, time.monotonic() - start, left_out)
        self.recoveries.append(rec)

    def _set_active(self, new: _Active) -> None:
        with self._lock:
            self._active = new

    def _replace_in_background(self, a: _Active, bad: list[int]) -> None:
        """The left-out shards get fresh actors; the full set is offered for the next step."""
        try:
            self.source.replace([a.shards[a.rids.index(r)] for r in bad])
            placement = _Placement(self._active.epoch, self._active.mapping)
            self._offer(self._prepare(placement, excluded=set()))
        except Exception:
            log.exception("replacing expert shards %s in the background failed", bad)

    def close(self) -> None:
        """Closes the connections, stops the background threads, releases the source."""
        with self._lock:
            self._closed = True
            ready, self._ready = self._ready, None
        self._background.shutdown(wait=True)
        self._hooks.shutdown(wait=True)
        if ready is not None:
            ready.close()
        self._active.close()
        self.source.close()


@dataclass(frozen=True)
class _Placement:
    epoch: int
    mapping: Any


def _all_served_elsewhere(a: _Active, excluded: set[int]) -> bool:
    """True when every expert of every layer keeps a replica outside `excluded`."""
    for route in a.routes.values():
        fixed = route.fixed_owner
        if any(int(s) >= 0 and a.rids[int(s)] in excluded for s in fixed):
            return False
        for _, reps in route.replicated:
            if all(a.rids[j] in excluded for j in reps):
                return False
    return True


def _logged(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a registry hook must never take the backend down
        log.exception("expert backend hook %s failed", getattr(fn, "__name__", fn))
