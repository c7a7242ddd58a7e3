"""One tier's engine replica: AsyncLLMEngine behind the internal gRPC service, as a Serve deployment.

cluster/app.py wraps `EngineServer` with `serve.deployment(...)` once per tier. Serve runs the
replica (placement, restarts, health checks); the data path is workers/engine_service.py: the
replica serves Generate and Stats over gRPC on its node's IP and keeps that endpoint (address and
token) registered in Redis through the registry it is given, where router replicas find it. No
Serve handle carries request data.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any, Protocol

from moeray.cluster.config import TierConfig
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.engine_service import EngineService
from moeray.workers.io_struct import EngineStats

log = logging.getLogger(__name__)


class EndpointRegistry(Protocol):
    """cluster.state.EngineRegistry, seen from here: announce() returns something to close()."""

    def announce(self, tier: str, replica_id: str, address: str, token: str) -> Any: ...


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


class EngineServer:
    """The engine of one tier. Construct with the tier's config (the checkpoint must be local) and
    the registry its endpoint is announced in."""

    def __init__(self, tier: TierConfig, registry: EndpointRegistry) -> None:
        self.tier = tier
        self.engine = AsyncLLMEngine.from_pretrained(tier.model, tier.engine, dtype=tier.dtype)
        self.replica_id = _replica_id()
        self.node = socket.gethostname()
        self.service = EngineService(self.engine, self.stats, secrets.token_urlsafe(24), _node_ip())
        address = self.service.start()
        self._announcer = registry.announce(tier.name, self.replica_id, address, self.service.token)
        log.info("engine %s of tier %s serves on %s", self.replica_id, tier.name, address)

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

    def check_health(self) -> None:
        """Serve's periodic health check: a dead engine thread makes the replica unhealthy."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine thread of tier {self.tier.name!r} has stopped")

    def __del__(self) -> None:
        announcer = getattr(self, "_announcer", None)
        if announcer is not None:
            announcer.close()  # routers stop picking this replica
        service = getattr(self, "service", None)
        if service is not None:
            service.close()  # open calls end: their requests abort
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=2.0)
