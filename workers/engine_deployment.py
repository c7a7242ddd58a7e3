"""One tier's engine as a Ray Serve deployment: AsyncLLMEngine behind streaming handle methods.

cluster/app.py wraps `EngineServer` with `serve.deployment(...)` once per tier; the router calls
it through a DeploymentHandle (`handle.options(stream=True).generate.remote(...)`). Everything
that crosses the process boundary is a typed dataclass from workers/io_struct.py: the engine never
sees a protobuf, the router never sees a tensor.

Direct channel: given an endpoint registry (cluster/app.py passes a `cluster.state.EngineRegistry`
when Redis is configured), the replica also serves its token streams over
workers/engine_channel.py on its node's IP and keeps that endpoint registered in Redis; the router
then streams Generate over it and uses this deployment's handle for everything else (stats,
health, and as the fallback when no channel is reachable).

A refusal (bad input, full queue) is streamed as one `RequestRejected` value instead of raised,
so the router maps it to a status code without unwrapping a Ray traceback. When the caller stops
iterating (client cancel, deadline, Abort), Serve cancels this generator; the engine's stream
then aborts the request and frees its KV blocks before the next step.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from moeray.cluster.config import TierConfig
from moeray.workers.async_engine import AsyncLLMEngine, EngineOverloaded, Messages
from moeray.workers.engine_channel import EngineChannelServer
from moeray.workers.io_struct import EngineStats, RequestOutput, RequestRejected, SamplingParams

log = logging.getLogger(__name__)

#: The GIL switch interval in the replica's process. Python's 5 ms default lets the engine
#: thread's Python code (scheduler, sampler) hold the GIL for up to 5 ms while the event loop
#: waits to hand a delta to Ray; 0.2 ms bounds that wait (measured: engine-hop p50 -1 ms).
GIL_SWITCH_INTERVAL_S = 2e-4


class EndpointRegistry(Protocol):
    """cluster.state.EngineRegistry, seen from here: announce() returns something to close()."""

    def announce(self, tier: str, replica_id: str, address: str, token: str) -> Any: ...


def _node_ip() -> str:
    """The IP other nodes reach this replica on (Ray's view); loopback outside Ray."""
    try:
        import ray

        return str(ray.util.get_node_ip_address()) if ray.is_initialized() else "127.0.0.1"
    except Exception:  # no Ray, or no network: the channel stays local
        return "127.0.0.1"


def _replica_id() -> str:
    """Serve's replica id inside a replica; the pid elsewhere (tests constructing it directly)."""
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not inside a Serve replica
        return f"pid-{os.getpid()}"


class EngineServer:
    """The engine of one tier. Construct with the tier's config (the checkpoint must be local)."""

    def __init__(self, tier: TierConfig, registry: EndpointRegistry | None = None) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.tier = tier
        self.engine = AsyncLLMEngine.from_pretrained(tier.model, tier.engine, dtype=tier.dtype)
        self.replica_id = _replica_id()
        self.node = socket.gethostname()
        self.channel: EngineChannelServer | None = None
        self._announcer: Any = None
        if registry is not None:
            self.channel = EngineChannelServer(self.engine, secrets.token_urlsafe(24), _node_ip())
            address = self.channel.start()
            self._announcer = registry.announce(
                tier.name, self.replica_id, address, self.channel.token
            )
            log.info("engine %s of tier %s streams on %s", self.replica_id, tier.name, address)

    async def generate(
        self, request_id: str, prompt: str | list[int] | Messages, params: SamplingParams
    ) -> AsyncIterator[RequestOutput | RequestRejected]:
        """Streams RequestOutput deltas (the last one finished), or one RequestRejected.

        Receives: request id, prompt text | token ids | chat messages, sampling params.
        Sends: one message per engine step in which the request advanced; the last one carries
        `engine_time_s`, this method's time from entry to that message.
        """
        start = time.perf_counter()
        try:
            stream = self.engine.generate(request_id, prompt, params)
        except EngineOverloaded as e:
            yield RequestRejected("overloaded", str(e))
            return
        except ValueError as e:  # the message names the field (prompt, max_tokens, ...)
            yield RequestRejected("invalid", str(e))
            return
        try:
            async for out in stream:
                if out.finished:
                    out.engine_time_s = time.perf_counter() - start
                yield out
        except ValueError as e:  # refused on the engine thread (e.g. a duplicate id)
            yield RequestRejected("invalid", str(e))

    async def abort(self, request_id: str) -> None:
        """Stops a request by id (its stream ends with FinishReason.ABORT); unknown ids: no-op."""
        self.engine.abort(request_id)

    async def stats(self) -> EngineStats:
        """Receives nothing; sends this replica's EngineStats."""
        s = self.engine.stats()
        return EngineStats(
            replica_id=self.replica_id,
            node=self.node,
            device="cpu" if not self._on_gpu() else "cuda",
            running=s["running"],
            waiting=s["waiting"],
            free_blocks=s["free_blocks"],
            total_blocks=s["total_blocks"],
            max_model_len=self.engine.engine.max_model_len,
        )

    def _on_gpu(self) -> bool:
        return any(p.is_cuda for p in self.engine.engine.model.parameters())

    def check_health(self) -> None:
        """Serve's periodic health check: a dead engine thread makes the replica unhealthy."""
        if not self.engine._thread.is_alive():
            raise RuntimeError(f"the engine thread of tier {self.tier.name!r} has stopped")

    def __del__(self) -> None:
        if getattr(self, "_announcer", None) is not None:
            self._announcer.close()  # the router stops picking this replica
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=2.0)
