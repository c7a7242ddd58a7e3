"""The router <-> engine transport over a real ZeroMQ connection on loopback: streams equal the
offline engine's, refusals carry their field as data, and every way a call can end early (cancel,
deadline, a router that goes away) frees the request's KV blocks."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from moeray.cluster.config import EngineConfig
from moeray.cluster.redis_server import free_port
from moeray.router.engine_links import EngineCallError, EngineClient
from moeray.workers import LLM, FinishReason, SamplingParams
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.engine import LLMEngine
from moeray.workers.engine_service import (
    ERROR,
    EVENT,
    GENERATE,
    HEARTBEAT_TIMEOUT_MS,
    EngineService,
    configure,
    decode_error,
    decode_event,
    encode,
    tcp_endpoint,
)
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


def test_a_step_of_many_streams_reaches_the_router_as_one_message(path: Path) -> None:
    """Eight streams decoding together: each engine step's deltas for one router go out as one
    ZeroMQ message of several answers (three frames each), not one message per delta."""
    engine = AsyncLLMEngine(lambda: LLMEngine(path, EngineConfig(max_num_seqs=8)))
    service = EngineService(engine, lambda: pytest.fail("not asked"), TOKEN)
    service.start()
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    async def main() -> tuple[int, dict[bytes, list[int]]]:
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.connect(f"tcp://{service.address}")
        tokens: dict[bytes, list[int]] = {}
        messages, finished = 0, 0
        try:
            for i in range(8):
                body = encode(request(f"b{i}", [5 + i, 6, 7], params))
                await raw.send_multipart([GENERATE, TOKEN.encode(), b"b%d" % i, body])
            while finished < 8:
                frames = await asyncio.wait_for(raw.recv_multipart(), 30)
                messages += 1
                assert len(frames) % 3 == 0, frames
                for call_id, kind, body in zip(frames[::3], frames[1::3], frames[2::3]):
                    assert kind == EVENT
                    delta = decode_event(body)
                    assert isinstance(delta, GenerateDelta)
                    tokens.setdefault(call_id, []).extend(delta.delta_token_ids)
                    finished += delta.finish_reason is not None
        finally:
            ctx.destroy(linger=0)
        return messages, tokens

    try:
        messages, tokens = asyncio.run(main())
    finally:
        service.close()
        engine.shutdown()
    assert sorted(tokens) == [b"b%d" % i for i in range(8)]
    assert all(len(t) == 16 for t in tokens.values()), tokens
    assert messages <= 128 // 4, f"{messages} messages for 128 deltas"


def test_a_consumer_that_falls_behind_gets_the_deltas_it_missed_as_one(
    path: Path, served: tuple[AsyncLLMEngine, EngineService]
) -> None:
    """The router's side merges what queued while its consumer was busy (a slow client): the
    same tokens, text and logprobs, in fewer events; the prompt's fields stay on the first."""
    _, service = served
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
    [want] = LLM(model=path).generate(["Hello world"], params)

    async def main() -> list[Any]:
        client = EngineClient("r0", service.address, TOKEN)
        try:
            stream = client.generate(request("slow", "Hello world", params), 30)
            it = stream.__aiter__()
            events = [await anext(it)]
            await asyncio.sleep(1.0)  # the engine finishes meanwhile: 39 deltas queue up
            return events + [e async for e in it]
        finally:
            await client.close()

    events = asyncio.run(main())
    assert all(isinstance(e, GenerateDelta) for e in events)
    assert len(events) <= 3, [len(e.delta_token_ids) for e in events]
    assert [t for e in events for t in e.delta_token_ids] == want.token_ids
    assert "".join(e.delta_text for e in events) == want.text
    assert [lp for e in events for lp in e.delta_logprobs] == want.logprobs
    assert events[0].prompt_token_ids == want.prompt_token_ids
    assert all(e.prompt_token_ids is None for e in events[1:])
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].completion_tokens == 40


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

    async def main() -> str:
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
            except EngineCallError as e:
                await wait_idle(engine)  # the deadline aborted it on the engine as well
                return e.code
            raise AssertionError("a 400-token request finished within 0.3 s")
        finally:
            await client.close()

    assert asyncio.run(main()) == "deadline_exceeded"


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

    async def main() -> tuple[EngineStats, str, list[Any]]:
        good = EngineClient("r0", service.address, TOKEN)
        bad = EngineClient("r0", service.address, "wrong")
        try:
            stats = await good.stats()
            try:
                await collect(bad, request("x", "hi", PARAMS))
                raise AssertionError("a call with the wrong token was served")
            except EngineCallError as e:
                code = e.code
            # Garbage bytes where a GenerateRequest belongs, and frames of no known kind, from
            # a raw socket: answered, naming no internal class, and the service keeps serving.
            ctx = zmq.asyncio.Context()
            raw = ctx.socket(zmq.DEALER)
            raw.connect(f"tcp://{service.address}")
            answers = []
            try:
                await raw.send_multipart([GENERATE, TOKEN.encode(), b"c1", b"\xff\x00garbage"])
                answers.append(await asyncio.wait_for(raw.recv_multipart(), 10))
                await raw.send_multipart([b"?", TOKEN.encode(), b"c2"])
                answers.append(await asyncio.wait_for(raw.recv_multipart(), 10))
                await raw.send_multipart([b"short"])  # no call id to answer on: ignored
            finally:
                ctx.destroy(linger=0)
            await collect(good, request("after", "hi", PARAMS))
            return stats, code, answers
        finally:
            await good.close()
            await bad.close()

    stats, code, answers = asyncio.run(main())
    assert stats.total_blocks > 0 and stats.free_blocks == stats.total_blocks
    assert code == "unauthenticated"
    (c1, kind1, body1), (c2, kind2, body2) = answers
    rejected = decode_event(body1)
    assert (c1, kind1) == (b"c1", EVENT) and isinstance(rejected, GenerateRejected)
    assert rejected.kind == "invalid" and "Error" not in rejected.message
    assert (c2, kind2) == (b"c2", ERROR) and decode_error(body2).code == "invalid"


def _silent_engine(port: int, listening: Any) -> None:
    """A peer that accepts the connection and reads calls but never answers (then gets frozen)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    configure(sock)
    sock.bind(f"tcp://127.0.0.1:{port}")
    listening.set()
    while True:
        sock.recv_multipart()


def test_a_frozen_engine_is_noticed_by_heartbeats() -> None:
    """An engine replica that stops answering without closing its socket (a node that vanished,
    here a SIGSTOPped process): the open call fails "unavailable" once the ZMTP heartbeats time
    out, not at the OS's TCP timeout."""
    port, mp = free_port(), multiprocessing.get_context("spawn")
    listening = mp.Event()
    peer = mp.Process(target=_silent_engine, args=(port, listening))
    peer.start()
    assert listening.wait(60), "the peer did not start"

    async def main() -> tuple[str, float]:
        client = EngineClient("r0", f"127.0.0.1:{port}", TOKEN)
        try:
            stream = client.generate(request("h", "hi", PARAMS), None)
            events = stream.__aiter__()
            first = asyncio.ensure_future(anext(events))
            deadline = time.monotonic() + 30
            while not client._calls:  # sent: the connection is up
                assert time.monotonic() < deadline and not first.done()
                await asyncio.sleep(0.05)
            os.kill(peer.pid or 0, signal.SIGSTOP)
            frozen = time.monotonic()
            with pytest.raises(EngineCallError) as info:
                await asyncio.wait_for(first, HEARTBEAT_TIMEOUT_MS / 1000 + 10)
            return info.value.code, time.monotonic() - frozen
        finally:
            await client.close()

    try:
        code, after_s = asyncio.run(main())
    finally:
        peer.kill()
        peer.join(10)
    assert code == "unavailable"
    assert after_s <= HEARTBEAT_TIMEOUT_MS / 1000 + 3, after_s


def test_an_answer_that_is_no_message_fails_the_call_not_the_connection() -> None:
    """A peer (a broken or foreign engine) answering with bytes that decode to nothing: the call
    ends with an "internal" EngineCallError naming it, and the connection keeps serving."""

    async def main() -> tuple[str, str, int]:
        ctx = zmq.asyncio.Context()
        peer = ctx.socket(zmq.ROUTER)
        port = peer.bind_to_random_port("tcp://127.0.0.1")

        async def answer() -> None:
            while True:
                who, kind, _, call_id, *_ = await peer.recv_multipart()
                reply = EVENT if kind == GENERATE else b"S"
                await peer.send_multipart([who, call_id, reply, b"\xc1 not msgpack"])

        server = asyncio.create_task(answer())
        client = EngineClient("r0", f"127.0.0.1:{port}", TOKEN)
        try:
            with pytest.raises(EngineCallError) as generate_error:
                await collect(client, request("g", "hi", PARAMS), timeout_s=10)
            with pytest.raises(EngineCallError) as stats_error:
                await client.stats(timeout_s=10)
            return generate_error.value.code, stats_error.value.code, client.inflight
        finally:
            await client.close()
            server.cancel()
            ctx.destroy(linger=0)

    assert asyncio.run(main()) == ("internal", "internal", 0)


def test_an_ipv6_engine_address(path: Path, served: tuple[AsyncLLMEngine, EngineService]) -> None:
    """A node whose address is IPv6 (announced unbracketed, as `host:port`) serves the same."""
    engine, _ = served
    service = EngineService(engine, lambda: pytest.fail("not asked"), TOKEN, host="::1")
    address = service.start()
    assert address.startswith("::1:") and tcp_endpoint(address) == f"tcp://[::1]:{service.port}"

    async def main() -> list[Any]:
        client = EngineClient("r6", address, TOKEN)
        try:
            return await collect(client, request("v6", "Hello world", PARAMS))
        finally:
            await client.close()

    try:
        events = asyncio.run(main())
    finally:
        service.close()
    (want,) = LLM(model=path).generate(["Hello world"], PARAMS)
    assert [t for e in events for t in e.delta_token_ids] == want.token_ids
