"""MoerayClient and AsyncMoerayClient over a real gRPC channel and server.

The server here is a real grpc.server serving moeray.v1.Inference with the real conversion
(router/convert.py) and policy (router/policy.py); only the engine is a stand-in (it streams the
prompt's words back one per message), because the real engine runs as a Ray Serve deployment:
the client against the full stack is exercised in tests/router/test_serving.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from moeray.cluster.config import MoerayConfig
from moeray.router import convert
from moeray.router.client import (
    AsyncMoerayClient,
    InvalidRequest,
    MoerayClient,
    MoerayError,
    Overloaded,
)
from moeray.router.policy import QueryRouter
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers.io_struct import FinishReason, RequestOutput, Usage

CFG = MoerayConfig.model_validate(
    {"tiers": [{"name": "fast", "model": "/m"}, {"name": "reasoning", "model": "/m"}]}
)


class EchoServicer(pb_grpc.InferenceServicer):
    """Validates and routes for real; 'generates' by echoing the prompt's words (see module doc)."""

    def __init__(self) -> None:
        self.limits = convert.RequestLimits.from_config(CFG)
        self.router = QueryRouter.from_config(CFG)
        self.running: dict[str, threading.Event] = {}
        self.cancelled: set[str] = set()

    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GenerateResponse]:
        try:
            call = convert.generate_call_from_proto(request, self.limits)
            decision = self.router.decide(call.input)
        except convert.RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if call.input.prompt == "overload":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "tier 'fast' is at capacity")
        words = call.input.text().split() * 100
        stop = self.running[call.request_id] = threading.Event()
        slow = call.input.prompt is not None and call.input.prompt.startswith("slow")
        finished = False
        try:
            for i in range(call.sampling.max_tokens):
                if stop.is_set() or not context.is_active():
                    self.cancelled.add(call.request_id)
                    reason = FinishReason.ABORT
                    break
                reason = FinishReason.LENGTH if i == call.sampling.max_tokens - 1 else None
                out = RequestOutput(
                    call.request_id, [0], delta_token_ids=[i], delta_text=words[i] + " ",
                    finish_reason=reason, usage=Usage(1, i + 1),
                )  # fmt: skip
                yield convert.output_to_proto(out, decision.tier, decision if i == 0 else None)
                if slow:
                    time.sleep(0.02)
            if reason is FinishReason.ABORT:
                yield convert.output_to_proto(
                    RequestOutput(call.request_id, [0], finish_reason=reason), decision.tier
                )
            finished = True
        finally:
            self.running.pop(call.request_id, None)
            if not finished:  # the client went away: gRPC closed this generator mid-stream
                self.cancelled.add(call.request_id)

    def Route(self, request: pb.RouteRequest, context: grpc.ServicerContext) -> pb.RouteResponse:
        try:
            inp = convert.route_input_from_proto(request, self.limits)
        except convert.RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return convert.route_response_to_proto(self.router.decide(inp), self.router.features(inp))

    def ListTiers(
        self, request: pb.ListTiersRequest, context: grpc.ServicerContext
    ) -> pb.ListTiersResponse:
        return convert.tiers_to_proto(CFG)

    def GetClusterStatus(self, request, context):  # type: ignore[no-untyped-def]
        return pb.GetClusterStatusResponse(
            cluster="test", tiers=[pb.TierStatus(name="fast", placement_epoch=3)]
        )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortResponse:
        event = self.running.get(request.request_id)
        if event is not None:
            event.set()
        return pb.AbortResponse(found=event is not None)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[EchoServicer, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = EchoServicer()
    pb_grpc.add_InferenceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait(5)


@pytest.fixture
def client(served: tuple[EchoServicer, str]) -> Iterator[MoerayClient]:
    with MoerayClient(served[1], timeout=20) as c:
        yield c


def test_generate_streams_deltas_with_route_first_and_finish_last(client: MoerayClient) -> None:
    deltas = list(client.generate("alpha beta gamma", max_tokens=3, request_id="g1"))
    assert [d.text for d in deltas] == ["alpha ", "beta ", "gamma "]
    assert [d.token_ids for d in deltas] == [[0], [1], [2]]
    assert deltas[0].route is not None and deltas[0].route.tier == "fast"
    assert all(d.route is None for d in deltas[1:])
    assert [d.finish_reason for d in deltas] == [None, None, FinishReason.LENGTH]
    assert deltas[-1].usage == Usage(1, 3) and {d.request_id for d in deltas} == {"g1"}


def test_generate_text_joins_the_stream(client: MoerayClient) -> None:
    res = client.generate_text(
        messages=[{"role": "user", "content": "Prove that sqrt 2 is irrational, rigorously."}],
        max_tokens=2,
    )
    assert res.text == "Prove that " and res.token_ids == [0, 1]
    assert res.tier == "reasoning" and res.route is not None and res.route.score >= 0.5
    assert res.finish_reason is FinishReason.LENGTH and res.usage.completion_tokens == 2


def test_route_list_tiers_status(client: MoerayClient) -> None:
    d = client.route("Think step by step and prove there are infinitely many primes.")
    assert d.tier == "reasoning" and "threshold" in d.reason
    assert client.route("hi!", tier="reasoning").tier == "reasoning"
    assert client.route(prompt_token_ids=[1, 2, 3]).tier == "fast"
    feats = client.route_features("hello there")
    assert "length" in feats.features and feats.route.tier == "fast"
    tiers = client.list_tiers()
    assert [t.name for t in tiers.tiers] == ["fast", "reasoning"]
    assert client.cluster_status().tiers[0].placement_epoch == 3


def test_invalid_request_maps_to_invalid_request_naming_the_field(client: MoerayClient) -> None:
    with pytest.raises(InvalidRequest) as e:
        list(client.generate("x", temperature=-1.0))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details.startswith("sampling.temperature ")
    with pytest.raises(InvalidRequest, match="tier"):
        client.route("x", tier="warp")
    with pytest.raises(Overloaded):
        client.generate_text("overload")
    with pytest.raises(ValueError, match="input"):
        client.generate("a", prompt_token_ids=[1])  # refused before anything is sent


def test_abort_and_early_exit_stop_the_server(
    served: tuple[EchoServicer, str], client: MoerayClient
) -> None:
    servicer, _ = served
    stream = client.generate("slow words here", max_tokens=2000, request_id="ab1")
    first = next(stream)
    assert first.text == "slow "
    assert client.abort("ab1") is True
    rest = list(stream)
    assert rest[-1].finish_reason is FinishReason.ABORT
    assert client.abort("never-started") is False
    # breaking out of the loop cancels the RPC, and the server notices
    stream = client.generate("slow again", max_tokens=2000, request_id="ab2")
    next(stream)
    stream.close()
    deadline = time.monotonic() + 10
    while "ab2" not in servicer.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "ab2" in servicer.cancelled


def test_unreachable_server_is_a_clean_error() -> None:
    with MoerayClient("127.0.0.1:1", timeout=2) as c, pytest.raises(MoerayError) as e:
        c.list_tiers()
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_async_client_does_what_the_blocking_one_does(served: tuple[EchoServicer, str]) -> None:
    """AsyncMoerayClient (grpc.aio) against the same server: the same deltas, answers and
    errors, and leaving a stream early (or Abort) stops the server's generation."""
    servicer, target = served

    async def main() -> None:
        async with AsyncMoerayClient(target, timeout=20) as c:
            deltas = [d async for d in c.generate("alpha beta gamma", max_tokens=3,
                                                  request_id="a1")]  # fmt: skip
            with MoerayClient(target, timeout=20) as blocking:
                want = list(blocking.generate("alpha beta gamma", max_tokens=3, request_id="a1"))
            assert deltas == want and deltas[-1].finish_reason is FinishReason.LENGTH
            res = await c.generate_text(messages=[{"role": "user", "content": "a b c"}],
                                        max_tokens=2)  # fmt: skip
            assert (res.text, res.token_ids, res.usage) == ("a b ", [0, 1], Usage(1, 2))
            route = await c.route("Think step by step and prove there are infinitely many primes.")
            assert route.tier == "reasoning"
            assert [t.name for t in (await c.list_tiers()).tiers] == ["fast", "reasoning"]
            assert (await c.cluster_status()).tiers[0].placement_epoch == 3
            with pytest.raises(InvalidRequest) as e:
                await c.generate_text("x", temperature=-1.0)
            assert e.value.details.startswith("sampling.temperature ")
            with pytest.raises(Overloaded):
                await c.generate_text("overload")
            stream = c.generate("slow words here", max_tokens=2000, request_id="aa1")
            assert (await anext(stream)).text == "slow "
            assert await c.abort("aa1") is True
            assert [d async for d in stream][-1].finish_reason is FinishReason.ABORT
            async for _ in c.generate("slow again", max_tokens=2000, request_id="aa2"):
                break  # leaving early cancels the RPC
            deadline = time.monotonic() + 10
            while "aa2" not in servicer.cancelled and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert "aa2" in servicer.cancelled

    asyncio.run(main())
