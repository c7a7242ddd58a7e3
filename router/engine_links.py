"""The router's side of the one router <-> engine transport: gRPC clients of the engine replicas.

Each engine replica serves workers/engine_service.py on its node and registers the endpoint
(address, token) in Redis (`ClusterState.register_engine`, kept fresh by `EndpointAnnouncer`).
`EngineLinks` refreshes every tier's endpoints on a background task of the router's event loop
(never on a request's path) and hands out a replica per request: the one that most likely holds
the request's prompt prefix in its KV cache (router/prefix_affinity.py) unless it has
`imbalance` more open streams than the least-loaded one, else the least-loaded one. A replica
whose call failed with UNAVAILABLE is skipped for RETRY_AFTER_S; a replica whose endpoint left
Redis is closed once its open streams have ended. Redis down: the known replicas keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from moeray.router.prefix_affinity import PrefixAffinity
from moeray.workers.engine_service import (
    CHANNEL_OPTIONS,
    GENERATE,
    STATS,
    client_metadata,
    decode_event,
    decode_stats,
    encode,
)
from moeray.workers.io_struct import EngineStats, GenerateEvent, GenerateRequest, StatsRequest

log = logging.getLogger(__name__)

REFRESH_S = 1.0
RETRY_AFTER_S = 2.0
STATS_TIMEOUT_S = 1.0


class EngineClient:
    """One gRPC channel from this router replica to one engine replica (on the router's loop).

    `inflight` counts its open Generate streams (least-loaded picking); `max_prompt_bytes` is
    the longest prompt text the replica announced it would take (0: not announced).
    """

    def __init__(
        self, replica_id: str, address: str, token: str, max_prompt_bytes: int = 0
    ) -> None:
        self.replica_id, self.address, self.token = replica_id, address, token
        self.max_prompt_bytes = max_prompt_bytes
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._generate = self.channel.unary_stream(
            GENERATE, request_serializer=encode, response_deserializer=decode_event
        )
        self._stats = self.channel.unary_unary(
            STATS, request_serializer=encode, response_deserializer=decode_stats
        )
        self._metadata = client_metadata(token)
        self.inflight = 0
        self.failed_at = 0.0  # monotonic time of the last UNAVAILABLE (0 = none)
        self.missing_since = 0.0  # monotonic time its endpoint went missing from Redis (0 = none)

    def generate(self, request: GenerateRequest, timeout_s: float | None) -> GenerateStream:
        """A stream of GenerateEvents for one request; cancel() aborts it on the engine."""
        call = self._generate(request, timeout=timeout_s, metadata=self._metadata)
        return GenerateStream(self, call)

    async def stats(self, timeout_s: float = STATS_TIMEOUT_S) -> EngineStats:
        """This replica's EngineStats; grpc.aio.AioRpcError when it does not answer in time."""
        result: EngineStats = await self._stats(
            StatsRequest(), timeout=timeout_s, metadata=self._metadata
        )
        return result

    async def close(self) -> None:
        await self.channel.close(grace=None)


class GenerateStream:
    """One Generate call: iterate it for GenerateEvents; counts as in flight until it ends."""

    def __init__(self, client: EngineClient, call: Any) -> None:
        self.client, self.call = client, call
        self.received = 0  # events received so far (0: the engine may not have started it)
        client.inflight += 1
        self._open = True

    async def __aiter__(self) -> AsyncIterator[GenerateEvent]:
        try:
            async for event in self.call:
                self.received += 1
                yield event
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self.client.failed_at = time.monotonic()
            raise
        finally:
            self._end()

    def cancel(self) -> None:
        """Stops the call: the engine aborts the request and frees its KV blocks."""
        self.call.cancel()
        self._end()

    def _end(self) -> None:
        if self._open:
            self._open = False
            self.client.inflight -= 1


class EngineLinks:
    """Per tier: replica id -> EngineClient, refreshed from `state.engine_endpoints(tier)`.

    state: a `cluster.state.ClusterState`. Lives on one event loop (the router replica's).
    prefix_routing / imbalance: prefer the replica holding a request's prefix while it has at
    most `imbalance` more open streams than the least-loaded replica.
    on_change(tier, added, removed): called when replicas join or leave a tier.
    missing_grace_s: how long a replica whose endpoint left Redis is kept (its TTL, by default).
    """

    def __init__(
        self,
        state: Any,
        tiers: list[str],
        refresh_s: float = REFRESH_S,
        missing_grace_s: float = 10.0,
        prefix_routing: bool = True,
        imbalance: int = 8,
        on_change: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.state, self.tiers, self.refresh_s = state, list(tiers), refresh_s
        self.missing_grace_s = missing_grace_s
        self.prefix_routing, self.imbalance, self.on_change = prefix_routing, imbalance, on_change
        self.affinity = {t: PrefixAffinity() for t in self.tiers}
        self._clients: dict[str, dict[str, EngineClient]] = {t: {} for t in self.tiers}
        self._retired: list[EngineClient] = []
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0

    def start(self) -> None:
        """Starts the refresh task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="moeray-engine-links")

    async def _run(self) -> None:
        backoff = self.refresh_s
        while True:
            try:
                await self.refresh()
                backoff = self.refresh_s
            except Exception as e:  # Redis down: keep the replicas we know, retry with backoff
                log.debug("engine endpoints unavailable: %s", e)
                backoff = min(backoff * 2, 10.0)
            await asyncio.sleep(backoff)

    async def refresh(self) -> None:
        """One round: every tier's endpoints from Redis (on a worker thread)."""
        for tier in self.tiers:
            endpoints = await asyncio.to_thread(self.state.engine_endpoints, tier)
            self._update(tier, endpoints)
        for client in [c for c in self._retired if c.inflight == 0]:
            self._retired.remove(client)
            await client.close()
        self.refreshes += 1

    def _update(self, tier: str, endpoints: list[Any]) -> None:
        """Adopts the tier's endpoints. A replica missing from Redis is dropped only once it has
        been missing for `missing_grace_s`: a restarted (empty) Redis must not empty the tier
        before the replicas re-announce themselves (within a third of their TTL)."""
        current, fresh = self._clients[tier], {}
        now = time.monotonic()
        for ep in endpoints:
            client = current.get(ep.replica_id)
            if client is None or (client.address, client.token) != (ep.address, ep.token):
                client = EngineClient(ep.replica_id, ep.address, ep.token)
            client.max_prompt_bytes = ep.max_prompt_bytes
            client.missing_since = 0.0
            fresh[ep.replica_id] = client
        for rid, client in current.items():
            if rid in fresh:
                continue
            if not client.missing_since:
                client.missing_since = now
            if now - client.missing_since < self.missing_grace_s:
                fresh[rid] = client  # kept for now
        for rid, client in current.items():
            if fresh.get(rid) is not client:
                self._retired.append(client)  # closed once its open streams have ended
            if rid not in fresh:
                self.affinity[tier].forget(rid)
        self._clients[tier] = fresh
        added, removed = len(fresh.keys() - current.keys()), len(current.keys() - fresh.keys())
        if self.on_change is not None and (added or removed):
            self.on_change(tier, added, removed)

    async def wait_for_replica(self, tier: str, timeout_s: float) -> bool:
        """Refreshes `tier` from Redis until it has a replica, for up to timeout_s (a router that
        just started, or a tier whose replicas are all being replaced); True if one is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._update(tier, await asyncio.to_thread(self.state.engine_endpoints, tier))
            except Exception as e:  # Redis down: wait with what we have
                log.debug("engine endpoints unavailable: %s", e)
            if self._clients.get(tier) or time.monotonic() >= deadline:
                return bool(self._clients.get(tier))
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def pick(
        self, tier: str, exclude: frozenset[str] = frozenset(), keys: list[bytes] | None = None
    ) -> tuple[EngineClient | None, str]:
        """A usable replica of `tier` for a request with these prefix keys, and why:
        "prefix" (it holds the longest shared prefix), "overloaded" (it does, but has too many
        open streams), or "least_loaded" (fewest open streams, ties broken at random)."""
        now = time.monotonic()
        usable = {
            c.replica_id: c for c in self._clients.get(tier, {}).values()
            if c.replica_id not in exclude
            and (not c.failed_at or now - c.failed_at > RETRY_AFTER_S)
        }  # fmt: skip
        if not usable:
            return None, "none"
        least = min(c.inflight for c in usable.values())
        why = "least_loaded"
        if keys and self.prefix_routing:
            holder, _ = self.affinity[tier].match(keys, usable.keys())
            if holder is not None:
                if usable[holder].inflight - least <= self.imbalance:
                    return usable[holder], "prefix"
                why = "overloaded"
        return random.choice([c for c in usable.values() if c.inflight == least]), why

    def served(self, tier: str, keys: list[bytes], client: EngineClient) -> None:
        """Records that `client` now holds the prefixes of a request it served."""
        if keys and self.prefix_routing:
            self.affinity[tier].record(keys, client.replica_id)

    def clients(self, tier: str) -> list[EngineClient]:
        return list(self._clients.get(tier, {}).values())

    def prompt_limit(self, tier: str) -> int:
        """The longest prompt text (UTF-8 bytes) some replica of `tier` takes; 0 when not known
        (no replica yet, or one that announced no limit): then only the engine checks."""
        limits = [c.max_prompt_bytes for c in self._clients.get(tier, {}).values()]
        return 0 if not limits or 0 in limits else max(limits)

    def largest_prompt_limit(self) -> int:
        """The longest prompt text any tier takes; 0 unless every tier's limit is known."""
        limits = [self.prompt_limit(t) for t in self.tiers]
        return 0 if not limits or 0 in limits else max(limits)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in [c for t in self._clients.values() for c in t.values()] + self._retired:
            await client.close()
