"""An asyncio front for LLMEngine: the step loop on a background thread, deltas streamed per request.

`generate()` validates and tokenizes on the caller's thread (so bad input raises ValueError and a
full queue raises EngineOverloaded before anything is queued), then hands the request to the engine
thread through a command deque. The engine thread drains commands between steps (the engine is only
ever touched by that thread), steps while there is work, and sends each step's outputs back to the
event loops with one `call_soon_threadsafe` per loop per step (a consumer that fell behind
gets the steps it missed merged into one output, so a slow reader costs fewer messages). A consumer that stops iterating, or
whose task is cancelled, aborts its request: the abort reaches the engine before its next step and
the request's KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

from moeray.cluster.config import EngineConfig
from moeray.workers.engine import LLMEngine, StatsSnapshot
from moeray.workers.io_struct import FinishReason, InvalidRequest, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
_IDLE_WAIT_S = 0.5  # the idle loop re-checks its stop flag this often


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the front door answers RESOURCE_EXHAUSTED / HTTP 429."""


class _Stream:
    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()


class AsyncLLMEngine:
    """build: makes the LLMEngine; it runs on the engine thread, which then owns the engine.

    Building there matters on CPU: torch's OpenMP pool belongs to the thread that starts a
    parallel region, so a model loaded on one thread and stepped on another leaves two pools in
    the process, more OpenMP threads than cores, and libgomp then has idle workers sleep almost
    at once instead of spinning between the hundreds of short parallel regions of a step:
    a decode step of the bench model at 10 sequences took 64 ms instead of 35-38 ms
    (docs/BENCHMARKS.md, "OpenMP's wait policy"). Raises what `build` raised.
    """

    def __init__(self, build: Callable[[], LLMEngine]) -> None:
        self._commands: deque[tuple[str, str, Any, Any]] = deque()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and the pending-add count
        self._pending_adds = 0
        self._wake = threading.Event()
        self._stopping = False
        built: Future[LLMEngine] = Future()  # completed by the thread once `build` ends
        self._thread = threading.Thread(
            target=self._run, args=(build, built), name="moeray-engine", daemon=True
        )
        self._thread.start()
        try:
            self.engine = built.result()
        except BaseException:
            self._thread.join()  # it returned right after the failed build
            raise
        self.tokenizer = self.engine.tokenizer
        self._max_queue = self.engine.config.max_queue

    @classmethod
    def from_pretrained(
        cls, model_path: str | Path, config: EngineConfig | None = None, dtype: str = "auto"
    ) -> AsyncLLMEngine:
        return cls(lambda: LLMEngine(model_path, config, dtype=dtype))

    # ---- caller side (any thread with a running event loop) ----------------------------------

    def generate(
        self,
        request_id: str,
        prompt: str | list[int] | Messages,
        params: SamplingParams | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queues a request; iterate the result for RequestOutput deltas (last one finished).

        Raises InvalidRequest (bad input, naming the field), EngineOverloaded (queue full) or
        RuntimeError (engine shut down) right away, before anything is queued. The input is
        checked and tokenized here, once, on the caller's thread (never the engine's).
        """
        return self.submit(request_id, *self.prepare(prompt, params))

    def prepare(
        self,
        prompt: str | list[int] | Messages,
        params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[list[int], SamplingParams]:
        """(prompt token ids, checked params); InvalidRequest naming the field otherwise.
        tools: function specs the chat template shows the model (chat messages only).
        Safe on any thread: workers/engine_service.py runs it on a worker thread for long
        inputs, so that tokenizing never holds up the deltas of other streams."""
        return self.engine.process_input(self.render(prompt, tools), params)

    def submit(
        self, request_id: str, ids: list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queues a request `prepare` has checked (as `generate` does); on the event loop."""
        if self._stopping:
            raise RuntimeError("the engine is shut down")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequest("request_id", f"{request_id!r} is already in use")
            if self._queued() >= self._max_queue:
                raise EngineOverloaded(
                    f"the engine's waiting queue is full (max_queue={self._max_queue})"
                )
            self._streams[request_id] = stream
            self._pending_adds += 1
        self._commands.append(("add", request_id, ids, params))
        self._wake.set()
        return self._iterate(request_id, stream)

    def render(
        self, prompt: str | list[int] | Messages, tools: list[dict[str, Any]] | None = None
    ) -> str | list[int]:
        """Chat messages (and the tools offered) -> the token ids of the chat template; text
        and ids pass through."""
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            messages = cast("Messages", prompt)
            size = sum(len(str(m.get("content", ""))) for m in messages)
            if size > self.engine.max_prompt_bytes:  # refused before rendering and tokenizing
                raise InvalidRequest(
                    "messages", f"hold over {self.engine.max_prompt_bytes} characters; no text "
                    f"that long fits the context of {self.engine.max_model_len} tokens",
                )  # fmt: skip
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tools=tools
            )
            # The template already holds the special tokens, as transformers encodes it.
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return cast("str | list[int]", prompt)

    def _queued(self) -> int:
        """Requests that would wait: queued ones beyond the free seats of the running batch."""
        sched = self.engine.scheduler
        free_seats = max(0, sched.max_num_seqs - len(sched.running))
        return max(0, len(sched.waiting) + self._pending_adds - free_seats)

    async def _iterate(
        self, request_id: str, stream: _Stream
    ) -> AsyncGenerator[RequestOutput, None]:
        finished = False
        pending: RequestOutput | BaseException | None = None
        try:
            while True:
                item = pending if pending is not None else await stream.queue.get()
                pending = None
                # A consumer that fell behind gets the steps it missed as one message.
                while (
                    isinstance(item, RequestOutput) and not item.finished and stream.queue.qsize()
                ):
                    nxt = stream.queue.get_nowait()
                    if isinstance(nxt, BaseException):
                        pending = nxt
                        break
                    item = _merged(item, nxt)
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # consumer stopped early or was cancelled
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request (its stream ends with FinishReason.ABORT); unknown ids are ignored."""
        self._commands.append(("abort", request_id, None, None))
        self._wake.set()

    def stats(self) -> StatsSnapshot:
        """The engine's load and prefix-cache counters, read without stopping the engine."""
        s = self.engine.stats()
        s["waiting"] += self._pending_adds
        return s

    @property
    def alive(self) -> bool:
        """False once the engine's step thread has stopped (shut down, or crashed)."""
        return self._thread.is_alive()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stops the loop; every unfinished request ends with FinishReason.ABORT."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self, build: Callable[[], LLMEngine], built: Future[LLMEngine]) -> None:
        try:
            engine = build()
        except BaseException as e:  # handed to the constructor, which raises it
            built.set_exception(e)
            return
        built.set_result(engine)
        while not self._stopping:
            self._drain_commands()
            if not engine.has_unfinished():
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception as e:  # a model bug must not hang every stream
                log.exception("engine step failed; aborting its requests")
                self._fail_all(e)
                continue
            self._deliver(outputs)
        self._drain_commands()
        self._deliver([o for rid in list(self._streams) if (o := engine.abort(rid))])
        self._fail_all(RuntimeError("the engine is shut down"))

    def _drain_commands(self) -> None:
        while self._commands:
            kind, rid, ids, params = self._commands.popleft()
            if kind == "add":
                try:
                    self.engine.add_processed(rid, ids, params, stream=True)
                except Exception as e:  # reaches the caller's stream; the loop carries on
                    self._deliver_error(rid, e)
                with self._lock:  # after the add: counted twice for a moment, never zero times
                    self._pending_adds -= 1
            else:
                out = self.engine.abort(rid)
                if out is not None:
                    self._deliver([out])

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """One call_soon_threadsafe per event loop for the whole step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_put_all, items)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _fail_all(self, error: BaseException) -> None:
        for rid in list(self._streams):
            self.engine.abort(rid)  # None when it never reached the engine: nothing to free
            self._deliver_error(rid, error)


def _merged(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: b, with a's deltas in front."""
    return dataclasses.replace(
        b,
        delta_token_ids=a.delta_token_ids + b.delta_token_ids,
        delta_text=a.delta_text + b.delta_text,
        delta_logprobs=None
        if b.delta_logprobs is None
        else (a.delta_logprobs or []) + b.delta_logprobs,
    )


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, out in items:
        stream.queue.put_nowait(out)


__all__ = ["AsyncLLMEngine", "EngineOverloaded", "FinishReason"]
