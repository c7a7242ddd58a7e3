"""How one layer's messages reach the expert shards and come back, with a deadline.

Per step and per MoE layer the engine sends each shard ONE message (a packed `ShardBatch`) and
waits for every reply. Two transports carry the same bytes:

- `StreamTransport` (transport "socket", the default): one stream connection per shard, chosen by
  locality: a Unix-domain socket when the shard is on the engine's Ray node, TCP to the shard's
  node IP otherwise; length-prefixed frames (`expert_shard.send_frame`). On one node the
  payloads travel through a shared-memory area per connection (`expert_shard.SharedArea`) and
  the socket carries only the frame headers: at 32 tokens of D=512 that cuts a 2-shard round trip
  from ~160 to ~100 us on the 2-core dev machine (the kernel's two copies of each payload and the
  receiver's buffer are gone). All messages go out before any reply is read, and the replies are
  collected with select() against ONE deadline. Idle shards sleep in recv() and cost no CPU.
  (Ray Compiled Graphs were used before: their channels spin while idle, about half a core per
  actor, and a graph whose actor is hung cannot be torn down within a deadline; see
  docs/ARCHITECTURE.md.)
- `PlainTransport` (transport "plain"): one Ray actor call per shard (~1 ms); for networks that
  allow only Ray's own ports.

A reply that does not arrive by the deadline raises `ShardTimeout` naming the late shards (a
shard that hangs while its process stays alive, e.g. stopped with SIGSTOP); a connection that
breaks raises `ShardLost`. The backend (workers/ray_experts.py) then replaces those shards and
re-runs the dispatch. After either error the transport is spent: close it and make a new one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from moeray.workers.expert_shard import SharedArea, recv_frame, send_frame
from ray.exceptions import GetTimeoutError, RayActorError

Reply = bytes | bytearray | memoryview  # a shard's float32 [n, D]: a frame we own, or a view
# of the connection's shared memory
TRANSPORTS = ("socket", "plain")
log = logging.getLogger(__name__)
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


@dataclass
class Link:
    """One shard's stream connection: kind "unix" (same node, with its shared-memory area) or
    "tcp" (another node)."""

    sock: socket.socket
    kind: str
    area: SharedArea | None = None


class StreamTransport:
    """One Unix socket (same node) or TCP connection (other node) per shard."""

    def __init__(self, links: Sequence[Link]) -> None:
        self.links = list(links)

    @property
    def kinds(self) -> list[str]:
        """Each open link's kind, in dispatch order ("unix" or "tcp")."""
        return [link.kind for link in self.links]

    @classmethod
    def connect(cls, handles: Sequence[Any], nodes: Sequence[str], here: str) -> StreamTransport:
        """handles: the shard actors in dispatch order; nodes: their Ray node ids; here: the
        engine's node id. Asks every shard to listen, then connects."""
        kinds = ["unix" if n == here else "tcp" for n in nodes]
        tag = f"{os.getpid()}-{time.time_ns() % 10**9}"
        areas: list[SharedArea | None] = []
        links: list[Link] = []
        try:
            refs = []
            for j, (h, kind) in enumerate(zip(handles, kinds)):
                area = _shared_area(f"moeray-{tag}-{j}.shm") if kind == "unix" else None
                areas.append(area)
                # AF_UNIX paths are limited to ~107 bytes: keep it short, in the temp dir
                path = os.path.join(tempfile.gettempdir(), f"moeray-{tag}-{j}.sock")
                refs.append(
                    h.serve_stream.remote(
                        kind, path if kind == "unix" else "", area.path if area else ""
                    )
                )
            for address, kind, area in zip(ray.get(refs, timeout=CONNECT_TIMEOUT_S), kinds, areas):
                links.append(Link(_connect(kind, address), kind, area))
        except BaseException:
            for link in links:
                link.sock.close()
            for area in areas:
                if area is not None:
                    area.close()
            raise
        finally:
            for area in areas:  # mapped by both ends (or given up): the name can go
                if area is not None:
                    area.unlink()
        return cls(links)

    def round_trip(self, msgs: Sequence[bytes | None], deadline_s: float) -> list[Reply]:
        """Sends msgs[j] to shard j (None: nothing for it this time, its reply is b""), returns
        every reply; ShardTimeout / ShardLost. A reply may view the connection's shared memory:
        consume it before the next round trip."""
        end = time.monotonic() + deadline_s
        replies: list[Reply] = [b""] * len(self.links)
        pending: dict[int, int] = {}  # fd -> shard index
        for j, (link, msg) in enumerate(zip(self.links, msgs)):  # all start before any reply
            if msg is None:
                continue
            pending[link.sock.fileno()] = j
            try:
                link.sock.settimeout(deadline_s)
                send_frame(link.sock, msg, link.area.requests if link.area else None)
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
                link = self.links[j]
                try:
                    link.sock.settimeout(max(end - time.monotonic(), 1e-3))
                    replies[j] = recv_frame(link.sock, link.area.replies if link.area else None)
                except TimeoutError:
                    raise ShardTimeout([j], deadline_s) from None
                except OSError as exc:  # ConnectionError included: the shard closed
                    raise ShardLost([j], exc) from exc
        return replies

    def close(self) -> None:
        for link in self.links:
            link.sock.close()  # the shard's serving thread sees EOF and exits
            if link.area is not None:
                link.area.close()
        self.links = []


def _shared_area(name: str) -> SharedArea | None:
    """A new shared-memory area, or None (payloads then go over the socket) where the node has
    no room or no permission for one."""
    try:
        return SharedArea.create(name)
    except OSError as exc:
        log.warning("no shared memory for an expert shard connection (%s): using the socket", exc)
        return None


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
    return StreamTransport.connect(handles, nodes, here)
