"""The expert-shard actors of one engine: started where Ray finds expert capacity, replaced when
they die or hang.

A shard actor (`workers.expert_shard.ExpertShard` under `ray.remote`) asks Ray for `num_cpus`,
`num_gpus` and one unit of a custom resource (`experts.shard_resource`, default
`moeray_expert_slot`), so Ray places it only on nodes that advertise that resource (on
Kubernetes, the expert worker group; the Ray autoscaler adds such nodes when shards wait for
one). Shards are spread over those nodes (scheduling strategy SPREAD), so losing one node loses
few of them. An engine and its shards may be on different nodes: `ShardInfo.node_id` tells the
transport which connection to open.

`replace(rids)` kills the given actors and starts fresh ones with the same experts (weights
reloaded from the checkpoint): Ray puts them on whatever capacity survives. Nothing here talks
to Redis; the backend reports starts and deaths through its hooks.

Two owners use a pool. The offline engine (workers/llm.py, the CLI) owns its shards: plain
actors that die with it. A served tier's expert controller (cluster/expert_autoscaler.py) owns
the tier's shards for all its engine replicas: `namespace` set, the actors are detached and
named `moeray-shard-{tag}-{rid}-{incarnation}` in that namespace, so they outlive a controller
that crashes, and its successor finds them by name (`adopt`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import ray
from moeray.workers.cpu_tuning import cpu_process_env
from moeray.workers.expert_routing import Assignment
from moeray.workers.expert_shard import ExpertShard
from ray.exceptions import GetTimeoutError, RayActorError

#: Failures of a Ray call that mean the actor (or its node) is gone.
ACTOR_FAILURES: tuple[type[BaseException], ...] = (RayActorError, GetTimeoutError)


class ShardStartError(RuntimeError):
    """Shard actors did not become ready in time (no node with the resources, or loading failed)."""


@dataclass(frozen=True)
class WeightSource:
    """Where shards get their weights: a checkpoint path (real use) or, for synthetic
    benchmarks, an object-store ref to {model layer: (w1 [E, 2F, D], w2 [E, D, F])}."""

    checkpoint: str | None = None
    dtype: str = "auto"
    weights_ref: Any = None


@dataclass(frozen=True)
class ShardResources:
    """What one shard actor asks Ray for. resource: a custom resource name (one unit per shard)
    that only expert nodes advertise; None = any node with the CPUs/GPUs."""

    num_cpus: float = 0.5
    num_gpus: float = 0.0
    resource: str | None = "moeray_expert_slot"

    def actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "scheduling_strategy": "SPREAD",
            # Ray must not revive a shard on its own: the backend replaces it and reconnects.
            "max_restarts": 0,
        }
        if self.resource:
            opts["resources"] = {self.resource: 1}
        # Thread counts and OpenMP's wait policy are set where the process is created; a shard
        # idles between its engine's layers, so its workers must not spin meanwhile.
        threads = max(1, math.floor(self.num_cpus))
        opts["runtime_env"] = {"env_vars": cpu_process_env(threads, waits_on_peers=True)}
        return opts


@dataclass(frozen=True)
class ShardInfo:
    """One running shard actor: replica id, actor name, Ray node id and IP, pid, assignment."""

    rid: int
    name: str
    node_id: str
    node_ip: str
    pid: int
    assignment: Assignment


class ShardPool:
    """The shard actors of one backend, by replica id."""

    def __init__(
        self,
        source: WeightSource,
        resources: ShardResources | None = None,
        tag: str = "",
        start_timeout_s: float = 300.0,
        namespace: str | None = None,
    ) -> None:
        self.source = source
        self.resources = resources or ShardResources()
        self.tag = tag or f"{time.time_ns():x}"
        self.start_timeout_s = start_timeout_s
        self.namespace = namespace  # set: detached named actors, found again by name
        self._cls = ray.remote(ExpertShard)
        self.device = "cuda" if self.resources.num_gpus > 0 else "cpu"
        self.handles: dict[int, Any] = {}
        self.info: dict[int, ShardInfo] = {}
        self._incarnation: dict[int, int] = {}

    @property
    def assignments(self) -> dict[int, Assignment]:
        return {rid: i.assignment for rid, i in self.info.items()}

    def _name(self, rid: int) -> str:
        return f"moeray-shard-{self.tag}-{rid}-{self._incarnation[rid]}"

    def next_name(self, rid: int) -> str:
        """The name the next actor started for `rid` will have (an owner records it first)."""
        return f"moeray-shard-{self.tag}-{rid}-{self._incarnation.get(rid, -1) + 1}"

    def start(self, assignments: dict[int, Assignment]) -> list[ShardInfo]:
        """Creates the actors (loading in parallel), waits until all hold their weights, and
        returns where they run. ShardStartError if they are not ready within start_timeout_s
        (the actors that did not start are killed)."""
        src, options = self.source, self.resources.actor_options()
        if self.namespace is not None:
            options |= {"lifetime": "detached", "namespace": self.namespace}
        for rid, assignment in assignments.items():
            self._incarnation[rid] = self._incarnation.get(rid, -1) + 1
            self.handles[rid] = self._cls.options(  # type: ignore[attr-defined]
                name=self._name(rid), **options
            ).remote(assignment, src.checkpoint, src.dtype, src.weights_ref, self.device)
        rids = list(assignments)
        refs = [self.handles[r].where.remote() for r in rids]
        try:
            where = ray.get(refs, timeout=self.start_timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            for rid in rids:
                self.retire(rid)
            hint = self._start_hint(len(rids)) if isinstance(exc, GetTimeoutError) else str(exc)
            raise ShardStartError(hint) from None
        started = []
        for rid, (node_id, node_ip, pid) in zip(rids, where):
            info = ShardInfo(rid, self._name(rid), node_id, node_ip, pid, assignments[rid])
            self.info[rid] = info
            started.append(info)
        return started

    def adopt(self, rid: int, name: str, timeout_s: float = 10.0) -> ShardInfo | None:
        """Takes over the live detached actor `name` (started by a predecessor) as `rid`; None
        when it is gone or does not answer within timeout_s."""
        try:
            handle = ray.get_actor(name, namespace=self.namespace)
            held: Any = ray.get(handle.ready.remote(), timeout=timeout_s)
            node_id, node_ip, pid = ray.get(handle.where.remote(), timeout=timeout_s)
        except (ValueError, RayActorError, GetTimeoutError):
            return None
        self._incarnation[rid] = int(name.rsplit("-", 1)[1])
        self.handles[rid] = handle
        info = ShardInfo(rid, name, node_id, node_ip, pid, {int(k): v for k, v in held.items()})
        self.info[rid] = info
        return info

    def _start_hint(self, n: int) -> str:
        r = self.resources
        wanted = f"num_cpus={r.num_cpus}, num_gpus={r.num_gpus}"
        if r.resource:
            have = ray.cluster_resources().get(r.resource, 0)
            wanted += f" and 1 {r.resource!r} (experts.shard_resource; the cluster has {have:g})"
        return (
            f"{n} expert shard actor(s) were not ready after {self.start_timeout_s:g} s; each "
            f"asks for {wanted}: add nodes that advertise it, or lower the experts.* requests"
        )

    def retire(self, rid: int) -> None:
        handle = self.handles.pop(rid, None)
        self.info.pop(rid, None)
        if handle is not None:
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(handle, no_restart=True)

    def replace(self, rids: Iterable[int]) -> list[ShardInfo]:
        """Kills these actors (dead, hung or alive) and starts fresh ones with the same experts,
        wherever Ray finds capacity now."""
        assignments = {rid: self.info[rid].assignment for rid in rids}
        for rid in assignments:
            self.retire(rid)
        return self.start(assignments)

    def dead(self, rids: Iterable[int] | None = None, timeout_s: float = 5.0) -> list[int]:
        """Replica ids (of `rids`, default all) whose actor does not answer a plain call within
        timeout_s: dead, on a lost node, or hung."""
        wanted = list(self.handles) if rids is None else list(rids)
        return unanswered({rid: self.handles[rid] for rid in wanted}, timeout_s)

    def close(self) -> None:
        for rid in list(self.handles):
            self.retire(rid)


def unanswered(handles: dict[int, Any], timeout_s: float) -> list[int]:
    """Replica ids of the shard actors (rid -> handle) that do not answer a plain `ready` call
    within timeout_s: dead, on a lost node, or hung."""
    refs = {rid: h.ready.remote() for rid, h in handles.items()}
    if not refs:
        return []
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    out = []
    for rid, ref in refs.items():
        if ref not in ready:
            out.append(rid)
            continue
        try:
            ray.get(ref, timeout=timeout_s)
        except ACTOR_FAILURES:
            out.append(rid)
    return out
