"""The engine's direct channel over real loopback TCP: streams equal the engine's own, refusals
arrive as RequestRejected, and every way a stream can end early frees the KV blocks."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from moeray.cluster.config import EngineConfig
from moeray.workers import LLM, FinishReason, SamplingParams
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.engine import LLMEngine
from moeray.workers.engine_channel import (
    ChannelError,
    EngineChannelServer,
    EngineLink,
    StreamCancelled,
)
from moeray.workers.io_struct import RequestOutput, RequestRejected

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def path(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("mixtral")


@pytest.fixture
def served(path: Path) -> Iterator[tuple[AsyncLLMEngine, EngineChannelServer]]:
    engine = AsyncLLMEngine(LLMEngine(path, EngineConfig(max_queue=2, max_num_seqs=2)))
    server = EngineChannelServer(engine, TOKEN)
    server.start()
    try:
        yield engine, server
    finally:
        server.close()
        engine.shutdown()


async def collect(link: EngineLink, rid: str, prompt: Any, params: SamplingParams) -> list[Any]:
    return [item async for item in link.generate(rid, prompt, params)]


async def wait_idle(engine: AsyncLLMEngine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == s["waiting"] == 0 and s["free_blocks"] == s["total_blocks"]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"KV blocks not freed: {engine.stats()}")


def test_streams_equal_the_offline_engine(
    path: Path, served: tuple[AsyncLLMEngine, EngineChannelServer]
) -> None:
    _, server = served
    prompts: list[Any] = ["Hello world", [5, 6, 7], [{"role": "user", "content": "hi"}]]
    offline = LLM(model=path).generate(prompts[:2], PARAMS)

    async def main() -> list[list[Any]]:
        link = EngineLink(server.address, TOKEN)
        try:
            return list(await asyncio.gather(
                *(collect(link, f"r{i}", p, PARAMS) for i, p in enumerate(prompts))
            ))  # fmt: skip
        finally:
            await link.close()

    results = asyncio.run(main())
    for outs, want in zip(results, offline):
        assert all(isinstance(o, RequestOutput) for o in outs)
        last = outs[-1]
        assert [t for o in outs for t in o.delta_token_ids] == want.token_ids
        assert last.token_ids == want.token_ids and last.text == want.text
        assert "".join(o.delta_text for o in outs) == want.text
        assert last.prompt_token_ids == want.prompt_token_ids
        assert last.finish_reason is FinishReason.LENGTH
        assert last.usage.completion_tokens == 10
        assert last.usage.prompt_tokens == len(want.prompt_token_ids)
        assert last.engine_time_s > 0 and all(o.finish_reason is None for o in outs[:-1])
    assert results[2][-1].usage.completion_tokens == 10  # chat messages went through the template


def test_refusals_name_the_field(served: tuple[AsyncLLMEngine, EngineChannelServer]) -> None:
    engine, server = served

    async def main() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
        link = EngineLink(server.address, TOKEN)
        try:
            too_long = await collect(link, "a", "hi", SamplingParams(max_tokens=10**6))
            empty = await collect(link, "b", [], PARAMS)
            # A SamplingParams that only the wire could carry: the server validates again.
            bad = SamplingParams(max_tokens=3)
            bad.temperature = -1.0
            negative = await collect(link, "c", "hi", bad)
            # Fill the running seats (2) and the queue (2), then one more is refused.
            streams = [link.generate(f"q{i}", "hi", LONG) for i in range(4)]
            iters = [s.__aiter__() for s in streams]
            firsts = [asyncio.ensure_future(it.__anext__()) for it in iters]
            await asyncio.sleep(0.3)
            over = await collect(link, "z", "hi", PARAMS)
            for s in streams:
                s.cancel()
            for f in firsts:
                f.cancel()
            await asyncio.gather(*firsts, return_exceptions=True)
            for it in iters:
                await it.aclose()  # type: ignore[attr-defined]
            await wait_idle(engine)
            return too_long, empty, negative, over
        finally:
            await link.close()

    too_long, empty, negative, over = asyncio.run(main())
    for outs, kind, field in ((too_long, "invalid", "max_tokens"), (empty, "invalid", "prompt"),
                              (negative, "invalid", "temperature"),
                              (over, "overloaded", "max_queue")):  # fmt: skip
        assert len(outs) == 1 and isinstance(outs[0], RequestRejected)
        assert outs[0].kind == kind and field in outs[0].message


def test_cancel_and_disconnect_free_the_kv_blocks(
    served: tuple[AsyncLLMEngine, EngineChannelServer],
) -> None:
    engine, server = served

    async def main() -> None:
        link = EngineLink(server.address, TOKEN)
        # 1. cancel() (the Abort RPC): the iterator raises StreamCancelled, the engine aborts.
        stream = link.generate("c1", "hello", LONG)
        got = 0
        with pytest.raises(StreamCancelled):
            async for _ in stream:
                got += 1
                if got == 3:
                    stream.cancel()
        await wait_idle(engine)
        # 2. breaking out of the loop (client went away) aborts too.
        async for _ in link.generate("c2", "hello", LONG):
            break
        await wait_idle(engine)
        # 3. the router's connection drops mid-stream: every request on it is aborted.
        it = link.generate("c3", "hello", LONG).__aiter__()
        await it.__anext__()
        await link.close()
        await wait_idle(engine)
        with pytest.raises(ChannelError):
            await it.__anext__()

    asyncio.run(main())
    assert server.connections == 1


def test_wrong_token_and_garbage_are_refused(
    served: tuple[AsyncLLMEngine, EngineChannelServer],
) -> None:
    engine, server = served

    async def main() -> None:
        link = EngineLink(server.address, "not-the-token")
        try:
            with pytest.raises(ChannelError):
                await collect(link, "x", "hi", PARAMS)
        finally:
            await link.close()

    asyncio.run(main())
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:  # an oversize frame
        s.sendall(struct.pack("!I", 2**31) + b"x")
        s.settimeout(5)
        assert s.recv(16) == b""  # the server hung up
    with socket.create_connection((host, int(port)), timeout=5) as s:  # not a hello
        payload = msgpack.packb(["gen", "r", "hi", {}])
        s.sendall(struct.pack("!I", len(payload)) + payload)
        s.settimeout(5)
        assert s.recv(16) == b""
    assert server.connections == 0 and engine.stats()["running"] == 0


def test_unreachable_engine_fails_before_any_output() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> tuple[bool, float]:
        link = EngineLink(f"127.0.0.1:{port}", TOKEN)
        stream = link.generate("r", "hi", PARAMS)
        with pytest.raises(ChannelError, match="cannot reach"):
            async for _ in stream:
                pass
        return stream.started, link.failed_at

    started, failed_at = asyncio.run(main())
    assert started is False and failed_at > 0  # so the router may still use the Serve handle
    with pytest.raises(ValueError, match="address"):
        EngineLink("no-port", TOKEN)


def test_server_shutdown_ends_open_streams(path: Path) -> None:
    engine = AsyncLLMEngine(LLMEngine(path, EngineConfig()))
    server = EngineChannelServer(engine, TOKEN)
    server.start()

    async def main() -> None:
        link = EngineLink(server.address, TOKEN)
        it = link.generate("r", "hello", LONG).__aiter__()
        await it.__anext__()
        await asyncio.to_thread(server.close)
        with pytest.raises(ChannelError):
            while True:
                await asyncio.wait_for(it.__anext__(), 10)
        await link.close()

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()
