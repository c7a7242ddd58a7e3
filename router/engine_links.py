"""The router's direct links to engine replicas (workers/engine_channel.py), found through Redis.

Each engine replica registers its channel endpoint in Redis (`ClusterState.register_engine`,
kept fresh by `EndpointAnnouncer`). `EngineLinks` refreshes the endpoints of every tier on a
background task of the router's event loop (never on a request's path) and hands out the link with
the fewest open streams. A link that failed is skipped for RETRY_AFTER_S; with no usable link the
caller falls back to the Serve handle, so Redis being down only costs speed, never requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from moeray.workers.engine_channel import EngineLink

log = logging.getLogger(__name__)

REFRESH_S = 1.0
RETRY_AFTER_S = 5.0


class EngineLinks:
    """Per tier: replica id -> EngineLink, refreshed from `state.engine_endpoints(tier)`.

    state: a `cluster.state.ClusterState`. Lives on one event loop (the router replica's).
    """

    def __init__(self, state: Any, tiers: list[str], refresh_s: float = REFRESH_S) -> None:
        self.state, self.tiers, self.refresh_s = state, list(tiers), refresh_s
        self._links: dict[str, dict[str, EngineLink]] = {t: {} for t in self.tiers}
        self._retired: list[EngineLink] = []
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
            except Exception as e:  # Redis down: keep the links we have, retry with backoff
                log.debug("engine endpoints unavailable: %s", e)
                backoff = min(backoff * 2, 10.0)
            await asyncio.sleep(backoff)

    async def refresh(self) -> None:
        """One round: every tier's endpoints from Redis (on a worker thread)."""
        for tier in self.tiers:
            endpoints = await asyncio.to_thread(self.state.engine_endpoints, tier)
            self._update(tier, endpoints)
        for link in [lk for lk in self._retired if lk.inflight == 0]:
            self._retired.remove(link)
            await link.close()
        self.refreshes += 1

    def _update(self, tier: str, endpoints: list[Any]) -> None:
        current, fresh = self._links[tier], {}
        for ep in endpoints:
            link = current.get(ep.replica_id)
            if link is None or (link.address, link.token) != (ep.address, ep.token):
                link = EngineLink(ep.address, ep.token, ep.replica_id)
            fresh[ep.replica_id] = link
        for rid, link in current.items():
            if fresh.get(rid) is not link:
                self._retired.append(link)  # closed once its open streams have ended
        self._links[tier] = fresh

    def pick(self, tier: str) -> EngineLink | None:
        """The usable link of `tier` with the fewest open streams (ties broken at random)."""
        now = time.monotonic()
        usable = [
            lk for lk in self._links.get(tier, {}).values()
            if not lk.closed and (not lk.failed_at or now - lk.failed_at > RETRY_AFTER_S)
        ]  # fmt: skip
        if not usable:
            return None
        least = min(lk.inflight for lk in usable)
        return random.choice([lk for lk in usable if lk.inflight == least])

    def links(self, tier: str) -> list[EngineLink]:
        return list(self._links.get(tier, {}).values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for link in [lk for t in self._links.values() for lk in t.values()] + self._retired:
            await link.close()
