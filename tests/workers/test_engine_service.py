"""The router <-> engine transport over a real gRPC channel on loopback: streams equal the offline
engine's, refusals carry their field as data, and every way a call can end early (cancel,
deadline, a dropped channel) frees the request's KV blocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from moeray.cluster.config import EngineConfig
from moeray.router.engine_links import EngineClient
from moeray.workers import LLM, FinishReason, SamplingParams
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.engine import LLMEngine
from moeray.workers.engine_service import GENERATE, EngineService
from moeray.workers.io_struct import (
    ChatMessage,
    EngineStats,
    GenerateDelta,
    GenerateRejected,
    GenerateRequest,
)

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def path(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("mixtral")


@pytest.fixture
def served(path: Path) -> Iterator[tuple[AsyncLLMEngine, EngineService]]:
    engine = AsyncLLMEngine(lambda: LLMEngine(path, EngineConfig(max_queue=2, max_num_seqs=2)))

    def stats() -> EngineStats:
        s = engine.stats()
        return EngineStats("r0", "node", "cpu", s["running"], s["waiting"], s["free_blocks"],
                           s["total_blocks"], engine.engine.max_model_len)  # fmt: skip

    service = EngineService(engine, stats, TOKEN)
    service.start()
    try:
        yield engine, service
    finally:
        service.close()
        engine.shutdown()


def request(rid: str, prompt: Any, params: SamplingParams) -> GenerateRequest:
    if isinstance(prompt, str):
        return GenerateRequest(rid, params, prompt=prompt)
    if prompt and isinstance(prompt[0], ChatMessage):
        return GenerateRequest(rid, params, messages=prompt)
    return GenerateRequest(rid, params, prompt_token_ids=prompt)


async def collect(client: EngineClient, req: GenerateRequest, timeout_s: float = 30) -> list[Any]:
    return [e async for e in client.generate(req, timeout_s)]


async def wait_idle(engine: AsyncLLMEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == s["waiting"] == 0 and s["free_blocks"] == s["total_blocks"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"KV blocks not freed: {engine.stats()}")


def test_streams_equal_the_offline_engine(
    path: Path, served: tuple[AsyncLLMEngine, EngineService]
) -> None:
    _, service = served
    prompts: list[Any] = ["Hello world", [5, 6, 7], [ChatMessage("user", "hi")]]
    offline = LLM(model=path).generate(prompts[:2], PARAMS)

    async def main() -> list[list[Any]]:
        client = EngineClient("r0", service.address, TOKEN)
        try:
            return list(await asyncio.gather(
                *(collect(client, request(f"r{i}", p, PARAMS)) for i, p in enumerate(prompts))
            ))  # fmt: skip
        finally:
            await client.close()

    results = asyncio.run(main())
    for events, want in zip(results, offline):
        assert all(isinstance(e, GenerateDelta) for e in events)
        assert [t for e in events for t in e.delta_token_ids] == want.token_ids
        assert "".join(e.delta_text for e in events) == want.text
        assert events[0].prompt_token_ids == want.prompt_token_ids
        assert all(e.prompt_token_ids is None for e in events[1:])  # deltas only
        last = events[-1]
        assert last.finish_reason is FinishReason.LENGTH
        assert last.completion_tokens == 10 and last.prompt_tokens == len(want.prompt_token_ids)
        assert last.engine_time_s > 0 and all(e.finish_reason is None for e in events[:-1])
    assert results[2][-1].completion_tokens == 10  # chat messages went through the template


def test_refusals_carry_the_field(served: tuple[AsyncLLMEngine, EngineService]) -> None:
    engine, service = served

    async def main() -> dict[str, list[Any]]:
        client = EngineClient("r0", service.address, TOKEN)
        out: dict[str, list[Any]] = {}
        try:
            out["max_tokens"] = await collect(
                client, request("a", "hi", SamplingParams(max_tokens=10**6))
            )
            out["empty"] = await collect(client, request("b", [], PARAMS))
            # Values only a hand-made message could carry: the engine validates them too.
            out["temperature"] = await collect(
                client, request("c", "hi", SamplingParams(max_tokens=3, temperature=-1.0))
            )
            out["two_inputs"] = await collect(
                client, GenerateRequest("d", PARAMS, prompt="hi", prompt_token_ids=[1, 2])
            )
            # Fill the running seats (2) and the queue (2): one more is refused as overloaded.
            streams = [client.generate(request(f"q{i}", "hi", LONG), 30) for i in range(4)]
            iters = [s.__aiter__() for s in streams]
            firsts = [asyncio.ensure_future(anext(it)) for it in iters]
            await asyncio.sleep(0.5)
            out["over"] = await collect(client, request("z", "hi", PARAMS))
            for s in streams:
                s.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            await wait_idle(engine)
        finally:
            await client.close()
        return out

    out = asyncio.run(main())
    for key, field in (("max_tokens", "max_tokens"), ("empty", "prompt"),
                       ("temperature", "temperature"), ("two_inputs", "input")):  # fmt: skip
        [rejected] = out[key]
        assert isinstance(rejected, GenerateRejected), key
        assert (rejected.kind, rejected.field) == ("invalid", field), rejected
    [over] = out["over"]
    assert isinstance(over, GenerateRejected) and over.kind == "overloaded"
    assert "max_queue=2" in over.message


def test_cancel_and_deadline_free_kv_blocks(served: tuple[AsyncLLMEngine, EngineService]) -> None:
    engine, service = served

    async def main() -> grpc.StatusCode:
        client = EngineClient("r0", service.address, TOKEN)
        try:
            stream = client.generate(request("c1", "hi", LONG), 30)
            it = stream.__aiter__()
            first = await anext(it)
            assert isinstance(first, GenerateDelta)
            assert engine.stats()["running"] == 1
            stream.cancel()  # the client stops: the engine aborts the request
            await wait_idle(engine)
            assert client.inflight == 0
            try:
                await collect(client, request("c2", "hi", LONG), timeout_s=0.3)
            except grpc.aio.AioRpcError as e:
                await wait_idle(engine)  # the deadline aborted it on the engine as well
                return e.code()
            raise AssertionError("a 400-token request finished within 0.3 s")
        finally:
            await client.close()

    assert asyncio.run(main()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_dropped_channel_frees_kv_blocks(served: tuple[AsyncLLMEngine, EngineService]) -> None:
    engine, service = served

    async def main() -> None:
        client = EngineClient("r0", service.address, TOKEN)
        streams = [client.generate(request(f"d{i}", "hi", LONG), 30) for i in range(2)]
        iters = [s.__aiter__() for s in streams]
        for it in iters:
            await anext(it)
        await client.close()  # the router replica goes away mid-stream
        await wait_idle(engine)

    asyncio.run(main())


def test_stats_and_wrong_token(served: tuple[AsyncLLMEngine, EngineService]) -> None:
    _, service = served

    async def main() -> tuple[EngineStats, grpc.StatusCode, grpc.StatusCode]:
        good = EngineClient("r0", service.address, TOKEN)
        bad = EngineClient("r0", service.address, "wrong")
        try:
            stats = await good.stats()
            try:
                await collect(bad, request("x", "hi", PARAMS))
                raise AssertionError("a call with the wrong token was served")
            except grpc.aio.AioRpcError as e:
                code = e.code()
            # Garbage bytes where a GenerateRequest belongs: refused, naming no internal class.
            raw = good.channel.unary_stream(GENERATE)
            events = [
                e
                async for e in raw(b"\xff\x00garbage", metadata=(("x-moeray-engine-token", TOKEN),))
            ]
            return stats, code, grpc.StatusCode.OK if events else grpc.StatusCode.UNKNOWN
        finally:
            await good.close()
            await bad.close()

    stats, code, garbage = asyncio.run(main())
    assert stats.total_blocks > 0 and stats.free_blocks == stats.total_blocks
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert garbage == grpc.StatusCode.OK  # one GenerateRejected came back
