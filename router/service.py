"""The front door's core, shared by the gRPC servicer and the OpenAI HTTP app.

`InferenceService` takes validated dataclasses (router/messages.py, workers/io_struct.py) and
returns dataclasses; it knows neither protobuf nor JSON. Per Generate, a numbered protocol:

1. decide the tier (router/policy.py, a pure function of the request and the in-flight counts);
2. admission: a tier with max_inflight_per_tier requests in flight refuses with `Overloaded`;
3. open a Generate call on the tier's least-loaded engine replica (router/engine_links.py, the
   one transport to engines) and wait for its first message: a `GenerateRejected` becomes
   `RequestError` (its field, as data) or `Overloaded` before the client has seen anything, so
   refusals get a status code, not a broken stream. A replica that is unreachable before it sent
   anything is skipped and the request tried on another (it had not started there);
4. forward the deltas, rebuilt into cumulative RequestOutputs; whenever the consumer stops early
   (client cancel, deadline, Abort), cancel the engine call, which aborts the request on the
   engine and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from moeray.cluster.config import MoerayConfig
from moeray.cluster.expert_load import read_expert_status
from moeray.cluster.logs import REQUEST_ID
from moeray.router.convert import RequestError, RequestLimits, check_prompt_size
from moeray.router.engine_links import EngineCallError, EngineLinks, GenerateStream
from moeray.router.messages import GenerateCall, RouteDecision, RouteInput, TierLoad
from moeray.router.metrics import FrontDoorMetrics
from moeray.router.policy import QueryRouter
from moeray.router.prefix_affinity import prefix_keys
from moeray.workers.io_struct import (
    EngineStats,
    FinishReason,
    GenerateDelta,
    GenerateRejected,
    RequestOutput,
    TokenLogprob,
    Usage,
)

log = logging.getLogger(__name__)

#: Replicas tried for one request whose earlier replicas were unreachable before it started.
MAX_ATTEMPTS = 3
#: How long a request waits for a tier that has no engine replica known to this router yet.
REPLICA_WAIT_S = 5.0


class Overloaded(RuntimeError):
    """The tier (router admission) or its engine (queue) is full: RESOURCE_EXHAUSTED / HTTP 429."""


class EngineUnavailable(RuntimeError):
    """No engine replica of the tier could take the request, or the one serving it was lost:
    UNAVAILABLE / HTTP 503 (retryable)."""


class DeadlineExceeded(RuntimeError):
    """The request's deadline passed before it finished: DEADLINE_EXCEEDED."""


class _Aborted(Exception):
    """The Abort RPC stopped the request: its stream ends with FinishReason.ABORT."""


@dataclass
class _Running:
    tier: str
    stream: GenerateStream | None = None
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
    """Routes, admits and streams requests to the engine replicas of the configured tiers.

    state: the ClusterState (Redis) where engine replicas announce themselves, and where placement
    epochs and expert load are read. links: the engine clients (default: EngineLinks on `state`).
    """

    def __init__(
        self,
        config: MoerayConfig,
        state: Any,
        metrics: FrontDoorMetrics | None = None,
        links: EngineLinks | None = None,
    ) -> None:
        self.config = config
        self.tiers = [t.name for t in config.tiers]
        self.state = state
        self.metrics = metrics or FrontDoorMetrics()
        self.links = links or EngineLinks(
            state, self.tiers, missing_grace_s=config.state.heartbeat_ttl_s,
            prefix_routing=config.router.prefix_routing,
            imbalance=config.router.prefix_imbalance, on_change=self._replicas_changed,
        )  # fmt: skip
        self.limits = RequestLimits.from_config(config)
        self.router = QueryRouter.from_config(config)
        self.inflight: dict[str, int] = {t: 0 for t in self.tiers}
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

    def route(self, inp: RouteInput, protocol: str) -> RouteDecision:
        """Step 1 of Generate: the policy's decision, after refusing (RequestError, counted) a
        prompt that no candidate tier takes (before the policy reads its text) or that the
        chosen tier does not."""
        try:
            candidates = self.limits.candidate_tiers(inp.tier)
            self._check_prompt(inp, candidates)
            decision = self.decide(inp)
            if candidates != [decision.tier]:
                self._check_prompt(inp, [decision.tier])
        except RequestError:
            self.metrics.requests.labels("", protocol, "invalid").inc()  # refused before routing
            raise
        return decision

    async def generate(
        self,
        call: GenerateCall,
        protocol: str,
        timeout_s: float | None = None,
        decision: RouteDecision | None = None,
    ) -> AsyncGenerator[tuple[RouteDecision, RequestOutput], None]:
        """Streams (decision, delta) pairs; raises RequestError / Overloaded / EngineUnavailable
        before the first. timeout_s: the client's deadline, passed on to the engine call.
        decision: a `route` already taken for this input (the choices of one HTTP request share
        one), else it is routed here."""
        REQUEST_ID.set(call.request_id)  # in this request's task: its log lines carry the id
        decision = decision or self.route(call.input, protocol)  # 1
        tier = decision.tier
        if call.request_id in self._running:
            self.metrics.requests.labels(tier, protocol, "invalid").inc()
            raise RequestError("request_id", f"{call.request_id!r} is already in use")
        limit = self.config.router.max_inflight_per_tier
        if self.inflight[tier] >= limit:  # 2
            self.metrics.requests.labels(tier, protocol, "overloaded").inc()
            raise Overloaded(f"tier {tier!r} is at its limit of {limit} requests in flight")
        self._enter(call.request_id, tier)
        outcome, start = "error", time.perf_counter()
        last: RequestOutput | None = None
        outputs = self._engine_outputs(tier, call, timeout_s)
        try:
            async for out in outputs:  # 3
                if last is None:
                    self.metrics.ttft.labels(tier).observe(time.perf_counter() - start)
                last = out
                yield decision, out  # 4
            outcome = "ok"
            if last is not None:
                self._count_tokens(tier, last, time.perf_counter() - start)
        except _Aborted:
            outcome = "aborted"
            yield decision, _aborted_output(call.request_id, last)
        except RequestError:
            outcome = "invalid"
            raise
        except Overloaded:
            outcome = "overloaded"
            raise
        except EngineUnavailable:
            outcome = "unavailable"
            raise
        except DeadlineExceeded:
            outcome = "deadline"
            raise
        except (GeneratorExit, asyncio.CancelledError):
            outcome = "cancelled"
            raise
        finally:
            await outputs.aclose()  # cancels the engine call at once if it is still open
            self._leave(call.request_id, tier, protocol, outcome)

    def _check_prompt(self, inp: RouteInput, tiers: list[str]) -> None:
        """RequestError when the prompt is longer than every one of `tiers` takes (the limits
        their engine replicas announced; nothing is checked while one is unknown)."""
        limits = [self.links.prompt_limit(t) for t in tiers]
        if limits and 0 not in limits:
            where = (
                f"tier {tiers[0]!r}"
                if len(tiers) == 1
                else "any of tiers " + ", ".join(repr(t) for t in tiers)
            )
            check_prompt_size(inp, max(limits), where)

    async def _engine_outputs(
        self, tier: str, call: GenerateCall, timeout_s: float | None
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs from one engine replica (steps 3 and 4)."""
        running = self._running[call.request_id]
        request = call.input.engine_request(call.request_id, call.sampling, call.echo)
        keys = prefix_keys(request) if self.links.prefix_routing else []
        tried: set[str] = set()
        self.links.start()
        wait_until = time.monotonic() + self.config.router.max_queue_wait_s
        while True:
            client, why = self.links.pick(tier, frozenset(tried), keys)
            if client is None and not tried and not self.links.clients(tier):
                # None known yet (a router that just started, or the tier's replicas being
                # replaced): wait for one to announce itself, within the queue-wait budget.
                budget = min(REPLICA_WAIT_S, wait_until - time.monotonic())
                if await self.links.wait_for_replica(tier, budget):
                    client, why = self.links.pick(tier, frozenset(tried), keys)
            if client is None:
                raise EngineUnavailable(f"no engine replica of tier {tier!r} is reachable")
            self.metrics.replica_choices.labels(tier, why).inc()
            self.links.served(tier, keys, client)
            stream = running.stream = client.generate(request, timeout_s)
            acc = _Outputs(call.request_id)
            try:
                events = aiter(stream)
                event = await _first(events, wait_until - time.monotonic(), tier)
                while True:
                    if isinstance(event, GenerateRejected):
                        raise _rejection_error(event)
                    yield acc.add(event)
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except EngineCallError as e:
                if e.code == "cancelled" and running.aborted:
                    raise _Aborted from None
                if e.code == "deadline_exceeded":
                    raise DeadlineExceeded("the request's deadline passed") from None
                lost = f"the engine replica of tier {tier!r} at {client.address} was lost"
                if e.code == "unavailable" and not stream.received:
                    tried.add(client.replica_id)
                    if len(tried) < MAX_ATTEMPTS:
                        log.warning("%s before request %s started (%s); trying another replica",
                                    lost, call.request_id, e.message)  # fmt: skip
                        continue
                if e.code == "unavailable":
                    raise EngineUnavailable(f"{lost}; retry the request") from None
                raise EngineUnavailable(f"{lost}: {e}") from None
            except asyncio.CancelledError:
                if running.aborted:
                    raise _Aborted from None
                raise
            finally:
                stream.cancel()  # no-op for a finished call; else the engine aborts the request

    def _replicas_changed(self, tier: str, added: int, removed: int) -> None:
        self.metrics.replica_changes.labels(tier, "added").inc(added)
        self.metrics.replica_changes.labels(tier, "removed").inc(removed)
        self.metrics.replicas.labels(tier).set(len(self.links.clients(tier)))

    def _enter(self, request_id: str, tier: str) -> None:
        self.inflight[tier] += 1
        self.metrics.inflight.labels(tier).set(self.inflight[tier])
        self._running[request_id] = _Running(tier)

    def _leave(self, request_id: str, tier: str, protocol: str, outcome: str) -> None:
        self._running.pop(request_id, None)
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
        if running is None or running.stream is None:
            return False
        running.aborted = True
        running.stream.cancel()
        return True

    # ---- status ------------------------------------------------------------------------------

    async def engine_stats(self, tier: str) -> list[EngineStats]:
        """Stats of every engine replica of the tier that answers in time (absent ones left out)."""
        self.links.start()
        results = await asyncio.gather(
            *(c.stats() for c in self.links.clients(tier)), return_exceptions=True
        )
        stats = [r for r in results if isinstance(r, EngineStats)]
        for r in results:
            if not isinstance(r, EngineStats):
                log.warning("an engine replica of tier %r did not answer: %s", tier, r)
        self._export_engine(tier, stats)
        return stats

    def _export_engine(self, tier: str, stats: list[EngineStats]) -> None:
        for s in stats:
            kv_use = (s.total_blocks - s.free_blocks) / s.total_blocks if s.total_blocks else 0.0
            for name, value in (("running", s.running), ("waiting", s.waiting), ("kv_use", kv_use)):
                self.metrics.replica.labels(tier, s.replica_id, name).set(value)
        for name, value in (
            ("replicas", len(stats)),
            ("running", sum(s.running for s in stats)),
            ("waiting", sum(s.waiting for s in stats)),
            ("kv_blocks_free", sum(s.free_blocks for s in stats)),
            ("kv_blocks_total", sum(s.total_blocks for s in stats)),
        ):
            self.metrics.engine.labels(tier, name).set(value)
        prompt = sum(s.prompt_tokens for s in stats)
        hits = sum(s.prefix_cache_hit_tokens for s in stats)
        self.metrics.prefix_cache_hit_ratio.labels(tier).set(hits / prompt if prompt else 0.0)

    async def healthy(self) -> bool:
        """True when every tier has at least one engine replica that answers."""
        stats = await asyncio.gather(*(self.engine_stats(t) for t in self.tiers))
        return all(stats)

    async def snapshot(self, tier_filter: str = "") -> list[TierSnapshot]:
        """Every tier's state (or one tier's); RequestError naming `tier` if unknown."""
        names = list(self.tiers)
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
        """Adds placement epoch, shard replicas and expert load from Redis (keyed by tier name),
        and exports the tier's expert metrics (cluster/expert_load.py)."""
        try:
            status = read_expert_status(self.state, snap.name)
        except Exception as e:  # Redis down: serve the status without it
            log.warning("cluster state unavailable: %s", e)
            return snap
        if status is None:  # not a sharded tier (or its shards are not up yet)
            return snap
        self.metrics.expert_tokens.totals[snap.name] = status.total
        self.metrics.expert_balancedness.labels(snap.name).set(status.balancedness)
        self.metrics.expert_placement_epoch.labels(snap.name).set(status.placement.epoch)
        self.metrics.expert_layout.update(snap.name, status)  # replicas, autoscaler plans
        return TierSnapshot(
            **{**snap.__dict__, "placement_epoch": status.placement.epoch,
               "shards": status.replicas, "expert_load": status.load,
               "load_window_s": status.window_s},
        )  # fmt: skip

    async def refresh_metrics(self) -> None:
        """Pulls engine gauges (and expert load) into the registry before a scrape."""
        await self.snapshot()


async def _first(events: AsyncIterator[Any], wait_s: float, tier: str) -> Any:
    """The engine call's first event, or Overloaded when none came within the queue wait
    (router.max_queue_wait_s; the caller then cancels the call, which frees its KV blocks)."""
    try:
        return await asyncio.wait_for(anext(events), max(wait_s, 0.0))
    except TimeoutError:
        raise Overloaded(
            f"tier {tier!r} gave no first token within router.max_queue_wait_s; retry later"
        ) from None


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


def _rejection_error(item: GenerateRejected) -> Exception:
    if item.kind == "overloaded":
        return Overloaded(item.message)
    return RequestError(item.field, item.message)


class _Outputs:
    """Rebuilds cumulative RequestOutputs of one request from the engine's deltas."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.prompt: str | None = None
        self.token_ids: list[int] = []
        self.text = ""

    def add(self, d: GenerateDelta) -> RequestOutput:
        if d.prompt_token_ids is not None:
            self.prompt_token_ids = d.prompt_token_ids
            self.prompt_logprobs = d.prompt_logprobs
            self.prompt = d.prompt_text
        self.token_ids.extend(d.delta_token_ids)
        self.text += d.delta_text
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.token_ids),
            text=self.text,
            delta_token_ids=d.delta_token_ids,
            delta_text=d.delta_text,
            finish_reason=d.finish_reason,
            usage=Usage(d.prompt_tokens, d.completion_tokens),
            engine_time_s=d.engine_time_s,
            delta_logprobs=d.delta_logprobs,
            prompt_logprobs=self.prompt_logprobs,
            prompt=self.prompt,
        )
