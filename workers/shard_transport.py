"""How one layer's messages reach the expert shards and come back, with a deadline.

Per step and per MoE layer the engine sends each shard ONE message (a packed `ShardBatch`) and
waits for every reply. Two transports carry the same bytes:

- `StreamTransport` (transport "socket", the default): one stream connection per shard, chosen by
  locality: a Unix-domain socket when the shard is on the engine's Ray node, TCP to the shard's
  node IP otherwise; length-prefixed frames (`expert_shard.send_frame`). All messages go out
  before any reply is read, and the replies are collected with select() against ONE deadline.
  Measured on the 2-core dev machine: ~35-65 us per 2-shard round trip on one node; idle shards
  sleep in recv() and cost no CPU. (Ray Compiled Graphs were used before: their channels spin
  while idle, about half a core per actor, and a graph whose actor is hung cannot be torn down
  within a deadline; see docs/ARCHITECTURE.md.)
- `PlainTransport` (transport "plain"): one Ray actor call per shard (~1 ms); for networks that
  allow only Ray's own ports.

A reply that does not arrive by the deadline raises `ShardTimeout` naming the late shards (a
shard that hangs while its process stays alive, e.g. stopped with SIGSTOP); a connection that
breaks raises `ShardLost`. The backend (workers/ray_experts.py) then replaces those shards and
re-runs the dispatch. After either error the transport is spent: close it and make a new one.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import ray
from moeray.workers.expert_shard import recv_frame, send_frame
from ray.exceptions import GetTimeoutError, RayActorError

Reply = bytes | bytearray  # a shard's float32 [n, D] (a socket frame is a bytearray we own)
TRANSPORTS = ("socket", "plain")
CONNECT_TIMEOUT_S = 30.0  # a shard asked to listen answers a plain call within this


class ShardTimeout(TimeoutError):
    """Shards (indices in the dispatch) did not reply within the dispatch deadline."""

    def __init__(self, late: list[int], deadline_s: float) -> None:
        super().__init__(f"expert shards {late} did not reply within {deadline_s * 1e3:.0f} ms")
        self.late = late
        self.deadline_s = deadline_s


class ShardLost(ConnectionError):
    """The connection to shards (indices in the dispatch) broke: the actor or its node died."""

    def __init__(self, lost: list[int], cause: BaseException) -> None:
        super().__init__(f"expert shards {lost} went away: {type(cause).__name__}: {cause}")
        self.lost = lost


class StreamTransport:
    """One Unix socket (same node) or TCP connection (other node) per shard."""

    def __init__(self, handles: Sequence[Any], nodes: Sequence[str], here: str) -> None:
        """handles: the shard actors in dispatch order; nodes: their Ray node ids; here: the
        engine's node id. Asks every shard to listen, then connects."""
        self.socks: list[socket.socket] = []
        self.kinds = ["unix" if n == here else "tcp" for n in nodes]
        tag = f"{os.getpid()}-{time.time_ns() % 10**9}"
        try:
            refs = []
            for j, (h, kind) in enumerate(zip(handles, self.kinds)):
                # AF_UNIX paths are limited to ~107 bytes: keep it short, in the temp dir
                path = os.path.join(tempfile.gettempdir(), f"moeray-{tag}-{j}.sock")
                refs.append(h.serve_stream.remote(kind, path if kind == "unix" else ""))
            for address, kind in zip(ray.get(refs, timeout=CONNECT_TIMEOUT_S), self.kinds):
                self.socks.append(_connect(kind, address))
        except BaseException:
            self.close()
            raise

    def round_trip(self, msgs: Sequence[bytes | None], deadline_s: float) -> list[Reply]:
        """Sends msgs[j] to shard j (None: nothing for it this time, its reply is b""), returns
        every reply; ShardTimeout / ShardLost."""
        end = time.monotonic() + deadline_s
        replies: list[Reply] = [b""] * len(self.socks)
        pending: dict[int, int] = {}  # fd -> shard index
        for j, (sock, msg) in enumerate(zip(self.socks, msgs)):  # all start before any reply
            if msg is None:
                continue
            pending[sock.fileno()] = j
            try:
                sock.settimeout(deadline_s)
                send_frame(sock, msg)
            except TimeoutError:
                raise ShardTimeout([j], deadline_s) from None
            except OSError as exc:
                raise ShardLost([j], exc) from exc
        while pending:
            left = end - time.monotonic()
            ready = select.select(list(pending), [], [], max(left, 0.0))[0] if left > 0 else []
            if not ready:
                raise ShardTimeout(sorted(pending.values()), deadline_s)
            for fd in ready:
                j = pending.pop(fd)
                sock = self.socks[j]
                try:
                    sock.settimeout(max(end - time.monotonic(), 1e-3))
                    replies[j] = recv_frame(sock)
                except TimeoutError:
                    raise ShardTimeout([j], deadline_s) from None
                except OSError as exc:  # ConnectionError included: the shard closed
                    raise ShardLost([j], exc) from exc
        return replies

    def close(self) -> None:
        for sock in self.socks:
            sock.close()  # the shard's serving thread sees EOF and exits
        self.socks = []


def _connect(kind: str, address: str) -> socket.socket:
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(address)
        with contextlib.suppress(OSError):
            os.unlink(address)  # connected: the name is no longer needed, and cannot leak
        return sock
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class PlainTransport:
    """One plain actor call per shard per layer (~1 ms each on the dev machine)."""

    def __init__(self, handles: Sequence[Any]) -> None:
        self.handles = list(handles)

    def round_trip(self, msgs: Sequence[bytes | None], deadline_s: float) -> list[Reply]:
        refs = {
            j: h.run.remote(m) for j, (h, m) in enumerate(zip(self.handles, msgs)) if m is not None
        }
        out: list[Reply] = [b""] * len(self.handles)
        if not refs:
            return out
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=deadline_s)
        late = [j for j, r in refs.items() if r not in ready]
        if late:  # (their calls stay queued: the backend kills those actors)
            raise ShardTimeout(late, deadline_s)
        for j, ref in refs.items():
            try:
                out[j] = ray.get(ref, timeout=deadline_s)
            except GetTimeoutError:
                raise ShardTimeout([j], deadline_s) from None
            except RayActorError as exc:
                raise ShardLost([j], exc) from exc
        return out

    def close(self) -> None:
        pass


Transport = StreamTransport | PlainTransport


def make_transport(kind: str, handles: Sequence[Any], nodes: Sequence[str], here: str) -> Transport:
    """kind: socket (Unix socket or TCP by locality) | plain (Ray actor calls)."""
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {kind!r}")
    if kind == "plain":
        return PlainTransport(handles)
    return StreamTransport(handles, nodes, here)
