"""AsyncLLMEngine: streamed deltas equal the offline result; abort, cancel and overload behave."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from moeray.cluster.config import EngineConfig
from moeray.workers import LLM, FinishReason, SamplingParams
from moeray.workers.async_engine import AsyncLLMEngine, EngineOverloaded
from moeray.workers.engine import LLMEngine

from tests.checkpoints import make_tiny_checkpoint

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck"), "mixtral")


def make_engine(path: Path, **config: object) -> AsyncLLMEngine:
    return AsyncLLMEngine(lambda: LLMEngine(path, EngineConfig(**config)))  # type: ignore[arg-type]


async def wait_until_idle(engine: AsyncLLMEngine, timeout_s: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = engine.stats()
        if s["running"] == s["waiting"] == 0 and s["free_blocks"] == s["total_blocks"]:
            return s
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine still busy: {engine.stats()}")


def test_the_engine_is_built_and_stepped_on_its_own_thread(path: Path) -> None:
    """One thread runs all of the engine's torch work, loading included (two threads with
    OpenMP pools of their own made every CPU decode step 1.7x slower)."""
    seen: list[threading.Thread] = []

    def build() -> LLMEngine:
        seen.append(threading.current_thread())
        return LLMEngine(path)

    engine = AsyncLLMEngine(build)
    try:
        assert len(seen) == 1 and seen[0] is not threading.current_thread()
        assert seen[0].name == "moeray-engine" and seen[0].is_alive() and engine.alive

        async def one() -> list[int]:
            ids: list[int] = []
            async for out in engine.generate("r", "Hello", PARAMS):
                ids += out.delta_token_ids
            return ids

        assert asyncio.run(one()) == LLM(model=path).generate(["Hello"], PARAMS)[0].token_ids
    finally:
        engine.shutdown()
    assert not seen[0].is_alive()


def test_a_failed_build_raises_from_the_constructor(path: Path) -> None:
    seen: list[threading.Thread] = []

    def build() -> LLMEngine:
        seen.append(threading.current_thread())
        return LLMEngine(path / "missing")

    with pytest.raises(Exception, match="missing"):
        AsyncLLMEngine(build)
    assert len(seen) == 1 and not seen[0].is_alive()  # the thread ended with its build


def test_streams_add_up_to_the_offline_result(path: Path) -> None:
    prompts = ["Hello world", "The quick brown fox", [5, 6, 7]]
    offline = LLM(model=path).generate(prompts, PARAMS)
    engine = make_engine(path)

    async def consume(i: int) -> tuple[list[int], str, object]:
        ids: list[int] = []
        text = ""
        last = None
        async for out in engine.generate(f"r{i}", prompts[i], PARAMS):
            ids += out.delta_token_ids
            text += out.delta_text
            last = out
        return ids, text, last

    async def main() -> list[tuple[list[int], str, object]]:
        return list(await asyncio.gather(*(consume(i) for i in range(3))))

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for (ids, text, last), want in zip(results, offline):
        assert ids == want.token_ids and text == want.text
        assert last.finish_reason is FinishReason.LENGTH  # type: ignore[attr-defined]
        assert last.usage.completion_tokens == 12  # type: ignore[attr-defined]


def test_chat_messages_use_the_chat_template(path: Path) -> None:
    engine = make_engine(path)
    messages = [{"role": "user", "content": "hi"}]
    tok = engine.tokenizer
    want = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
    try:
        assert engine.render(messages) == want
        assert want[0] == tok.encode("<|im_start|>")[0]
    finally:
        engine.shutdown()


def test_breaking_out_and_cancelling_abort_and_free_blocks(path: Path) -> None:
    engine = make_engine(path)

    async def main() -> None:
        stream = engine.generate("brk", [1, 2, 3], LONG)
        async for out in stream:
            if len(out.token_ids) >= 3:
                break
        await stream.aclose()
        await wait_until_idle(engine)

        async for out in engine.generate("gc", [1, 2, 3], LONG):
            if out.token_ids:
                break  # no reference kept: asyncio's async-generator finalizer closes it
        await wait_until_idle(engine)

        async def consume() -> None:
            async for _ in engine.generate("cnl", [4, 5, 6], LONG):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        assert engine.stats()["running"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until_idle(engine)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_full_queue_is_refused_immediately(path: Path) -> None:
    engine = make_engine(path, max_num_seqs=1, max_queue=1)

    async def main() -> None:
        first = engine.generate("a", [1, 2], LONG)  # takes the one seat
        second = engine.generate("b", [1, 2], LONG)  # waits
        with pytest.raises(EngineOverloaded, match="max_queue"):
            engine.generate("c", [1, 2], LONG)
        with pytest.raises(ValueError, match="already in use"):
            engine.generate("a", [1, 2], LONG)
        with pytest.raises(ValueError, match="prompt must not be empty"):
            engine.generate("d", "", LONG)
        engine.abort("a")
        engine.abort("b")
        for stream in (first, second):
            outs = [o async for o in stream]
            assert outs[-1].finish_reason is FinishReason.ABORT
        await wait_until_idle(engine)

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_shutdown_ends_open_streams_with_abort(path: Path) -> None:
    engine = make_engine(path)

    async def main() -> None:
        stream = engine.generate("s", [1, 2, 3], LONG)
        first = await stream.__anext__()
        assert not first.finished
        await asyncio.to_thread(engine.shutdown)
        rest = [o async for o in stream]
        assert rest[-1].finish_reason is FinishReason.ABORT
        with pytest.raises(RuntimeError, match="shut down"):
            engine.generate("t", [1], PARAMS)

    asyncio.run(main())
    assert not engine._thread.is_alive()
