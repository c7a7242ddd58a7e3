"""The one transport between router replicas and engine replicas: ZeroMQ, msgspec bodies.

    router replica                                           engine replica
    router/engine_links.py EngineClient ── DEALER ─ tcp ─▶ ROUTER  EngineService (own thread +
                                                             event loop) └ per call: a task that
                                                             runs AsyncLLMEngine.submit()

As vLLM's V1 engine core does (pyzmq + msgspec), chosen by measurement over an internal grpc.aio
service (docs/BENCHMARKS.md, "Router <-> engine transport"): one request and its one-token answer
take 0.21 ms instead of 0.63 ms, and each streamed delta ~25 us of CPU on the two ends instead of
~135 us. The bodies are the typed messages of workers/io_struct.py, so the engine never parses a
protobuf and nothing travels as a loose dict.

Frames (one multipart message each; call_id is the router's name for a call, unique on its
connection):

    router -> engine   [GENERATE, token, call_id, GenerateRequest]
                       [ABORT, token, call_id]
                       [STATS, token, call_id]
    engine -> router   one or more answers, three frames each, in one message:
                       [call_id, EVENT, GenerateDelta]     deltas only; the last one has a
                                                           finish_reason
                       [call_id, EVENT, GenerateRejected]  instead of any delta
                       [call_id, STATS, EngineStats]
                       [call_id, ERROR, CallError]         the call ends without its answer

Batching: the engine thread hands a whole step's outputs to this loop at once, every call's task
wakes in the same loop iteration, and what they send to one router goes out as one message at
the end of it (as vLLM's engine core sends one EngineCoreOutputs per step): a step of 256
streams costs each end one ZeroMQ message, not 256.

- Cancel, abort and deadlines: the router sends ABORT (for a deadline, when its own timer fires);
  the call's task is cancelled, its engine stream aborts the request, and its KV blocks are freed
  before the engine's next step.
- A router replica that goes away: the ROUTER socket refuses to send to a peer it no longer has
  (ROUTER_MANDATORY), so the next message to it fails and its calls abort. An engine replica that
  goes away: the router's socket monitor sees the connection drop and fails every open call with
  "unavailable" (router/engine_links.py). ZMTP heartbeats close a connection whose peer stopped
  answering (a node that vanished without closing its sockets) within HEARTBEAT_TIMEOUT_MS.
- Auth: every message carries the replica's token (announced in Redis beside its address); one
  with another token is answered with CallError("unauthenticated").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio
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

# Message kinds (the first frame router -> engine, the second engine -> router).
GENERATE, ABORT, STATS = b"G", b"A", b"S"
EVENT, ERROR = b"E", b"X"
#: Times to first token kept for the TTFT p90 an engine replica reports (autoscaling).
TTFT_SAMPLES = 512
#: Text prompts longer than this are checked and tokenized on a worker thread, not the loop.
LONG_PROMPT_CHARS = 4096
#: Largest message accepted (a prompt of token ids or text is far below this); a peer that sends
#: a larger one is disconnected.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: ZMTP heartbeats on both ends: a peer that answers none for HEARTBEAT_TIMEOUT_MS is dropped.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 6_000


class CallError(msgspec.Struct, frozen=True):
    """Engine -> router: the call ended without its answer.

    code: "unauthenticated" (wrong token), "unavailable" (the replica is draining: retry
    elsewhere), "invalid" (a message that is not one), "internal" (the engine failed the call).
    """

    code: str
    message: str


encode = msgspec.msgpack.Encoder().encode
decode_request = msgspec.msgpack.Decoder(GenerateRequest).decode
decode_event = msgspec.msgpack.Decoder(GenerateEvent).decode  # type: ignore[arg-type]
decode_stats = msgspec.msgpack.Decoder(EngineStats).decode
decode_error = msgspec.msgpack.Decoder(CallError).decode


def configure(sock: zmq.Socket[Any]) -> None:
    """Socket options both ends use: nothing lingers or is dropped at a high-water mark, messages
    are bounded in size, and heartbeats notice a peer that vanished."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.IPV6, 1)  # IPv6 addresses too (IPv4 ones as before)


def tcp_endpoint(address: str) -> str:
    """An announced address, host:port (an IPv6 host unbracketed) -> a ZeroMQ TCP endpoint."""
    host, _, port = address.rpartition(":")
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{address}"


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
        self._token = token.encode()
        self.host, self.port = host, port
        #: Set while the replica is being removed: new calls are refused as "unavailable" before
        #: anything starts, so the router sends them to another replica.
        self.draining = False
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=TTFT_SAMPLES)  # (time, ttft s)
        self._calls: dict[tuple[bytes, bytes], asyncio.Task[None]] = {}  # (peer, call_id) -> task
        self._outbox: dict[bytes, list[bytes]] = {}  # peer -> frames sent at the next flush
        self._loop = asyncio.new_event_loop()
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._receiver: asyncio.Task[None] | None = None
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
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        configure(sock)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a peer that left raises
        if self.port:
            sock.bind(tcp_endpoint(self.address))
        else:
            self.port = sock.bind_to_random_port(tcp_endpoint(self.address).rpartition(":")[0])
        self._sock = sock
        self._receiver = asyncio.create_task(self._receive(sock), name="moeray-engine-receive")

    def close(self, grace_s: float = 0.5, timeout_s: float = 5.0) -> None:
        """Stops serving: calls still open after grace_s end (their requests abort, freeing KV),
        then the socket and the thread."""
        if not self._thread.is_alive():
            return
        stop = asyncio.run_coroutine_threadsafe(self._stop(grace_s), self._loop)
        try:
            stop.result(timeout_s)
        except Exception as e:  # the loop is going away either way
            log.debug("engine service stop: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    async def _stop(self, grace_s: float) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        calls = list(self._calls.values())
        if calls:
            _, pending = await asyncio.wait(calls, timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)

    # ---- messages (on this service's event loop) ---------------------------------------------

    async def _receive(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()
            try:
                self._dispatch(frames)
            except Exception:  # one message's fault never stops the service
                log.exception("engine service: a message failed")

    def _dispatch(self, frames: list[bytes]) -> None:
        if len(frames) < 4:
            return  # not a message of this protocol, and no call id to answer on
        peer, kind, token, call_id, *rest = frames
        if not hmac.compare_digest(token, self._token):
            self._error(peer, call_id, "unauthenticated", "wrong or missing engine token")
        elif kind == GENERATE and len(rest) == 1:
            key = (peer, call_id)
            if key in self._calls:
                self._error(peer, call_id, "invalid", "call id already in use")
                return
            task = asyncio.create_task(self._generate(peer, call_id, rest[0]))
            self._calls[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        elif kind == ABORT:
            running = self._calls.pop((peer, call_id), None)
            if running is not None:
                running.cancel()
        elif kind == STATS:
            try:
                stats = encode(self._stats())
            except Exception as e:
                self._error(peer, call_id, "internal", f"{type(e).__name__}: {e}")
                raise
            self._send(peer, call_id, STATS, stats)
        else:
            self._error(peer, call_id, "invalid", f"unknown message kind {kind!r}")

    def _forget(self, key: tuple[bytes, bytes], task: asyncio.Task[None]) -> None:
        if self._calls.get(key) is task:
            del self._calls[key]

    def _send(self, peer: bytes, call_id: bytes, kind: bytes, body: bytes) -> None:
        """Queues an answer for `peer`; what this loop iteration queued goes out as one message."""
        frames = self._outbox.get(peer)
        if frames is None:
            if not self._outbox:
                self._loop.call_soon(self._flush)  # after the tasks woken with this one
            frames = self._outbox[peer] = []
        frames += (call_id, kind, body)

    def _flush(self) -> None:
        """Sends each peer its queued answers. A peer that left (ROUTER_MANDATORY refuses the
        send) gets its calls cancelled: their requests abort and free their KV blocks."""
        outbox, self._outbox = self._outbox, {}
        assert self._sock is not None
        for peer, frames in outbox.items():
            sent = cast("asyncio.Future[Any]", self._sock.send_multipart([peer, *frames]))
            sent.add_done_callback(functools.partial(self._sent, peer))

    def _sent(self, peer: bytes, sent: asyncio.Future[Any]) -> None:
        error = None if sent.cancelled() else sent.exception()
        if error is not None:
            log.debug("router %r is gone (%s); its calls abort", peer, error)
            for (p, _), task in list(self._calls.items()):
                if p == peer:
                    task.cancel()

    def _error(self, peer: bytes, call_id: bytes, code: str, message: str) -> None:
        self._send(peer, call_id, ERROR, encode(CallError(code, message)))

    async def _generate(self, peer: bytes, call_id: bytes, body: bytes) -> None:
        """One Generate call: its events to the peer. Cancelled (ABORT, close, or its peer
        left: `_sent`), it closes the engine stream, which aborts the request."""
        try:
            if self.draining:
                self._error(peer, call_id, "unavailable", "the engine replica is draining")
                return
            async with contextlib.aclosing(self._events(body)) as events:
                async for event in events:
                    self._send(peer, call_id, EVENT, encode(event))
        except Exception as e:  # a fault of the engine's: the router reports it, nothing hangs
            log.exception("call %r failed on the engine", call_id)
            self._error(peer, call_id, "internal", f"{type(e).__name__}: {e}")

    async def _events(self, body: bytes) -> AsyncGenerator[GenerateEvent, None]:
        """Receives a GenerateRequest; yields GenerateDeltas (last one finished) or one
        GenerateRejected. Closing it early aborts the request on the engine."""
        start = time.perf_counter()
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
        finally:
            await stream.aclose()  # aborts an unfinished request

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


__all__ = [
    "ABORT",
    "ERROR",
    "EVENT",
    "GENERATE",
    "STATS",
    "CallError",
    "EngineService",
    "configure",
    "decode_error",
    "decode_event",
    "decode_stats",
    "encode",
    "tcp_endpoint",
]
