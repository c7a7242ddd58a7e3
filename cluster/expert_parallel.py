"""Expert parallelism wiring: turns a finished in-process model into one served by shard actors.

`apply_expert_parallel(model, checkpoint, experts_config, state)` is the transform (gpt-fast's
`apply_tp`, for experts): it publishes an initial placement in Redis, starts the expert-shard
actors (each loading only its experts from the checkpoint) and swaps the model's backend to a
`workers.ray_experts.RayExperts`. The Redis-facing parts are built here and injected into the
backend as plain callables, so workers/ never imports the state module:

- placement: a `PlacementWatcher` caches the latest placement; the backend reads its attribute
  once per step (never blocking) and swaps epochs between steps;
- load: every step the engine hands its expert counts to the backend (`end_step`), which passes
  them to a `LoadReporter` (a local numpy add); its thread pushes them every
  `load_push_every_steps` steps;
- registry: each shard is registered with a `Heartbeater` (its node IP and Ray node id); a dead
  shard is removed and its replacement registered, from the backend's hook thread.

Redis unreachable -> the backend keeps serving on its cached placement; the helpers reconnect.

Who owns the shard actors:
- offline (`apply_expert_parallel`, `ExpertParallelRuntime.start(...)` for the LLM and the CLI):
  the engine itself (`OwnedShards`); `ExpertParallelRuntime` adds a local Ray instance
  (advertising the expert resource) and a private redis-server when no URL is given, both
  stopped by `close()` if it started them;
- served (`serve_expert_parallel(model, tier, registry, controller, engine_id)`, from
  workers/engine_deployment.py): the tier's expert controller (cluster/expert_autoscaler.py)
  owns ONE set of shards for all the tier's engine replicas. An engine replica only attaches
  (`TierShards`: actor names from the controller's directory in Redis, `ray.get_actor`), asks
  the controller to replace a shard that died, and acknowledges every placement epoch it
  dispatches on (`acks:{tier}`), so the controller retires old shards only when no engine
  replica uses them. The model name in Redis is the tier's name.

`local_expert_resources` is what a local Ray instance must advertise for a config's shards
(cluster/app.py LocalStack).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
import redis
from moeray.cluster.config import ExpertsConfig, MoerayConfig, StateConfig, TierConfig
from moeray.cluster.placement import initial_placement
from moeray.cluster.redis_server import RedisServer
from moeray.cluster.state import (
    ClusterState,
    EngineRegistry,
    Heartbeater,
    LoadReporter,
    PlacementWatcher,
)
from moeray.cluster.state_messages import Placement, ReplicaInfo
from moeray.workers.ray_experts import (
    RayExperts,
    Shard,
    ShardResources,
    ShardStartError,
    WeightSource,
)
from moeray.workers.shard_pool import ACTOR_FAILURES, ShardInfo

log = logging.getLogger(__name__)

RAY_LOCAL_CPUS = 8  # logical CPUs of a local Ray instance: shards reserve 0.5 each by default


def local_expert_resources(experts: list[ExpertsConfig]) -> dict[str, float]:
    """The custom resources a single-node Ray instance must advertise so that these experts'
    shards (and replacements, and a rebalance's extra replicas) fit: 4 units per shard."""
    out: dict[str, float] = {}
    for x in experts:
        if x.shards and x.shard_resource:
            out[x.shard_resource] = out.get(x.shard_resource, 0.0) + 4.0 * x.shards
    return out


def config_expert_resources(config: MoerayConfig) -> dict[str, float]:
    """local_expert_resources of every tier of a config."""
    return local_expert_resources([t.experts for t in config.tiers])


class ReplicaRegistry:
    """Keeps this engine's shard replicas registered in Redis (one Heartbeater each).

    Called from the backend's hook thread; Redis errors are logged, never raised."""

    def __init__(self, state: ClusterState, model: str, moe_layers: list[int]) -> None:
        self.state, self.model = state, model
        self.moe_index = {layer: li for li, layer in enumerate(moe_layers)}
        self._beats: dict[int, Heartbeater] = {}
        self._lock = threading.Lock()

    def started(self, shard: ShardInfo) -> None:
        rid = shard.rid
        experts = tuple(
            (self.moe_index[layer], e) for layer, es in shard.assignment.items() for e in es
        )
        info = ReplicaInfo(
            rid, shard.name, node=shard.node_ip, node_id=shard.node_id, experts=experts
        )
        beat = Heartbeater(self.state, self.model, info)
        with self._lock:
            old = self._beats.pop(rid, None)
            self._beats[rid] = beat
        if old is not None:
            old.close()
        beat.start()
        beat.set_state("ready")

    def dead(self, rid: int) -> None:
        with self._lock:
            beat = self._beats.pop(rid, None)
        if beat is not None:
            beat.close()
        try:
            self.state.remove_replica(self.model, rid)
        except (redis.RedisError, OSError) as exc:  # it expires with its TTL anyway
            log.warning("could not remove replica %d from Redis: %s", rid, exc)

    def close(self) -> None:
        with self._lock:
            beats, self._beats = list(self._beats.items()), {}
        for rid, beat in beats:
            beat.close()
            with contextlib.suppress(redis.RedisError, OSError):
                self.state.remove_replica(self.model, rid)


@dataclass
class ExpertParallel:
    """What `apply_expert_parallel` started; `close()` stops it (not Ray, not Redis)."""

    backend: RayExperts
    watcher: PlacementWatcher | None = None
    reporter: LoadReporter | None = None
    registry: ReplicaRegistry | None = None
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.backend.close()  # drains the hook thread before the registry goes
        for helper in (self.watcher, self.reporter, self.registry):
            if helper is not None:
                helper.close()


def _publish_initial(state: ClusterState, model: str, placement: Placement) -> Placement:
    try:
        return state.publish_placement(model, placement)
    except (redis.RedisError, OSError) as exc:  # serve anyway; the watcher republishes later
        log.warning("Redis unreachable at start (%s); serving on the initial placement", exc)
        return placement


def _state_hooks(reporter: LoadReporter, registry: ReplicaRegistry) -> dict[str, Any]:
    """The backend's hooks onto the Redis helpers; none of them makes a network call inline."""
    return {
        "on_load": reporter.add,  # [L_moe, E], a local add
        "on_replica_started": registry.started,
        "on_replica_dead": registry.dead,
    }


def _watch(watcher: PlacementWatcher | None, backend: RayExperts) -> None:
    """New epochs go to the backend (prepared off the step); one published before the hook was
    set is handed over now."""
    if watcher is None:
        return
    watcher.on_change = backend.placement_changed
    watcher.start()
    if watcher.placement is not None and watcher.placement.epoch > backend.epoch:
        backend.placement_changed(watcher.placement)


def apply_expert_parallel(
    model: Any,
    checkpoint: str,
    config: ExpertsConfig,
    state: ClusterState | None = None,
    *,
    model_name: str = "default",
    dtype: str = "auto",
    load_push_every_steps: int = 16,
    transport: str | None = None,
) -> ExpertParallel:
    """Serves `model`'s routed experts from `config.shards` Ray actors (Ray must be initialised).

    With a ClusterState, the placement is published and watched, loads are reported and the
    replicas registered; without one, the placement is fixed. `transport` overrides the
    config's choice (compiled_graph=True: "auto", i.e. sockets on one node, a compiled graph
    across nodes; False: "plain"). Returns the handle to close."""
    if config.shards < 1:
        raise ValueError("experts.shards must be >= 1 to apply expert parallelism")
    a = model.args
    if not a.moe_layers:
        raise ValueError(f"model {checkpoint} has no MoE layers: experts.shards must be 0")
    placement = initial_placement(len(a.moe_layers), a.num_experts, config.shards, config.replicas)
    watcher = reporter = registry = None
    hooks: dict[str, Any] = {}
    if state is not None:
        placement = _publish_initial(state, model_name, placement)
        watcher = PlacementWatcher(state, model_name, initial=placement)
        reporter = LoadReporter(
            state, model_name, len(a.moe_layers), a.num_experts,
            push_every_steps=load_push_every_steps,
        )  # fmt: skip
        registry = ReplicaRegistry(state, model_name, a.moe_layers)
        hooks = _state_hooks(reporter, registry)
    try:
        backend = RayExperts.start(
            WeightSource(checkpoint=str(checkpoint), dtype=dtype),
            placement,
            list(a.moe_layers),
            resources=ShardResources(
                config.shard_num_cpus, config.shard_num_gpus, config.shard_resource
            ),
            transport=transport or config.transport,
            dispatch_deadline_s=config.dispatch_deadline_s,
            **hooks,
        )
    except BaseException:
        for helper in (watcher, reporter, registry):
            if helper is not None:
                helper.close()
        raise
    ep = ExpertParallel(backend, watcher, reporter, registry)
    if reporter is not None:
        reporter.start()
    _watch(watcher, backend)
    model.set_expert_backend(ep.backend)
    return ep


def shard_namespace(cluster: str) -> str:
    """The Ray namespace of a cluster's controller-owned (detached, named) shard actors."""
    return f"moeray-{cluster}"


#: How long an engine replica waits for its tier's controller: the first placement at start,
#: a replacement shard when one died.
CONTROLLER_WAIT_S = 600.0


class TierShards:
    """A served engine replica's view of its tier's shards, which the tier's controller owns
    (a `workers.ray_experts.ShardSource`). Blocking calls only: the backend runs them on its
    background thread, or in a recovery.

    controller: a handle on the tier's ExpertController deployment (`replace(rid, name)`)."""

    def __init__(self, state: ClusterState, model: str, namespace: str, controller: Any) -> None:
        self.state, self.model, self.namespace = state, model, namespace
        self.controller = controller
        self._known: dict[str, Shard] = {}  # actor name -> its Shard

    def _shard(self, rid: int, name: str) -> Shard:
        shard = self._known.get(name)
        if shard is None:
            handle = ray.get_actor(name, namespace=self.namespace)
            held: Any = ray.get(handle.ready.remote(), timeout=60)
            node_id, node_ip, pid = ray.get(handle.where.remote(), timeout=60)
            assignment = {int(k): list(v) for k, v in held.items()}
            info = ShardInfo(rid, name, node_id, node_ip, pid, assignment)
            shard = self._known[name] = Shard(handle, info)
        return shard

    def resolve(self, placement: Any, moe_layers: list[int]) -> dict[int, Shard]:
        rids = sorted({int(r) for layer in placement.mapping for reps in layer for r in reps})
        deadline = time.monotonic() + CONTROLLER_WAIT_S
        while True:
            try:
                names = self.state.shard_directory(self.model)
                return {r: self._shard(r, names[r]) for r in rids}
            except (KeyError, ValueError, redis.RedisError, OSError, *ACTOR_FAILURES) as exc:  # type: ignore[misc]
                # not recorded yet, replaced since, or Redis away: look again
                if time.monotonic() > deadline:
                    raise ShardStartError(
                        f"the shards of placement epoch {placement.epoch} of tier {self.model!r} "
                        f"are not all up after {CONTROLLER_WAIT_S:g} s: {exc}"
                    ) from exc
                self._known.clear()
                time.sleep(0.5)

    def replace(self, shards: list[Shard]) -> dict[int, Shard]:
        """Asks the controller for fresh actors (it deduplicates the requests of several
        engines for the same dead actor), retrying while it restarts, then resolves them."""
        deadline = time.monotonic() + CONTROLLER_WAIT_S
        for s in shards:
            self._known.pop(s.info.name, None)
            while True:
                try:
                    self.controller.replace.remote(s.info.rid, s.info.name).result(
                        timeout_s=CONTROLLER_WAIT_S
                    )
                    break
                except Exception as exc:  # the controller restarting: Serve brings it back
                    if time.monotonic() > deadline:
                        raise ShardStartError(f"the controller did not replace: {exc}") from exc
                    log.warning("asking the expert controller to replace a shard: %s", exc)
                    time.sleep(1.0)
        rids = sorted(s.info.rid for s in shards)
        return self.resolve(_Rids(rids), [])

    def release(self, shards: list[Shard]) -> None:
        for s in shards:  # the controller retires them once every engine acknowledged
            self._known.pop(s.info.name, None)

    def close(self) -> None:
        self._known.clear()


@dataclass(frozen=True)
class _Rids:
    """A one-layer 'placement' listing replica ids, for TierShards.resolve."""

    rids: list[int]
    epoch: int = 0

    @property
    def mapping(self) -> list[list[list[int]]]:
        return [[self.rids]]


@dataclass
class ServedExperts:
    """A served tier's expert parallelism (what serve_expert_parallel started): close() stops
    the shards and the Redis helpers, then the ClusterState."""

    ep: ExpertParallel
    state: ClusterState
    model: str = ""
    engine_id: str = ""

    def close(self) -> None:
        self.ep.close()
        if self.engine_id:  # this engine no longer holds the controller's retirements back
            with contextlib.suppress(redis.RedisError, OSError):
                self.state.remove_ack(self.model, self.engine_id)
        self.state.close()


def serve_expert_parallel(
    model: Any, tier: TierConfig, registry: EngineRegistry, controller: Any, engine_id: str
) -> ServedExperts:
    """Attaches the engine replica `engine_id` of a served tier with experts.shards > 0 to the
    shards its tier's controller owns: waits for the controller's first placement, connects,
    reports load, acknowledges epochs. Redis from the registry the replica announces itself in;
    the tier's name is the model name of its placement, load and replicas."""
    state = registry.cluster_state()
    name, a = tier.name, model.args
    watcher = reporter = None
    try:
        placement = _first_placement(state, name)
        watcher = PlacementWatcher(state, name, initial=placement)
        reporter = LoadReporter(
            state, name, len(a.moe_layers), a.num_experts,
            push_every_steps=registry.load_push_every_steps,
        )  # fmt: skip
        x = tier.experts
        backend = RayExperts(
            TierShards(state, name, shard_namespace(registry.cluster), controller),
            placement, list(a.moe_layers), transport=x.transport,
            dispatch_deadline_s=x.dispatch_deadline_s, on_load=reporter.add,
            on_epoch=lambda epoch: state.ack_epoch(name, engine_id, epoch),
        )  # fmt: skip
    except BaseException:
        for helper in (watcher, reporter):
            if helper is not None:
                helper.close()
        state.close()
        raise
    ep = ExpertParallel(backend, watcher, reporter)
    reporter.start()
    _watch(watcher, backend)
    model.set_expert_backend(backend)
    return ServedExperts(ep, state, name, engine_id)


def _first_placement(state: ClusterState, model: str) -> Placement:
    """The tier's placement, once its controller has published one (it starts the shards
    first); waits up to CONTROLLER_WAIT_S, riding out Redis errors."""
    deadline = time.monotonic() + CONTROLLER_WAIT_S
    while time.monotonic() < deadline:
        try:
            placement = state.read_placement(model)
            if placement is not None:
                return placement
        except (redis.RedisError, OSError) as exc:
            log.warning("waiting for the expert placement of %s: %s", model, exc)
        time.sleep(0.5)
    raise TimeoutError(
        f"the expert controller of tier {model!r} published no placement within "
        f"{CONTROLLER_WAIT_S:g} s (is it running? see its log)"
    )


class ExpertParallelRuntime:
    """apply_expert_parallel plus a local Ray instance and a private redis-server when needed.

    `ExpertParallelRuntime.start(model, checkpoint, experts, state_config)`; `close()` undoes it
    all, stopping Ray and Redis only if this runtime started them."""

    def __init__(self) -> None:
        self.started_ray = False
        self.redis_server: RedisServer | None = None
        self.state: ClusterState | None = None
        self.ep: ExpertParallel | None = None

    @classmethod
    def start(
        cls,
        model: Any,
        checkpoint: str,
        experts: ExpertsConfig,
        state_config: StateConfig | None = None,
        *,
        model_name: str = "default",
        dtype: str = "auto",
    ) -> ExpertParallelRuntime:
        rt = cls()
        try:
            state_config = state_config or StateConfig()
            if not ray.is_initialized():
                ray.init(
                    address="local", num_cpus=RAY_LOCAL_CPUS, resources=local_expert_resources([experts]),
                    include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                )  # fmt: skip
                rt.started_ray = True
            url = state_config.redis_url
            if url is None:
                rt.redis_server = RedisServer().start()
                url = rt.redis_server.url
            rt.state = ClusterState.from_config(state_config, url)
            rt.ep = apply_expert_parallel(
                model, checkpoint, experts, rt.state, model_name=model_name, dtype=dtype,
                load_push_every_steps=state_config.load_push_every_steps,
            )  # fmt: skip
        except BaseException:
            rt.close()
            raise
        return rt

    @property
    def backend(self) -> RayExperts:
        assert self.ep is not None
        return self.ep.backend

    def close(self) -> None:
        if self.ep is not None:
            self.ep.close()
            self.ep = None
        if self.state is not None:
            self.state.close()
            self.state = None
        if self.redis_server is not None:
            self.redis_server.stop()
            self.redis_server = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False
