"""The one transport between router replicas and engine replicas: an internal gRPC service.

    router replica                                       engine replica
    router/engine_links.py EngineClient ── grpc.aio ──▶ EngineService (own thread + event loop)
                                                          └ per call: AsyncLLMEngine.generate()

gRPC carries the calls (HTTP/2 multiplexing, flow control, cancellation, deadlines, keepalive,
connection loss as UNAVAILABLE); msgspec encodes the bodies, the typed messages of
workers/io_struct.py, so the engine never parses a protobuf and nothing travels as a loose dict.

    /moeray.internal.Engine/Generate   GenerateRequest -> stream of GenerateDelta (deltas only),
                                        or one GenerateRejected instead of any delta
    /moeray.internal.Engine/Stats      StatsRequest -> EngineStats

- Cancel, Abort and deadlines: the router cancels the call (or gRPC does when the call's deadline
  passes); gRPC then cancels this side's handler, whose engine stream aborts the request, so its
  KV blocks are freed before the engine's next step. A dropped connection does the same.
- Auth: every call carries the replica's token (announced in Redis beside its address) in the
  `x-moeray-engine-token` metadata; a call without it is refused with UNAUTHENTICATED.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import msgspec
from moeray.workers.async_engine import AsyncLLMEngine, EngineOverloaded
from moeray.workers.io_struct import (
    ChatMessage,
    EngineStats,
    GenerateDelta,
    GenerateEvent,
    GenerateRejected,
    GenerateRequest,
    InvalidRequest,
    RequestOutput,
    TokenLogprob,
)

log = logging.getLogger(__name__)

SERVICE = "moeray.internal.Engine"
GENERATE = f"/{SERVICE}/Generate"
STATS = f"/{SERVICE}/Stats"
TOKEN_KEY = "x-moeray-engine-token"
#: Times to first token kept for the TTFT p90 an engine replica reports (autoscaling).
TTFT_SAMPLES = 512
#: Text prompts longer than this are checked and tokenized on a worker thread, not the loop.
LONG_PROMPT_CHARS = 4096
#: Largest request accepted (a prompt of token ids or text is far below this).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: gRPC channel options both ends use: large messages, and keepalive pings so that a peer whose
#: node vanished (no FIN, no RST) is noticed in seconds, not after the OS's TCP timeout.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
]

encode = msgspec.msgpack.Encoder().encode
decode_request = msgspec.msgpack.Decoder(GenerateRequest).decode
decode_event = msgspec.msgpack.Decoder(GenerateEvent).decode  # type: ignore[arg-type]
decode_stats = msgspec.msgpack.Decoder(EngineStats).decode


class EngineService:
    """Serves one AsyncLLMEngine on host:port (0 = a free port) from a thread of its own.

    stats: builds this replica's EngineStats (the deployment knows its replica id and node).
    start() returns the address clients connect to; close() stops serving (open calls abort).
    """

    def __init__(
        self,
        engine: AsyncLLMEngine,
        stats: Callable[[], EngineStats],
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if not token:
            raise ValueError("token must be a non-empty string")
        self.engine, self._stats, self.token = engine, stats, token
        self.host, self.port = host, port
        #: Set while the replica is being removed: new calls are refused with UNAVAILABLE before
        #: anything starts, so the router sends them to another replica.
        self.draining = False
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=TTFT_SAMPLES)  # (time, ttft s)
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="moeray-engine-service",
                                        daemon=True)  # fmt: skip

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        try:
            future.result(timeout_s)
        except Exception as e:
            self.close()
            raise RuntimeError(f"the engine service could not listen on {self.address}: {e}") from e
        return self.address

    async def _start(self) -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        server.add_generic_rpc_handlers((self._handlers(),))
        self.port = server.add_insecure_port(f"{self.host}:{self.port}")
        await server.start()
        self._server = server

    def _handlers(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Generate": grpc.unary_stream_rpc_method_handler(
                    self._generate, response_serializer=encode
                ),
                "Stats": grpc.unary_unary_rpc_method_handler(
                    self._stats_call, response_serializer=encode
                ),
            },
        )

    def close(self, grace_s: float = 0.5, timeout_s: float = 5.0) -> None:
        """Stops serving: open calls end (their requests abort, freeing KV), then the thread."""
        if not self._thread.is_alive():
            return
        if self._server is not None:
            stop = asyncio.run_coroutine_threadsafe(self._server.stop(grace_s), self._loop)
            try:
                stop.result(timeout_s)
            except Exception as e:  # the loop is going away either way
                log.debug("engine service stop: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    # ---- calls (on this service's event loop) ------------------------------------------------

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        token = dict(context.invocation_metadata() or ()).get(TOKEN_KEY, "")
        if not (isinstance(token, str) and hmac.compare_digest(token, self.token)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong or missing engine token")

    async def _generate(
        self, body: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[GenerateEvent]:
        """Receives a GenerateRequest; sends GenerateDeltas (last one finished) or one
        GenerateRejected. Cancelling the call aborts the request on the engine."""
        start = time.perf_counter()
        await self._authorize(context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine replica is draining")
        try:
            req = decode_request(body)
            prompt = _prompt(req)
            if _is_long(prompt) or req.sampling.json_schema is not None:  # on a worker thread:
                # a long prompt's tokenizing or a schema's compiling; other streams keep flowing
                prepared = await asyncio.to_thread(
                    self.engine.prepare, prompt, req.sampling, req.tools
                )
            else:
                prepared = self.engine.prepare(prompt, req.sampling, req.tools)
            stream = self.engine.submit(req.request_id, *prepared)
        except msgspec.DecodeError as e:  # undecodable, or a field of the wrong type
            yield GenerateRejected("invalid", _path_field(e), str(e))
            return
        except InvalidRequest as e:
            yield GenerateRejected("invalid", e.field, e.message)
            return
        except EngineOverloaded as e:
            yield GenerateRejected("overloaded", "", str(e))
            return
        first = True
        try:
            async for out in stream:
                if first:
                    now = time.perf_counter()
                    self._ttfts.append((now, now - start))
                finished = out.finish_reason is not None
                yield GenerateDelta(
                    delta_token_ids=out.delta_token_ids,
                    delta_text=out.delta_text,
                    prompt_tokens=out.usage.prompt_tokens,
                    completion_tokens=out.usage.completion_tokens,
                    finish_reason=out.finish_reason,
                    prompt_token_ids=out.prompt_token_ids if first else None,
                    engine_time_s=time.perf_counter() - start if finished else 0.0,
                    delta_logprobs=out.delta_logprobs,
                    prompt_logprobs=self._prompt_logprobs(req, out) if first else None,
                    prompt_text=self._prompt_text(req, out) if first and req.echo else None,
                )
                first = False
        except InvalidRequest as e:  # refused on the engine thread (a duplicate request id)
            if not first:
                raise
            yield GenerateRejected("invalid", e.field, e.message)

    def ttft_p90(self, window_s: float = 30.0) -> float:
        """p90 of the times to first token of the calls that started in the last window_s."""
        since = time.perf_counter() - window_s
        recent = sorted(t for at, t in list(self._ttfts) if at >= since)
        return recent[int(0.9 * (len(recent) - 1))] if recent else 0.0

    def _prompt_logprobs(
        self, req: GenerateRequest, out: RequestOutput
    ) -> list[TokenLogprob | None] | None:
        """The prompt's logprobs as the engine gives them (None for the first token), except
        that an echoed request's first entry carries that token's text (logprob 0, no
        alternatives): the router has no tokenizer, and echo shows every prompt token."""
        entries = out.prompt_logprobs
        if entries is None or not req.echo:
            return entries
        first = out.prompt_token_ids[0]
        text = self.engine.tokenizer.decode([first], skip_special_tokens=False)
        return [TokenLogprob(first, text, 0.0, []), *entries[1:]]

    def _prompt_text(self, req: GenerateRequest, out: RequestOutput) -> str:
        """The prompt as text for echo: as given, or its token ids decoded (special tokens
        kept, as OpenAI echoes them)."""
        if req.prompt is not None:
            return req.prompt
        return self.engine.tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)

    async def _stats_call(self, body: bytes, context: grpc.aio.ServicerContext) -> EngineStats:
        """Receives a StatsRequest (empty); sends this replica's EngineStats."""
        await self._authorize(context)
        return self._stats()


def _prompt(req: GenerateRequest) -> str | list[int] | list[dict[str, Any]]:
    given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
    if sum(given) != 1:
        raise InvalidRequest("input", "must be exactly one of prompt, prompt_token_ids, messages")
    if req.messages is not None:
        return [_message(m) for m in req.messages]
    if req.prompt is not None:
        return req.prompt
    return list(req.prompt_token_ids or ())


def _message(m: ChatMessage) -> dict[str, Any]:
    """A chat turn as chat templates take it (tool fields only where set)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls is not None:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _is_long(prompt: str | list[int] | list[dict[str, Any]]) -> bool:
    """Worth a worker thread: text (or chat) beyond LONG_PROMPT_CHARS characters."""
    if isinstance(prompt, str):
        return len(prompt) > LONG_PROMPT_CHARS
    return sum(len(m["content"]) for m in prompt if isinstance(m, dict)) > LONG_PROMPT_CHARS


def _path_field(err: msgspec.DecodeError) -> str:
    """msgspec's "... - at `$.sampling.top_k`" -> "sampling.top_k" ("request" without a path)."""
    _, _, path = str(err).rpartition("at `$")
    return path.rstrip("`").lstrip(".") or "request"


def client_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The metadata every call to an engine replica carries."""
    return ((TOKEN_KEY, token),)


__all__ = [
    "GENERATE",
    "STATS",
    "EngineService",
    "client_metadata",
    "decode_event",
    "decode_stats",
    "encode",
]
