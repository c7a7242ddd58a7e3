"""One tier's engine replica: AsyncLLMEngine behind the internal engine service, as a Serve deployment.

cluster/app.py wraps `EngineServer` with `serve.deployment(...)` once per tier. Serve runs the
replica (placement, restarts, health checks); the data path is workers/engine_service.py: the
replica serves Generate and Stats over ZeroMQ on its node's IP and keeps that endpoint (address and
token) registered in Redis through the registry it is given, where router replicas find it. No
Serve handle carries request data.

Scaling: Serve sizes the deployment (cluster/autoscaling.py); every replica reports its waiting
requests, KV use and TTFT p90 (`record_autoscaling_stats`). A replica Serve removes drains
first (`__del__`): it leaves Redis, refuses new calls with UNAVAILABLE (the router retries them on
another replica, since they had not started), and finishes its open streams before it stops.
"""

from __future__ import annotations

import gc
import logging
import os
import secrets
import socket
import time
from typing import Any, Protocol

from moeray.cluster.config import TierConfig
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.engine import LLMEngine
from moeray.workers.engine_service import EngineService
from moeray.workers.io_struct import EngineStats

log = logging.getLogger(__name__)


class EndpointRegistry(Protocol):
    """cluster.state.EngineRegistry, seen from here: announce() returns something to close()."""

    def announce(
        self, tier: str, replica_id: str, address: str, token: str, max_prompt_bytes: int
    ) -> Any: ...


def _node_ip() -> str:
    """The IP other nodes reach this replica on (Ray's view); loopback outside Ray."""
    import ray

    return str(ray.util.get_node_ip_address()) if ray.is_initialized() else "127.0.0.1"


def _replica_id() -> str:
    """Serve's replica id inside a replica; the pid elsewhere (tests constructing it directly)."""
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RuntimeError:  # not inside a Serve replica
        return f"pid-{os.getpid()}"


def _expert_parallel(
    engine: LLMEngine, tier: TierConfig, registry: Any, controller: Any, replica_id: str
) -> Any:
    """With tier.experts.shards > 0, serves the finished model's routed experts from the shard
    actors its tier's controller owns (cluster/expert_parallel.py) and returns what to close;
    None otherwise. Imported lazily: the engine replica is the composition root of its experts,
    as workers/llm.py is offline."""
    if not tier.experts.shards:
        return None
    from moeray.cluster.expert_parallel import serve_expert_parallel

    return serve_expert_parallel(engine.model, tier, registry, controller, replica_id)


class EngineServer:
    """The engine of one tier. Construct with the tier's config (the checkpoint must be local),
    the registry its endpoint is announced in and, for a sharded tier, a handle on the tier's
    expert controller (which owns the shards)."""

    def __init__(
        self, tier: TierConfig, registry: EndpointRegistry, experts_controller: Any = None
    ) -> None:
        self.tier = tier
        self.replica_id = _replica_id()
        self._experts: Any = None

        def build() -> LLMEngine:  # on the engine's own thread (see AsyncLLMEngine)
            engine = LLMEngine(tier.model, tier.engine, dtype=tier.dtype, device=tier.device)
            self._experts = _expert_parallel(
                engine, tier, registry, experts_controller, self.replica_id
            )
            return engine

        self.engine = AsyncLLMEngine(build)
        self.node = socket.gethostname()
        self.service = EngineService(self.engine, self.stats, secrets.token_urlsafe(24), _node_ip())
        address = self.service.start()
        limit = self.engine.engine.max_prompt_bytes  # announced: routers refuse longer prompts
        self._announcer = registry.announce(
            tier.name, self.replica_id, address, self.service.token, limit
        )
        self._drained = False
        log.info("engine %s of tier %s serves on %s", self.replica_id, tier.name, address)
        # The model and everything startup built live as long as the replica: frozen, a full
        # collection walks only what requests allocate and no longer stalls a decode step (as
        # vLLM's engine core does after start-up).
        gc.collect()
        gc.freeze()

    def stats(self) -> EngineStats:
        """This replica's EngineStats (sent by the service's Stats call)."""
        s = self.engine.stats()
        return EngineStats(
            replica_id=self.replica_id,
            node=self.node,
            device=str(next(self.engine.engine.model.parameters()).device.type),
            running=s["running"],
            waiting=s["waiting"],
            free_blocks=s["free_blocks"],
            total_blocks=s["total_blocks"],
            max_model_len=self.engine.engine.max_model_len,
            prompt_tokens=s["prompt_tokens"],
            prompt_tokens_computed=s["prompt_tokens_computed"],
            prefix_cache_hit_tokens=s["prefix_cache_hit_tokens"],
            prefix_cache_hit_ratio=s["prefix_cache_hit_ratio"],
        )

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics of this replica (cluster/autoscaling.py)."""
        s = self.engine.stats()
        total = s["total_blocks"]
        return {
            "waiting": float(s["waiting"]),
            "running": float(s["running"]),
            "kv_use": (total - s["free_blocks"]) / total if total else 0.0,
            "ttft_p90_s": self.service.ttft_p90(),
        }

    def check_health(self) -> None:
        """Serve's periodic health check: a dead engine thread makes the replica unhealthy."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine thread of tier {self.tier.name!r} has stopped")

    def drain(self) -> None:
        """Leaves Redis, refuses new calls, and waits (up to engine.drain_timeout_s) until the
        engine has finished every request it holds; then stops the service and the engine."""
        if getattr(self, "_drained", True):
            return
        self._drained = True
        self._announcer.close()  # routers stop picking this replica at their next refresh
        self.service.draining = True
        deadline = time.monotonic() + self.tier.engine.drain_timeout_s
        while time.monotonic() < deadline:
            s = self.engine.stats()
            if s["running"] == 0 and s["waiting"] == 0:
                break
            time.sleep(0.05)
        self.service.close()  # streams still open past the deadline end here (and abort)
        self.engine.shutdown(timeout_s=2.0)
        if self._experts is not None:
            self._experts.close()  # (the shards stay: the tier's expert controller owns them)

    def __del__(self) -> None:
        """Serve calls this when it removes the replica (scale down, redeploy, shutdown)."""
        self.drain()
