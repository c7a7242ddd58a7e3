"""The engine's direct channel: token streams between the router and an engine replica over one
multiplexed TCP connection, without a Serve handle on the data path.

Why: a Serve streaming call costs milliseconds per request on a small machine (request routing,
a pickled context per streamed item, metrics), which was most of the front door's overhead
(docs/BENCHMARKS.md). The engine deployment still is a Serve deployment (replicas, health,
stats, the fallback path); only Generate's token stream takes this channel.

    router replica                                engine replica
    EngineLink ──TCP, length-prefixed msgpack──▶ EngineChannelServer (own thread + event loop)
       ├ per request: an asyncio.Queue             └ per request: a task iterating
       └ one reader task per connection               AsyncLLMEngine.generate()

Wire format: every frame is a 4-byte big-endian length and one msgpack array.
  client → server  ["hello", version, token]      first frame; a wrong token closes the link
                   ["gen", request_id, prompt, sampling]   prompt: str | [int] | [{role, content}]
                   ["abort", request_id]
  server → client  ["out", request_id, delta_ids, delta_text, finish, prompt_tokens,
                    completion_tokens, engine_time_s, prompt_ids]   prompt_ids on the first only
                   ["rej", request_id, kind, message]     a RequestRejected, instead of outputs
                   ["err", request_id, message]           the engine failed the request
Only deltas travel; the client rebuilds the cumulative `token_ids` / `text` of RequestOutput.
A client that stops iterating sends "abort"; a closed connection aborts all of its requests, so
the engine frees their KV blocks either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
from moeray.workers.async_engine import AsyncLLMEngine, EngineOverloaded
from moeray.workers.io_struct import (
    FinishReason,
    RequestOutput,
    RequestRejected,
    SamplingParams,
    Usage,
)

log = logging.getLogger(__name__)

VERSION = 1
MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct("!I")
_FINISH = {r.value: r for r in FinishReason}


class ChannelError(ConnectionError):
    """The link to an engine replica failed (refused, closed, or a protocol violation)."""


class StreamCancelled(Exception):
    """Raised by a stream's iterator after `EngineStream.cancel()` (the Abort RPC)."""


def frame(obj: Any) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return _HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """The next frame's object; ChannelError on EOF or an oversize frame."""
    try:
        (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if n > MAX_FRAME_BYTES:
            raise ChannelError(f"frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
        return msgpack.unpackb(await reader.readexactly(n), raw=False)
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
        if isinstance(e, ChannelError):
            raise
        raise ChannelError(f"connection closed: {type(e).__name__}") from None


# ---- engine side -----------------------------------------------------------------------------


class EngineChannelServer:
    """Serves one AsyncLLMEngine on host:port (0 = a free port) from a thread of its own.

    start() returns the address clients connect to. Every connection must open with the token.
    """

    def __init__(
        self, engine: AsyncLLMEngine, token: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if not token:
            raise ValueError("token must be a non-empty string")
        self.engine, self.token, self.host, self.port = engine, token, host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.connections = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread = threading.Thread(target=self._run, name="moeray-engine-channel", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"the engine channel did not start within {timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"the engine channel could not listen on {self.address}: "
                               f"{self._error}") from self._error  # fmt: skip
        return self.address

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError as e:
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stops listening and drops every connection (their requests are aborted)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.stop()

        with contextlib.suppress(RuntimeError):  # the loop is already closed
            asyncio.run_coroutine_threadsafe(stop(), loop)
        thread.join(timeout_s)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            hello = await asyncio.wait_for(read_frame(reader), 10.0)
            if not (
                isinstance(hello, list) and len(hello) == 3 and hello[0] == "hello"
                and hello[1] == VERSION and isinstance(hello[2], str)
                and hmac.compare_digest(hello[2], self.token)
            ):  # fmt: skip
                log.warning("engine channel: refused a connection without the right token")
                return
            self.connections += 1
            while True:
                msg = await read_frame(reader)
                op = msg[0] if isinstance(msg, list) and msg else None
                if op == "gen" and len(msg) == 4 and isinstance(msg[1], str):
                    rid = msg[1]
                    if rid in tasks:
                        writer.write(frame(["rej", rid, "invalid",
                                            f"request_id {rid!r} is already in use"]))  # fmt: skip
                        continue
                    task = asyncio.create_task(self._generate(writer, rid, msg[2], msg[3]))
                    tasks[rid] = task
                    task.add_done_callback(functools.partial(_forget, tasks, rid))
                elif op == "abort" and len(msg) == 2 and (t := tasks.get(msg[1])) is not None:
                    t.cancel()
                elif op != "abort":
                    raise ChannelError(f"unexpected frame {str(msg)[:80]}")
        except (ChannelError, asyncio.TimeoutError) as e:
            log.debug("engine channel connection ends: %s", e)
        finally:
            for t in list(tasks.values()):
                t.cancel()  # the stream's finally aborts the request: KV blocks freed
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _generate(
        self, writer: asyncio.StreamWriter, rid: str, prompt: Any, sampling: Any
    ) -> None:
        start = time.perf_counter()
        try:
            if not isinstance(sampling, dict):
                raise ValueError("sampling must be an object")
            params = SamplingParams(**sampling)
            stream = self.engine.generate(rid, prompt, params)
        except EngineOverloaded as e:
            writer.write(frame(["rej", rid, "overloaded", str(e)]))
            return
        except (ValueError, TypeError) as e:  # messages name the field (prompt, max_tokens, ...)
            writer.write(frame(["rej", rid, "invalid", str(e)]))
            return
        first = True
        try:
            async for out in stream:
                finish = out.finish_reason.value if out.finish_reason is not None else None
                elapsed = time.perf_counter() - start if finish is not None else 0.0
                writer.write(frame([
                    "out", rid, out.delta_token_ids, out.delta_text, finish,
                    out.usage.prompt_tokens, out.usage.completion_tokens, elapsed,
                    out.prompt_token_ids if first else None,
                ]))  # fmt: skip
                first = False
                await writer.drain()
        except ValueError as e:  # refused on the engine thread (e.g. a duplicate id)
            writer.write(frame(["rej", rid, "invalid", str(e)]))
        except (ConnectionError, OSError):
            raise asyncio.CancelledError from None  # the client is gone: the stream aborts
        except Exception as e:  # an engine failure ends this request, not the connection
            log.exception("engine channel: request %s failed", rid)
            writer.write(frame(["err", rid, f"{type(e).__name__}: {e}"]))


def _forget(tasks: dict[str, asyncio.Task[None]], rid: str, _task: object) -> None:
    tasks.pop(rid, None)


# ---- router side -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    queue: asyncio.Queue[list[Any] | BaseException]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    prompt_ids: list[int] = dataclasses.field(default_factory=list)


class EngineLink:
    """One multiplexed connection from a router replica to one engine replica's channel.

    Lives on the router's event loop. `inflight` counts open streams (load-aware picking).
    """

    def __init__(self, address: str, token: str, replica_id: str = "") -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"address must be host:port, got {address!r}")
        self.address, self.token, self.replica_id = address, token, replica_id
        self._host, self._port = host, int(port)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Lock | None = None
        self._pending: dict[str, _Pending] = {}
        self.failed_at = 0.0  # monotonic time of the last failure (0 = none)
        self.closed = False

    @property
    def inflight(self) -> int:
        return len(self._pending)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self, timeout_s: float = 2.0) -> None:
        if self.connected:
            return
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return
            if self.closed:
                raise ChannelError(f"the link to {self.address} is closed")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self._host, self._port), timeout_s
                )
            except (OSError, asyncio.TimeoutError) as e:
                self.failed_at = time.monotonic()
                raise ChannelError(f"cannot reach the engine at {self.address}: {e}") from None
            writer.write(frame(["hello", VERSION, self.token]))
            self._writer, self.failed_at = writer, 0.0
            self._reader_task = asyncio.create_task(self._read(reader, writer))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        error: BaseException = ChannelError(f"the engine at {self.address} closed the link")
        try:
            while True:
                msg = await read_frame(reader)
                pending = (
                    self._pending.get(msg[1]) if isinstance(msg, list) and len(msg) > 1 else None
                )
                if pending is not None:
                    pending.queue.put_nowait(msg)
        except ChannelError as e:
            error = ChannelError(f"the engine at {self.address}: {e}")
        except asyncio.CancelledError:
            error = ChannelError(f"the link to {self.address} was closed")
        finally:
            if self._writer is writer:
                self._writer = None
                self.failed_at = time.monotonic()
            writer.close()
            for p in self._pending.values():
                p.queue.put_nowait(error)

    def generate(
        self,
        request_id: str,
        prompt: str | list[int] | list[dict[str, Any]],
        params: SamplingParams,
    ) -> EngineStream:
        """A stream of RequestOutput deltas (or one RequestRejected) for one request."""
        return EngineStream(self, request_id, prompt, params)

    async def _open(self, rid: str, prompt: Any, params: SamplingParams) -> _Pending:
        await self.connect()
        if rid in self._pending:
            raise ValueError(f"request_id {rid!r} is already in use")
        pending = _Pending(asyncio.Queue())
        self._pending[rid] = pending
        assert self._writer is not None
        self._writer.write(frame(["gen", rid, prompt, dataclasses.asdict(params)]))
        return pending

    def _close_stream(self, rid: str, abort: bool) -> None:
        """Forgets a stream (idempotent); abort: tell the engine to stop it and free its KV."""
        if self._pending.pop(rid, None) is not None and abort and self.connected:
            assert self._writer is not None
            self._writer.write(frame(["abort", rid]))

    async def close(self) -> None:
        self.closed = True
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task


class EngineStream:
    """Async iterator of one request's outputs over an EngineLink; `cancel()` stops it (the
    iterator then raises StreamCancelled). Leaving the iteration early aborts the request."""

    def __init__(self, link: EngineLink, rid: str, prompt: Any, params: SamplingParams) -> None:
        self.link, self.rid, self.prompt, self.params = link, rid, prompt, params
        self._pending: _Pending | None = None
        self._cancelled = False
        self.started = False  # True once anything came back (fallback is only safe before)

    def cancel(self) -> None:
        """Aborts the request on the engine now; the iterator raises StreamCancelled."""
        self._cancelled = True
        if self._pending is not None:
            self.link._close_stream(self.rid, abort=True)
            self._pending.queue.put_nowait(StreamCancelled(self.rid))

    def __aiter__(self) -> AsyncIterator[RequestOutput | RequestRejected]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput | RequestRejected]:
        if self._cancelled:
            raise StreamCancelled(self.rid)
        self._pending = p = await self.link._open(self.rid, self.prompt, self.params)
        done = False
        try:
            while True:
                msg = await p.queue.get()
                if isinstance(msg, BaseException):
                    raise msg
                self.started = True
                kind = msg[0]
                if kind == "rej":
                    done = True
                    yield RequestRejected(str(msg[2]), str(msg[3]))
                    return
                if kind == "err":
                    done = True
                    raise RuntimeError(f"the engine failed the request: {msg[2]}")
                out = _output(self.rid, p, msg)
                done = out.finished
                yield out
                if done:
                    return
        finally:
            self.link._close_stream(self.rid, abort=not done)


def _output(rid: str, p: _Pending, msg: list[Any]) -> RequestOutput:
    _, _, delta_ids, delta_text, finish, n_prompt, n_out, elapsed, prompt_ids = msg
    if prompt_ids is not None:
        p.prompt_ids = list(prompt_ids)
    p.token_ids.extend(delta_ids)
    p.text += delta_text
    return RequestOutput(
        request_id=rid,
        prompt_token_ids=p.prompt_ids,
        token_ids=list(p.token_ids),
        text=p.text,
        delta_token_ids=list(delta_ids),
        delta_text=delta_text,
        finish_reason=_FINISH[finish] if finish is not None else None,
        usage=Usage(int(n_prompt), int(n_out)),
        engine_time_s=float(elapsed),
    )
