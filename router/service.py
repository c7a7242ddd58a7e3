"""The front door's core, shared by the gRPC servicer and the OpenAI HTTP app.

`InferenceService` takes validated dataclasses (router/messages.py, workers/io_struct.py) and
returns dataclasses; it knows neither protobuf nor JSON. Per Generate, a numbered protocol:

1. decide the tier (router/policy.py, a pure function of the request and the in-flight counts);
2. admission: a tier with max_inflight_per_tier requests in flight refuses with `Overloaded`;
3. open a stream to the tier's engine: over an engine replica's direct channel
   (router/engine_links.py) when one is registered and reachable, else through the deployment's
   Serve handle (`handle.options(stream=True).generate`); then wait for its first message: a
   `RequestRejected` becomes `RequestError` or `Overloaded` before the client has seen
   anything, so refusals get a status code, not a broken stream;
4. forward the deltas; whenever the consumer stops early (client cancel, deadline, Abort),
   cancel the engine stream, which aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from moeray.cluster.config import MoerayConfig
from moeray.router.convert import RequestError, RequestLimits
from moeray.router.engine_links import EngineLinks
from moeray.router.messages import GenerateCall, RouteDecision, RouteInput, TierLoad
from moeray.router.metrics import FrontDoorMetrics
from moeray.router.policy import QueryRouter
from moeray.workers.engine_channel import ChannelError, StreamCancelled
from moeray.workers.io_struct import (
    EngineStats,
    FinishReason,
    RequestOutput,
    RequestRejected,
    Usage,
)
from ray.serve.exceptions import RequestCancelledError

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0


class Overloaded(RuntimeError):
    """The tier (router admission) or its engine (queue) is full: RESOURCE_EXHAUSTED / HTTP 429."""


@dataclass
class _Running:
    tier: str
    response: Any  # DeploymentResponseGenerator | EngineStream: cancel() stops the engine stream
    aborted: bool = False


@dataclass(frozen=True)
class TierSnapshot:
    """What GetClusterStatus reports of one tier."""

    name: str
    model: str
    inflight: int
    max_inflight: int
    engines: list[EngineStats]
    placement_epoch: int = 0
    shards: list[Any] = field(default_factory=list)  # cluster.state_messages.ReplicaInfo
    expert_load: Any = None  # int64 [L, E] numpy array, tokens per (layer, expert)
    load_window_s: float = 0.0


class InferenceService:
    """Routes, admits and streams requests to the engine deployments of the configured tiers.

    engines: tier name -> DeploymentHandle of that tier's `EngineServer`.
    state: a ClusterState (Redis) for placement epochs and expert load, or None.
    """

    def __init__(
        self,
        config: MoerayConfig,
        engines: Mapping[str, Any],
        state: Any = None,
        metrics: FrontDoorMetrics | None = None,
        links: EngineLinks | None = None,
    ) -> None:
        self.config = config
        self.engines = dict(engines)
        # One streaming view per tier, made once: handle.options() copies the handle per call.
        # _by_reference=False sends the calls over Serve's gRPC channel between replicas instead
        # of Ray actor tasks, with plain pickle for the io_struct dataclasses: measured 8.9 ->
        # 5.1 ms per one-token Generate on the dev machine (docs/BENCHMARKS.md).
        self._streams = {
            tier: h.options(
                stream=True, _by_reference=False,
                request_serialization="pickle", response_serialization="pickle",
            )
            for tier, h in self.engines.items()
        }  # fmt: skip
        self.state = state
        # The engines' direct channels, found through Redis; None = always the Serve handle.
        if links is None and state is not None and config.router.engine_channel:
            links = EngineLinks(state, [t.name for t in config.tiers])
        self.links = links
        self.metrics = metrics or FrontDoorMetrics()
        self.limits = RequestLimits.from_config(config)
        self.router = QueryRouter.from_config(config)
        self.inflight: dict[str, int] = {t.name: 0 for t in config.tiers}
        self._running: dict[str, _Running] = {}

    # ---- routing -----------------------------------------------------------------------------

    def decide(self, inp: RouteInput) -> RouteDecision:
        """The policy's decision (timed and counted); RequestError naming `tier` if unknown."""
        start = time.perf_counter()
        try:
            decision = self.router.decide(inp, TierLoad(self.inflight))
        except ValueError as e:
            raise RequestError("tier", str(e).removeprefix("tier ")) from None
        self.metrics.decision_latency.observe(time.perf_counter() - start)
        mode = "fallback" if decision.fallback else ("auto" if inp.auto else "named")
        self.metrics.decisions.labels(decision.tier, mode).inc()
        return decision

    def features(self, inp: RouteInput) -> dict[str, float]:
        return self.router.features(inp)

    # ---- generation --------------------------------------------------------------------------

    async def generate(
        self, call: GenerateCall, protocol: str
    ) -> AsyncIterator[tuple[RouteDecision, RequestOutput]]:
        """Streams (decision, delta) pairs; raises RequestError / Overloaded before the first."""
        decision = self.decide(call.input)  # 1
        tier = decision.tier
        if call.request_id in self._running:
            raise RequestError("request_id", f"{call.request_id!r} is already in use")
        limit = self.config.router.max_inflight_per_tier
        if self.inflight[tier] >= limit:  # 2
            self.metrics.requests.labels(tier, protocol, "overloaded").inc()
            raise Overloaded(f"tier {tier!r} is at its limit of {limit} requests in flight")
        self._enter(call.request_id, tier)
        outcome, start = "error", time.perf_counter()
        items = self._engine_items(tier, call)  # 3
        try:
            last: RequestOutput | None = None
            try:
                async for item in items:
                    if isinstance(item, RequestRejected):
                        outcome = "invalid" if item.kind == "invalid" else "overloaded"
                        raise _rejection_error(item)
                    if last is None:
                        self.metrics.ttft.labels(tier).observe(time.perf_counter() - start)
                    last = item
                    yield decision, item  # 4
            except (RequestCancelledError, StreamCancelled):
                if not self._running[call.request_id].aborted:
                    raise
                outcome = "aborted"  # the Abort RPC: end the stream with FinishReason.ABORT
                yield decision, _aborted_output(call.request_id, last)
                return
            outcome = "ok" if last is not None else "error"
            if last is not None:
                self._count_tokens(tier, last, time.perf_counter() - start)
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            self._leave(call.request_id, tier, protocol, outcome)
            await items.aclose()

    async def _engine_items(
        self, tier: str, call: GenerateCall
    ) -> AsyncGenerator[RequestOutput | RequestRejected, None]:
        """The engine's stream for one request: over the engine's direct channel when a link is
        up, else (or when the link fails before anything came back) over the Serve handle."""
        running = self._running[call.request_id]
        link = None
        if self.links is not None:
            self.links.start()
            link = self.links.pick(tier)
        if link is not None:
            stream = link.generate(call.request_id, call.input.engine_input(), call.sampling)
            running.response = stream
            try:
                self.metrics.engine_streams.labels(tier, "channel").inc()
                async for item in stream:
                    yield item
                return
            except ChannelError as e:
                if stream.started or running.aborted:
                    raise
                log.warning("engine channel of tier %r unusable (%s); using the handle", tier, e)
        self.metrics.engine_streams.labels(tier, "handle").inc()
        response = self._streams[tier].generate.remote(
            call.request_id, call.input.engine_input(), call.sampling
        )
        running.response = response
        async for item in response:
            yield item

    def _enter(self, request_id: str, tier: str) -> None:
        self.inflight[tier] += 1
        self.metrics.inflight.labels(tier).set(self.inflight[tier])
        self._running[request_id] = _Running(tier, None)

    def _leave(self, request_id: str, tier: str, protocol: str, outcome: str) -> None:
        running = self._running.pop(request_id, None)
        if running is not None and running.response is not None and outcome != "ok":
            running.response.cancel()  # the engine aborts the request, freeing its KV blocks
        self.inflight[tier] -= 1
        self.metrics.inflight.labels(tier).set(self.inflight[tier])
        self.metrics.requests.labels(tier, protocol, outcome).inc()

    def _count_tokens(self, tier: str, last: RequestOutput, elapsed_s: float) -> None:
        self.metrics.tokens.labels(tier, "prompt").inc(last.usage.prompt_tokens)
        self.metrics.tokens.labels(tier, "completion").inc(last.usage.completion_tokens)
        self.metrics.latency.labels(tier).observe(elapsed_s)

    def abort(self, request_id: str) -> bool:
        """Stops a running Generate by id (its engine frees the KV blocks); False if unknown."""
        running = self._running.get(request_id)
        if running is None or running.response is None:
            return False
        running.aborted = True
        running.response.cancel()
        return True

    # ---- status ------------------------------------------------------------------------------

    async def engine_stats(self, tier: str) -> list[EngineStats]:
        """Stats of one engine replica of the tier (the one the handle picks); [] on failure."""
        try:
            stats = await asyncio.wait_for(self.engines[tier].stats.remote(), STATS_TIMEOUT_S)
        except Exception as e:  # a dead or starting replica: report it as absent
            log.warning("stats of tier %r unavailable: %s", tier, e)
            return []
        self._export_engine(tier, stats)
        return [stats]

    def _export_engine(self, tier: str, s: EngineStats) -> None:
        for name, value in (
            ("running", s.running),
            ("waiting", s.waiting),
            ("kv_blocks_free", s.free_blocks),
            ("kv_blocks_total", s.total_blocks),
        ):
            self.metrics.engine.labels(tier, name).set(value)

    async def snapshot(self, tier_filter: str = "") -> list[TierSnapshot]:
        """Every tier's state (or one tier's); RequestError naming `tier` if unknown."""
        names = [t.name for t in self.config.tiers]
        if tier_filter:
            if tier_filter not in names:
                raise RequestError(
                    "tier", f"{tier_filter!r} is not configured; choose one of {names}"
                )
            names = [tier_filter]
        stats = await asyncio.gather(*(self.engine_stats(n) for n in names))
        out = []
        for name, engines in zip(names, stats):
            snap = TierSnapshot(
                name=name,
                model=self.config.tier(name).model,
                inflight=self.inflight[name],
                max_inflight=self.config.router.max_inflight_per_tier,
                engines=engines,
            )
            if self.state is not None:
                snap = await asyncio.to_thread(self._with_state, snap)
            out.append(snap)
        return out

    def _with_state(self, snap: TierSnapshot) -> TierSnapshot:
        """Adds placement epoch, shard replicas and expert load from Redis (keyed by tier name)."""
        try:
            placement = self.state.read_placement(snap.name)
            if placement is None:
                return snap
            load = self.state.read_load(snap.name, placement.num_layers, placement.num_experts)
            shards = self.state.live_replicas(snap.name)
        except Exception as e:  # Redis down: serve the status without it
            log.warning("cluster state unavailable: %s", e)
            return snap
        for (layer, expert), n in _nonzero(load):
            self.metrics.expert_tokens.labels(snap.name, str(layer), str(expert)).set(n)
        return TierSnapshot(
            **{**snap.__dict__, "placement_epoch": placement.epoch, "shards": shards,
               "expert_load": load, "load_window_s": self.state.load_window_s},
        )  # fmt: skip

    async def refresh_metrics(self) -> None:
        """Pulls engine gauges (and expert load) into the registry before a scrape."""
        await self.snapshot()


def _nonzero(load: Any) -> list[tuple[tuple[int, int], int]]:
    rows, cols = load.nonzero()
    return [((int(r), int(c)), int(load[r, c])) for r, c in zip(rows, cols)]


def _aborted_output(request_id: str, last: RequestOutput | None) -> RequestOutput:
    """The last message of an aborted stream: no new tokens, FinishReason.ABORT."""
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=last.prompt_token_ids if last else [],
        token_ids=last.token_ids if last else [],
        text=last.text if last else "",
        finish_reason=FinishReason.ABORT,
        usage=last.usage if last else Usage(),
    )


def _rejection_error(item: RequestRejected) -> Exception:
    if item.kind == "overloaded":
        return Overloaded(item.message)
    field_name, _, rest = item.message.partition(" ")  # engine messages start with the field
    return RequestError(field_name, rest)
