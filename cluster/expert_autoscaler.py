"""The expert controller of a sharded tier: owns its shard actors and, as the expert autoscaler,
gives hot experts replicas and takes them back from cold ones, while the tier serves.

One `ExpertController` per tier with `experts.shards > 0`, a Serve deployment of one replica
(cluster/app.py binds it into the tier's engine deployment, whose replicas get its handle). Of
all controllers of a tier (a redeploy briefly runs two; Serve restarts one that crashed) ONE is
active: the holder of the Redis lease `lease:{tier}`; another waits for it, and takes over
when its holder stops renewing it.

Ownership (docs/SERVING.md, "expert autoscaling"): the controller owns the tier's shard actors
for ALL the tier's engine replicas. They are detached named actors in the cluster's namespace
(workers/shard_pool.py), recorded in `shards:{tier}` BEFORE they are created, so a successor
finds every actor it may own (`_take_over`), even after the previous controller was killed in
the middle of a plan. Engines only attach (cluster/expert_parallel.py `TierShards`), and call
`replace(rid, name)` when a shard died under them (several engines asking for the same dead
actor get one replacement).

Every tick (at most a second) the active controller:
1. keeps its shards alive: a shard of the placement that does not answer is replaced;
2. retires the shards that left the placement, once EVERY engine replica of the tier has
   acknowledged the current epoch (`acks:{tier}`, written by the engines after they swapped);
3. every `experts.rebalance_interval_s` (mode advisory or active): reads the load windows,
   plans with cluster/placement.py on shard positions (at most `experts.max_shards` shards,
   `slots_per_shard` experts per layer each, min/max replicas per expert), and
   - leaves things as they are unless the plan raises balancedness (cluster/expert_load.py) by
     more than `experts.rebalance_threshold`, and no change happened within
     `experts.rebalance_cooldown_s`;
   - advisory: publishes the plan (`plan:{tier}`, counted in `plans:{tier}`), logs one line;
   - active: starts the shard actors the plan needs (each loads only its experts; the tier's
     engines keep serving meanwhile), then publishes the new placement epoch (compare-and-set
     on the epoch it planned from). Engines prepare the new connections in the background and
     swap between steps (workers/ray_experts.py);
   - active, no rebalance due: an expert that has had more replicas than its load needs for
     `experts.scale_down_idle_s` gives the extra ones back (a new epoch; shards left empty are
     retired by step 2).

A controller killed mid-plan: its successor finds the new shards in the directory but not in
the placement (the plan record still says "starting"): it records the plan as rolled_back and
retires them by step 2. Killed after publishing: step 2 finishes the plan.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from typing import Any

import numpy as np
import redis
from moeray.cluster.config import TierConfig
from moeray.cluster.expert_load import balancedness
from moeray.cluster.expert_parallel import ReplicaRegistry, shard_namespace
from moeray.cluster.placement import (
    bind_replica_ids,
    drop_replicas,
    initial_placement,
    plan_rebalance,
    positional,
    replica_counts,
)
from moeray.cluster.state import ClusterState, EngineRegistry, EpochConflict
from moeray.cluster.state_messages import Placement, PlanRecord
from moeray.workers.shard_pool import ShardPool, ShardResources, ShardStartError, WeightSource

log = logging.getLogger(__name__)

MODES = ("off", "advisory", "active")
#: Seconds between ticks at most (lease, shard health, retirement); planning is rarer.
TICK_S = 1.0
#: The lease outlives a few missed renewals, so a busy controller keeps it.
LEASE_TTL_S = 3.0


def _held_of(assignment: dict[int, list[int]], moe_layers: list[int]) -> list[list[int]]:
    """A shard's assignment (model layer -> experts) -> per MoE layer index its experts."""
    return [sorted(assignment.get(layer, [])) for layer in moe_layers]


class ExpertController:
    """The tier's shard owner and expert autoscaler (see the module docstring).

    tier: the tier's config; registry: where Redis is (as the engines get it). start=False
    leaves the background threads off (tests drive `tick()` themselves)."""

    def __init__(self, tier: TierConfig, registry: EngineRegistry, start: bool = True) -> None:
        from moeray.workers.hf_config import read_model_args

        if tier.experts.shards < 1:
            raise ValueError(f"tiers[{tier.name}].experts.shards must be >= 1 for a controller")
        self.tier, self.x, self.model = tier, tier.experts, tier.name
        args = read_model_args(tier.model, tier.dtype)
        self.moe_layers, self.E = list(args.moe_layers), args.num_experts
        self.L = len(self.moe_layers)
        self.state: ClusterState = registry.cluster_state()
        x = self.x
        self.pool = ShardPool(
            WeightSource(checkpoint=tier.model, dtype=tier.dtype),
            ShardResources(x.shard_num_cpus, x.shard_num_gpus, x.shard_resource),
            tag=tier.name,
            namespace=shard_namespace(registry.cluster),
        )
        self.registry = ReplicaRegistry(self.state, self.model, self.moe_layers)
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.mode: str = x.autoscale
        self.leader = False
        self.placement: Placement | None = None
        self.held: dict[int, list[list[int]]] = {}  # replica id -> per MoE layer experts held
        self.last_change = -math.inf  # monotonic time of the last published change
        self.last_plan = -math.inf
        self.over_since: dict[tuple[int, int], float] = {}  # (layer, expert) -> since when
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._closed = False
        if start:
            for target, name in ((self._loop, "tick"), (self._lease_loop, "lease")):
                t = threading.Thread(target=target, name=f"moeray-experts-{name}", daemon=True)
                t.start()
                self._threads.append(t)

    # ---- the Serve-facing methods ----------------------------------------------------------
    def replace(self, rid: int, name: str) -> str:
        """An engine's request: the actor `name` of replica `rid` died under it. Starts a fresh
        one unless that already happened; returns the current actor name of `rid`."""
        deadline = time.monotonic() + 60.0
        while not self.leader:  # a new controller takes over within the lease's TTL
            if time.monotonic() > deadline or self._stop.is_set():
                raise RuntimeError(f"the expert controller of {self.model!r} is not active")
            time.sleep(0.2)
        with self._lock:
            current = self.pool.info.get(rid)
            if current is not None and current.name != name:
                return current.name  # replaced already (another engine asked first)
            if rid in self.pool.handles or (self.placement and rid in self._rids()):
                self._restart([rid])
            current = self.pool.info.get(rid)
            return current.name if current is not None else ""

    def set_mode(self, mode: str) -> str:
        """Changes the mode of this controller (off | advisory | active) until it restarts."""
        if mode not in MODES:
            raise ValueError(f"experts.autoscale must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.last_plan = -math.inf  # plan at the next tick
        return mode

    def status(self) -> dict[str, Any]:
        """owner, leader, mode, epoch, shards (replica id -> actor name)."""
        p = self.placement
        return {
            "owner": self.owner, "leader": self.leader, "mode": self.mode,
            "epoch": p.epoch if p else 0,
            "shards": {r: i.name for r, i in sorted(self.pool.info.items())},
        }  # fmt: skip

    def check_health(self) -> None:
        """Serve's health check: the controller's threads must be running."""
        if any(not t.is_alive() for t in self._threads):
            raise RuntimeError(f"the expert controller of {self.model!r} has stopped")

    # ---- the loops -------------------------------------------------------------------------
    def _loop(self) -> None:
        tick_s = min(TICK_S, self.x.rebalance_interval_s)
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # Redis away, Ray hiccup: the next tick tries again
                log.exception("expert controller of %s: tick failed", self.model)
            self._stop.wait(tick_s)

    def _lease_loop(self) -> None:
        while not self._stop.wait(LEASE_TTL_S / 3):
            if not self.leader:
                continue
            try:
                held = self.state.renew_lease(self.model, self.owner, LEASE_TTL_S)
            except (redis.RedisError, OSError):
                held = False
            if not held:
                log.warning("expert controller of %s lost its lease", self.model)
                self.leader = False

    def tick(self) -> None:
        """One round: lease, take-over, shard health, retirement, and a plan when due."""
        if not self.leader:
            if not self.state.acquire_lease(self.model, self.owner, LEASE_TTL_S):
                return  # another controller is active: wait
            self.leader = True  # (the lease thread renews it while the shards start)
            try:
                with self._lock:
                    self._take_over()
            except BaseException:
                self.leader = False
                self.state.release_lease(self.model, self.owner)
                raise
        with self._lock:
            self._repair()
            self._retire()
        if self.mode != "off" and time.monotonic() - self.last_plan >= self.x.rebalance_interval_s:
            self.last_plan = time.monotonic()
            self.plan_once()

    # ---- ownership -------------------------------------------------------------------------
    def _rids(self) -> list[int]:
        assert self.placement is not None
        return self.placement.replica_ids()

    def _take_over(self) -> None:
        """Adopts the live shards of the directory, finds the placement (or publishes the first
        one, starting its shards), and notes a predecessor's unfinished plan."""
        for rid, name in self.state.shard_directory(self.model).items():
            info = self.pool.adopt(rid, name)
            if info is None:
                self.state.remove_shard(self.model, rid)
                continue
            self.held[rid] = _held_of(info.assignment, self.moe_layers)
            self.registry.started(info)
        placement = self.state.read_placement(self.model)
        if placement is None:
            x = self.x
            first = initial_placement(self.L, self.E, x.shards, x.replicas)
            self._start({r: first.experts_of(r) for r in first.replica_ids()})
            try:
                placement = self.state.publish_placement(self.model, first, expected_epoch=0)
            except EpochConflict:
                placement = self.state.read_placement(self.model)
                assert placement is not None
        self.placement = placement
        last = self.state.read_plan(self.model)
        if last is not None and last.outcome == "starting":
            self._record(
                last.mode, "rolled_back", last.balancedness_before, last.balancedness_after,
                last.placement, detail="its controller stopped before publishing it",
            )  # fmt: skip
        log.info(
            "expert controller %s of %s is active at epoch %d with shards %s",
            self.owner, self.model, placement.epoch, sorted(self.pool.handles),
        )  # fmt: skip

    def _start(self, wanted: dict[int, dict[int, list[int]]]) -> None:
        """Starts shards: wanted[rid][MoE layer index] -> experts. Recorded in the directory
        first; killed again (and forgotten) when they do not start."""
        assignments = {
            rid: {self.moe_layers[li]: es for li, es in layers.items() if es}
            for rid, layers in wanted.items()
        }
        for rid in assignments:
            self.state.set_shard(self.model, rid, self.pool.next_name(rid))
        try:
            started = self.pool.start(assignments)
        except ShardStartError:
            for rid in assignments:
                self.state.remove_shard(self.model, rid)
            raise
        for info in started:
            self.held[info.rid] = _held_of(info.assignment, self.moe_layers)
            self.registry.started(info)

    def _restart(self, rids: list[int]) -> None:
        """Fresh actors for these replica ids, holding the same experts."""
        for rid in rids:
            self.registry.dead(rid)
            self.pool.retire(rid)
        wanted = {r: dict(enumerate(self.held[r])) for r in rids}
        self._start(wanted)

    def _repair(self) -> None:
        """Replaces the placement's shards that do not answer (dead, on a lost node)."""
        rids = self._rids()
        missing = [r for r in rids if r not in self.pool.handles]
        dead = self.pool.dead([r for r in rids if r in self.pool.handles], timeout_s=2.0)
        if missing or dead:
            log.warning("expert controller of %s: restarting shards %s", self.model, missing + dead)
            for rid in missing:
                if rid not in self.held:  # never seen: rebuild what it held from the placement
                    assert self.placement is not None
                    held = self.placement.experts_of(rid)
                    self.held[rid] = [held.get(li, []) for li in range(self.L)]
            self._restart(missing + dead)
        directory = self.state.shard_directory(self.model)
        for rid, info in self.pool.info.items():  # after a Redis restart: write it again
            if directory.get(rid) != info.name:
                self.state.set_shard(self.model, rid, info.name)

    def _retire(self) -> None:
        """Kills the shards outside the placement once every engine replica dispatches on it."""
        assert self.placement is not None
        keep = set(self._rids())
        old = sorted(r for r in self.pool.handles if r not in keep)
        if not old:
            return
        engines = {e.replica_id for e in self.state.engine_endpoints(self.model)}
        acks = self.state.read_acks(self.model)
        waiting = sorted(e for e in engines if acks.get(e, -1) < self.placement.epoch)
        if waiting:
            return
        for rid in old:
            self.pool.retire(rid)
            self.registry.dead(rid)
            self.state.remove_shard(self.model, rid)
            self.held.pop(rid, None)
        log.info("expert controller of %s retired shards %s", self.model, old)

    # ---- planning --------------------------------------------------------------------------
    def _load(self) -> np.ndarray:
        st = self.state
        windows = math.ceil(self.x.rebalance_interval_s / st.load_window_s)
        return st.read_load(
            self.model, self.L, self.E, num_windows=max(1, min(windows, st.load_windows_kept))
        )

    def plan_once(self) -> PlanRecord | None:
        """Reads the load, plans, and (by mode) publishes the advice or applies the plan."""
        with self._lock:
            cur = self.placement
            assert cur is not None
            held = {r: [list(es) for es in h] for r, h in self.held.items()}
        x, now = self.x, time.monotonic()
        loads = self._load()
        pos, rids = positional(cur)
        S = max(x.max_shards or x.shards, len(rids))
        slots = x.slots_per_shard or self.E
        planned = plan_rebalance(loads, pos, S, slots, x.min_replicas, x.max_replicas)
        before, after = balancedness(loads, cur), balancedness(loads, planned)
        if planned.same_layout(pos) or after - before <= x.rebalance_threshold:
            if self.mode == "active":
                self._scale_down(loads, cur, pos, S, slots, now)
            return self._record(self.mode, "below_threshold", before, after, planned)
        if now - self.last_change < x.rebalance_cooldown_s:
            return self._record(self.mode, "cooldown", before, after, planned)
        if self.mode == "advisory":
            log.info(
                "expert autoscaler of %s (advisory): a new placement would raise balancedness "
                "%.3f -> %.3f (replicas per expert %s); nothing changed",
                self.model, before, after, _replica_summary(planned),
            )  # fmt: skip
            return self._record("advisory", "advised", before, after, planned)
        return self._apply(cur, planned, rids, held, before, after)

    def _apply(
        self, cur: Placement, planned: Placement, rids: list[int],
        held: dict[int, list[list[int]]], before: float, after: float,
    ) -> PlanRecord:  # fmt: skip
        """Starts the plan's new shards (the engines keep serving), then publishes it."""
        next_id = max([*self.held, *self.state.shard_directory(self.model), *rids]) + 1
        target, new = bind_replica_ids(planned, rids, held, next_id)
        self._record("active", "starting", before, after, planned)
        try:
            self._start({rid: dict(enumerate(layers)) for rid, layers in new.items()})
        except ShardStartError as exc:
            log.warning("expert autoscaler of %s: new shards did not start: %s", self.model, exc)
            return self._record("active", "failed", before, after, planned, detail=str(exc))
        with self._lock:
            if not self.leader:  # lost the lease meanwhile: the successor retires them
                return self._record("active", "rolled_back", before, after, planned)
            try:
                published = self.state.publish_placement(self.model, target, cur.epoch)
            except EpochConflict as exc:
                return self._record("active", "rolled_back", before, after, planned, str(exc))
            self.placement, self.last_change = published, time.monotonic()
        log.info(
            "expert autoscaler of %s: epoch %d -> %d, balancedness %.3f -> %.3f, new shards %s",
            self.model, cur.epoch, published.epoch, before, after, sorted(new),
        )  # fmt: skip
        return self._record("active", "applied", before, after, planned, to_epoch=published.epoch)

    def _scale_down(
        self, loads: np.ndarray, cur: Placement, pos: Placement, S: int, slots: int, now: float
    ) -> None:
        """Gives back replicas that the load has not needed for scale_down_idle_s."""
        x = self.x
        need = replica_counts(loads, pos, S, slots, x.min_replicas, x.max_replicas)
        need = np.maximum(need, min(x.min_replicas, S))
        have = np.array([[len(reps) for reps in layer] for layer in cur.mapping])
        over = {(int(li), int(e)) for li, e in zip(*np.nonzero(have > need))}
        self.over_since = {k: self.over_since.get(k, now) for k in over}
        cold = [k for k, t in self.over_since.items() if now - t >= x.scale_down_idle_s]
        if not cold or now - self.last_change < x.rebalance_cooldown_s:
            return
        keep = have.copy()
        for li, e in cold:
            keep[li, e] = need[li, e]
        target = drop_replicas(cur, keep)
        before, after = balancedness(loads, cur), balancedness(loads, target)
        with self._lock:
            try:
                published = self.state.publish_placement(self.model, target, cur.epoch)
            except EpochConflict:
                return
            self.placement, self.last_change = published, time.monotonic()
            self.over_since = {}
        log.info(
            "expert autoscaler of %s: epoch %d -> %d gives back cold replicas of %s",
            self.model, cur.epoch, published.epoch, sorted(cold),
        )  # fmt: skip
        self._record("active", "scaled_down", before, after, positional(target)[0],
                     to_epoch=published.epoch)  # fmt: skip

    def _record(
        self, mode: str, outcome: str, before: float, after: float, planned: Placement,
        detail: str = "", to_epoch: int = 0,
    ) -> PlanRecord:  # fmt: skip
        cur = self.placement
        record = PlanRecord(
            self.model, mode, outcome, cur.epoch if cur else 0, to_epoch, round(before, 6),
            round(after, 6), planned, int(time.time() * 1000), detail,
        )  # fmt: skip
        try:
            self.state.write_plan(record)
        except (redis.RedisError, OSError) as exc:
            log.warning("could not publish the expert plan of %s: %s", self.model, exc)
        return record

    # ---- shutdown --------------------------------------------------------------------------
    def close(self, kill_shards: bool = True) -> None:
        """Stops the threads; the active controller also stops its shards (kill_shards) and
        gives its lease back. A controller that crashes keeps its shards alive instead: its
        successor adopts them."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            if self.leader and kill_shards:
                for rid in list(self.pool.handles):
                    self.pool.retire(rid)
                    self.state.remove_shard(self.model, rid)
            self.registry.close()
            with contextlib.suppress(redis.RedisError, OSError):
                self.state.release_lease(self.model, self.owner)
            self.leader = False
        self.state.close()

    def __del__(self) -> None:
        """Serve calls this when it removes the replica (app deleted or redeployed)."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.close()


def _replica_summary(p: Placement) -> str:
    """'expert:replicas' of the experts with more than one replica, per layer."""
    return "; ".join(
        f"L{li} " + (" ".join(f"{e}x{len(r)}" for e, r in enumerate(layer) if len(r) > 1) or "-")
        for li, layer in enumerate(p.mapping)
    )


def controller_deployment_name(tier: str) -> str:
    return f"experts-{tier}"
