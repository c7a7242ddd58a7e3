"""The router's side of the one router <-> engine transport: a ZeroMQ connection to each engine
replica (the protocol is in workers/engine_service.py).

Each engine replica serves workers/engine_service.py on its node and registers the endpoint
(address, token) in Redis (`ClusterState.register_engine`, kept fresh by `EndpointAnnouncer`).
`EngineLinks` refreshes every tier's endpoints on a background task of the router's event loop
(never on a request's path) and hands out a replica per request: the one that most likely holds
the request's prompt prefix in its KV cache (router/prefix_affinity.py) unless it has
`imbalance` more open streams than the least-loaded one, else the least-loaded one. A replica
whose call failed "unavailable" is skipped for RETRY_AFTER_S; a replica whose endpoint left
Redis is closed once its open streams have ended. Redis down: the known replicas keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio
from moeray.router.prefix_affinity import PrefixAffinity
from moeray.workers.engine_service import (
    ABORT,
    EVENT,
    GENERATE,
    STATS,
    configure,
    decode_error,
    decode_event,
    decode_stats,
    encode,
    tcp_endpoint,
)
from moeray.workers.io_struct import (
    EngineStats,
    GenerateDelta,
    GenerateEvent,
    GenerateRejected,
    GenerateRequest,
)
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

REFRESH_S = 1.0
RETRY_AFTER_S = 2.0
STATS_TIMEOUT_S = 1.0
#: How long a call waits for a replica's first connection (it is listening before it announces
#: itself, so this is a loopback or LAN handshake).
CONNECT_TIMEOUT_S = 2.0
#: Reconnection attempts to a lost replica back off from 100 ms up to this.
RECONNECT_MAX_MS = 2_000
_MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


class EngineCallError(Exception):
    """A call to an engine replica that ended without its answer.

    code: "unavailable" (the replica is unreachable, was lost or is draining: a call that had
    received nothing may be retried elsewhere), "deadline_exceeded", "cancelled" (this side
    cancelled it), "unauthenticated", "invalid", "internal" (the engine failed it).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class EngineClient:
    """One ZeroMQ connection from this router replica to one engine replica (on the router's
    loop, made at its first call).

    `inflight` counts its open Generate streams (least-loaded picking); `max_prompt_bytes` is
    the longest prompt text the replica announced it would take (0: not announced).
    """

    def __init__(
        self, replica_id: str, address: str, token: str, max_prompt_bytes: int = 0
    ) -> None:
        self.replica_id, self.address, self.token = replica_id, address, token
        self.max_prompt_bytes = max_prompt_bytes
        self.inflight = 0
        self.failed_at = 0.0  # monotonic time of the last "unavailable" (0 = none)
        self.missing_since = 0.0  # monotonic time its endpoint went missing from Redis (0 = none)
        self._token = token.encode()
        self._ids = itertools.count(1)
        self._calls: dict[bytes, GenerateStream | asyncio.Future[EngineStats]] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._up = False
        self._down = ""  # why the connection is down ("" = not known to be)
        self._changed = asyncio.Event()
        self._closed = False

    # ---- calls ---------------------------------------------------------------------------------

    def generate(self, request: GenerateRequest, timeout_s: float | None) -> GenerateStream:
        """A stream of GenerateEvents for one request; cancel() aborts it on the engine."""
        return GenerateStream(self, request, timeout_s)

    async def stats(self, timeout_s: float = STATS_TIMEOUT_S) -> EngineStats:
        """This replica's EngineStats; EngineCallError when it does not answer in time."""
        deadline = time.monotonic() + timeout_s
        await self._connected(timeout_s)
        call_id = self._new_id()
        answer: asyncio.Future[EngineStats] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = answer
        try:
            self._send([STATS, self._token, call_id])
            return await asyncio.wait_for(answer, max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise EngineCallError(
                "deadline_exceeded", f"the engine replica at {self.address} did not answer in "
                f"{timeout_s} s"
            ) from None  # fmt: skip
        finally:
            self._calls.pop(call_id, None)

    async def close(self) -> None:
        self._closed = True
        self._lose("the router closed its connection")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)

    # ---- the connection ------------------------------------------------------------------------

    def _new_id(self) -> bytes:
        return next(self._ids).to_bytes(8, "little")

    def _socket(self) -> zmq.asyncio.Socket:
        """The DEALER socket, made (with its reader and monitor) on first use."""
        if self._sock is None:
            if self._closed:
                raise EngineCallError("unavailable", "the connection is closed")
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            configure(sock)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queued for a connection not (yet) up
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MAX_MS)  # a dead peer: back off
            monitor = sock.get_monitor_socket(_MONITORED)
            sock.connect(tcp_endpoint(self.address))
            self._sock = sock
            self._tasks = [
                asyncio.create_task(self._read(sock), name=f"moeray-engine-{self.replica_id}"),
                asyncio.create_task(
                    self._watch(sock, monitor), name=f"moeray-watch-{self.replica_id}"
                ),
            ]
        return self._sock

    async def _connected(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Returns once the connection is up; EngineCallError("unavailable") when it is known to
        be down or does not come up within timeout_s."""
        self._socket()
        deadline = time.monotonic() + timeout_s
        while not self._up:
            if self._down:
                raise EngineCallError("unavailable", self._down)
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), deadline - time.monotonic())
            except TimeoutError:
                raise EngineCallError(
                    "unavailable", f"no connection to the engine replica at {self.address} "
                    f"within {timeout_s} s"
                ) from None  # fmt: skip

    def _send(self, frames: list[bytes]) -> None:
        """Queues a message on the connection; "unavailable" if the connection just dropped."""
        sent = cast("asyncio.Future[Any]", self._socket().send_multipart(frames, zmq.NOBLOCK))
        error = sent.exception() if sent.done() else None
        if isinstance(error, zmq.Again):  # IMMEDIATE: no connection to queue it on
            raise EngineCallError("unavailable", f"the connection to {self.address} is down")
        if error is not None:
            raise error

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart()  # one or more answers, three frames each
            if len(frames) % 3:
                continue
            for i in range(0, len(frames), 3):
                self._answer(frames[i], frames[i + 1], frames[i + 2])

    def _answer(self, call_id: bytes, kind: bytes, body: bytes) -> None:
        call = self._calls.get(call_id)
        if isinstance(call, GenerateStream):
            call.deliver(kind, body)  # decoded by its consumer
        elif call is not None and not call.done():  # a stats call
            try:
                if kind == STATS:
                    call.set_result(decode_stats(body))
                else:
                    err = decode_error(body)
                    call.set_exception(EngineCallError(err.code, err.message))
            except msgspec.DecodeError as e:
                call.set_exception(EngineCallError("internal", f"an undecodable answer: {e}"))
        elif kind == EVENT:  # a call this side has given up on: make sure it stops
            with contextlib.suppress(EngineCallError):
                self._send([ABORT, self._token, call_id])

    async def _watch(self, sock: zmq.asyncio.Socket, monitor: zmq.asyncio.Socket) -> None:
        """Follows the connection's monitor events. FOOTGUN: libzmq's I/O thread hands each event
        to the monitor with a blocking send, and with nobody left to receive it that send never
        returns, which stops the I/O thread of every socket in the context (all connections
        to all engine replicas): the monitor is switched off before its reader closes."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._set(up=True, down="")
                elif event == zmq.EVENT_DISCONNECTED:
                    self._lose(f"the connection to the engine replica at {self.address} was lost")
                elif event == zmq.EVENT_CONNECT_RETRIED and not self._up:
                    self._lose(f"the engine replica at {self.address} refused the connection")
        finally:
            if not sock.closed:
                sock.disable_monitor()
            monitor.close(linger=0)

    def _set(self, up: bool, down: str) -> None:
        self._up, self._down = up, down
        self._changed.set()
        self._changed = asyncio.Event()

    def _lose(self, why: str) -> None:
        """The connection is down: every open call fails "unavailable"."""
        self._set(up=False, down=why)
        if self._calls:
            self.failed_at = time.monotonic()
        for call in list(self._calls.values()):
            if isinstance(call, GenerateStream):
                call.fail(EngineCallError("unavailable", why))
            elif not call.done():
                call.set_exception(EngineCallError("unavailable", why))
        self._calls.clear()


class GenerateStream:
    """One Generate call: iterate it (once) for GenerateEvents; it counts as in flight until it
    ends. The request is sent when iteration starts. A consumer that fell behind gets the deltas
    it missed as one (as the engine does for its own consumers), so a slow client costs the
    router one message per catch-up, not one per engine step."""

    def __init__(
        self, client: EngineClient, request: GenerateRequest, timeout_s: float | None
    ) -> None:
        self.client, self.request, self.timeout_s = client, request, timeout_s
        self.call_id = client._new_id()
        self.received = 0  # events received so far (0: the engine may not have started it)
        self._items: deque[tuple[bytes, bytes] | EngineCallError] = deque()
        self._waiter: asyncio.Future[None] | None = None  # set while the consumer waits
        self._timer: asyncio.TimerHandle | None = None
        self._finished = False
        client.inflight += 1
        self._open = True

    async def __aiter__(self) -> AsyncIterator[GenerateEvent]:
        client = self.client
        try:
            if self.timeout_s is not None:
                self._timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire)
            wait = (
                CONNECT_TIMEOUT_S
                if self.timeout_s is None
                else min(CONNECT_TIMEOUT_S, self.timeout_s)
            )
            await client._connected(wait)
            if not self._open:  # cancelled while connecting
                raise EngineCallError("cancelled", "the call was cancelled")
            client._calls[self.call_id] = self
            client._send([GENERATE, client._token, self.call_id, encode(self.request)])
            while True:
                event = _decoded(await self._next())
                self.received += 1
                while (
                    isinstance(event, GenerateDelta) and event.finish_reason is None and self._items
                ):
                    head = self._items[0]  # merged only if it is a delta too
                    if isinstance(head, EngineCallError) or head[0] != EVENT:
                        break
                    nxt = _decoded(head)
                    if not isinstance(nxt, GenerateDelta):
                        break
                    self._items.popleft()
                    event = _merged(event, nxt)
                self._finished = isinstance(event, GenerateRejected) or (
                    event.finish_reason is not None
                )
                yield event
                if self._finished:
                    return
        except EngineCallError as e:
            if e.code == "unavailable":
                client.failed_at = time.monotonic()
            raise
        finally:
            self._end()

    async def _next(self) -> tuple[bytes, bytes] | EngineCallError:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def deliver(self, kind: bytes, body: bytes) -> None:
        self._items.append((kind, body))
        self._wake()

    def fail(self, error: EngineCallError) -> None:
        self._items.append(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        self.fail(EngineCallError("deadline_exceeded", "the call's deadline passed"))

    def cancel(self) -> None:
        """Stops the call: the engine aborts the request and frees its KV blocks. A no-op once
        the call has ended."""
        if self._open:
            self.fail(EngineCallError("cancelled", "the call was cancelled"))
        self._end()

    def _end(self) -> None:
        if not self._open:
            return
        self._open = False
        client = self.client
        client.inflight -= 1
        if self._timer is not None:
            self._timer.cancel()
        if client._calls.pop(self.call_id, None) is not None and not self._finished:
            with contextlib.suppress(EngineCallError):  # a lost connection aborts it anyway
                client._send([ABORT, client._token, self.call_id])


def _decoded(item: tuple[bytes, bytes] | EngineCallError) -> GenerateEvent:
    """An answer of a Generate call -> its event; EngineCallError for an error or a failure."""
    if isinstance(item, EngineCallError):
        raise item
    kind, body = item
    try:
        if kind != EVENT:
            err = decode_error(body)
            raise EngineCallError(err.code, err.message)
        return decode_event(body)
    except msgspec.DecodeError as e:
        raise EngineCallError("internal", f"an undecodable answer: {e}") from None


def _merged(a: GenerateDelta, b: GenerateDelta) -> GenerateDelta:
    """Two consecutive deltas of one request as one: b, with a's tokens in front and the
    first-delta-only fields of a."""
    return msgspec.structs.replace(
        b,
        delta_token_ids=a.delta_token_ids + b.delta_token_ids,
        delta_text=a.delta_text + b.delta_text,
        delta_logprobs=None
        if b.delta_logprobs is None
        else (a.delta_logprobs or []) + b.delta_logprobs,
        prompt_token_ids=a.prompt_token_ids
        if a.prompt_token_ids is not None
        else b.prompt_token_ids,
        prompt_logprobs=a.prompt_logprobs if a.prompt_token_ids is not None else b.prompt_logprobs,
        prompt_text=a.prompt_text if a.prompt_token_ids is not None else b.prompt_text,
    )


class EngineLinks:
    """Per tier: replica id -> EngineClient, refreshed from `state.engine_endpoints(tier)`.

    state: a `cluster.state.ClusterState`. Lives on one event loop (the router replica's).
    prefix_routing / imbalance: prefer the replica holding a request's prefix while it has at
    most `imbalance` more open streams than the least-loaded replica.
    on_change(tier, added, removed): called when replicas join or leave a tier.
    missing_grace_s: how long a replica whose endpoint left Redis is kept (its TTL, by default).
    """

    def __init__(
        self,
        state: Any,
        tiers: list[str],
        refresh_s: float = REFRESH_S,
        missing_grace_s: float = 10.0,
        prefix_routing: bool = True,
        imbalance: int = 8,
        on_change: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.state, self.tiers, self.refresh_s = state, list(tiers), refresh_s
        self.missing_grace_s = missing_grace_s
        self.prefix_routing, self.imbalance, self.on_change = prefix_routing, imbalance, on_change
        self.affinity = {t: PrefixAffinity() for t in self.tiers}
        self._clients: dict[str, dict[str, EngineClient]] = {t: {} for t in self.tiers}
        self._retired: list[EngineClient] = []
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0

    def start(self) -> None:
        """Starts the refresh task on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="moeray-engine-links")

    async def _run(self) -> None:
        backoff = self.refresh_s
        while True:
            try:
                await self.refresh()
                backoff = self.refresh_s
            except Exception as e:  # Redis down: keep the replicas we know, retry with backoff
                log.debug("engine endpoints unavailable: %s", e)
                backoff = min(backoff * 2, 10.0)
            await asyncio.sleep(backoff)

    async def refresh(self) -> None:
        """One round: every tier's endpoints from Redis (on a worker thread)."""
        for tier in self.tiers:
            endpoints = await asyncio.to_thread(self.state.engine_endpoints, tier)
            self._update(tier, endpoints)
        for client in [c for c in self._retired if c.inflight == 0]:
            self._retired.remove(client)
            await client.close()
        self.refreshes += 1

    def _update(self, tier: str, endpoints: list[Any]) -> None:
        """Adopts the tier's endpoints. A replica missing from Redis is dropped only once it has
        been missing for `missing_grace_s`: a restarted (empty) Redis must not empty the tier
        before the replicas re-announce themselves (within a third of their TTL)."""
        current, fresh = self._clients[tier], {}
        now = time.monotonic()
        for ep in endpoints:
            client = current.get(ep.replica_id)
            if client is None or (client.address, client.token) != (ep.address, ep.token):
                client = EngineClient(ep.replica_id, ep.address, ep.token)
            client.max_prompt_bytes = ep.max_prompt_bytes
            client.missing_since = 0.0
            fresh[ep.replica_id] = client
        for rid, client in current.items():
            if rid in fresh:
                continue
            if not client.missing_since:
                client.missing_since = now
            if now - client.missing_since < self.missing_grace_s:
                fresh[rid] = client  # kept for now
        for rid, client in current.items():
            if fresh.get(rid) is not client:
                self._retired.append(client)  # closed once its open streams have ended
            if rid not in fresh:
                self.affinity[tier].forget(rid)
        self._clients[tier] = fresh
        added, removed = len(fresh.keys() - current.keys()), len(current.keys() - fresh.keys())
        if self.on_change is not None and (added or removed):
            self.on_change(tier, added, removed)

    async def wait_for_replica(self, tier: str, timeout_s: float) -> bool:
        """Refreshes `tier` from Redis until it has a replica, for up to timeout_s (a router that
        just started, or a tier whose replicas are all being replaced); True if one is there."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._update(tier, await asyncio.to_thread(self.state.engine_endpoints, tier))
            except Exception as e:  # Redis down: wait with what we have
                log.debug("engine endpoints unavailable: %s", e)
            if self._clients.get(tier) or time.monotonic() >= deadline:
                return bool(self._clients.get(tier))
            await asyncio.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def pick(
        self, tier: str, exclude: frozenset[str] = frozenset(), keys: list[bytes] | None = None
    ) -> tuple[EngineClient | None, str]:
        """A usable replica of `tier` for a request with these prefix keys, and why:
        "prefix" (it holds the longest shared prefix), "overloaded" (it does, but has too many
        open streams), or "least_loaded" (fewest open streams, ties broken at random)."""
        now = time.monotonic()
        usable = {
            c.replica_id: c for c in self._clients.get(tier, {}).values()
            if c.replica_id not in exclude
            and (not c.failed_at or now - c.failed_at > RETRY_AFTER_S)
        }  # fmt: skip
        if not usable:
            return None, "none"
        least = min(c.inflight for c in usable.values())
        why = "least_loaded"
        if keys and self.prefix_routing:
            holder, _ = self.affinity[tier].match(keys, usable.keys())
            if holder is not None:
                if usable[holder].inflight - least <= self.imbalance:
                    return usable[holder], "prefix"
                why = "overloaded"
        return random.choice([c for c in usable.values() if c.inflight == least]), why

    def served(self, tier: str, keys: list[bytes], client: EngineClient) -> None:
        """Records that `client` now holds the prefixes of a request it served."""
        if keys and self.prefix_routing:
            self.affinity[tier].record(keys, client.replica_id)

    def clients(self, tier: str) -> list[EngineClient]:
        return list(self._clients.get(tier, {}).values())

    def prompt_limit(self, tier: str) -> int:
        """The longest prompt text (UTF-8 bytes) some replica of `tier` takes; 0 when not known
        (no replica yet, or one that announced no limit): then only the engine checks."""
        limits = [c.max_prompt_bytes for c in self._clients.get(tier, {}).values()]
        return 0 if not limits or 0 in limits else max(limits)

    def largest_prompt_limit(self) -> int:
        """The longest prompt text any tier takes; 0 unless every tier's limit is known."""
        limits = [self.prompt_limit(t) for t in self.tiers]
        return 0 if not limits or 0 in limits else max(limits)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in [c for t in self._clients.values() for c in t.values()] + self._retired:
            await client.close()
