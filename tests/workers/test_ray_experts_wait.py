"""The engine side of the stream transport that needs no Ray: frames over real socket pairs, the
dispatch deadline (a shard that never answers), a lost connection, and the shard's serving loop."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import numpy as np
import pytest
import torch
from moeray.workers.expert_shard import (
    ExpertShard,
    ShardBatch,
    SharedArea,
    recv_frame,
    send_frame,
)
from moeray.workers.shard_transport import Link, ShardLost, ShardTimeout, StreamTransport


def test_frames_cross_a_socket_whole_and_owned() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(30)
    b.settimeout(30)
    payloads = [b"", b"x", bytes(range(256)) * 8192, np.arange(300_000, dtype=np.float32).data]
    try:
        # 2 MB frames do not fit the socket buffer: the sender blocks until the reader drains
        sender = threading.Thread(target=lambda: [send_frame(a, p) for p in payloads])
        sender.start()
        got = [recv_frame(b) for _ in payloads]
        sender.join(timeout=30)
    finally:
        a.close()
        b.close()
    assert [bytes(g) for g in got] == [bytes(p) for p in payloads]
    assert all(isinstance(g, bytearray) for g in got)


def _transport(socks: list[socket.socket]) -> StreamTransport:
    """A StreamTransport over connected sockets (the actors' part is tested with Ray)."""
    return StreamTransport([Link(s, "unix") for s in socks])


def _echo(conn: socket.socket) -> None:
    """A shard stand-in that answers every frame with its payload."""
    with contextlib.suppress(OSError):
        while True:
            send_frame(conn, recv_frame(conn))


def test_a_silent_shard_misses_the_deadline_and_is_named() -> None:
    """Shard 1 reads its frame and never answers (a hung process): the round trip ends with
    ShardTimeout([1]) at the deadline, not later; shard 0's reply does not help."""
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    threading.Thread(target=_echo, args=(pairs[0][1],), daemon=True).start()
    transport = _transport([a for a, _ in pairs])
    try:
        assert transport.round_trip([b"a", None], 5.0) == [bytearray(b"a"), b""]
        start = time.monotonic()
        with pytest.raises(ShardTimeout) as err:
            transport.round_trip([b"x", b"y"], 0.2)
        took = time.monotonic() - start
        assert err.value.late == [1]
        assert 0.2 <= took < 1.0
    finally:
        transport.close()
        for _, b in pairs:
            b.close()


def test_a_closed_shard_connection_is_a_lost_shard() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()  # the shard's process died
    transport = _transport([a])
    try:
        with pytest.raises(ShardLost) as err:
            transport.round_trip([b"x"], 5.0)
        assert err.value.lost == [0]
    finally:
        transport.close()


def test_shard_serves_frames_as_run_does() -> None:
    """The socket loop answers with the same bytes as the plain `run` call."""
    g = torch.Generator().manual_seed(1)
    weights = {0: (torch.randn(3, 8, 4, generator=g), torch.randn(3, 4, 4, generator=g))}
    shard = ExpertShard({0: [0, 1, 2]}, weights=weights)
    ids = torch.tensor([[0, 2], [1, -1], [-1, -1]], dtype=torch.int32)
    msg = ShardBatch(0, torch.randn(3, 4, generator=g), torch.rand(3, 2, generator=g), ids).pack()
    engine, served = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.settimeout(30)
    loop = threading.Thread(target=shard._serve, args=(_Listener(served), ""), daemon=True)
    loop.start()
    try:
        send_frame(engine, msg)
        assert bytes(recv_frame(engine)) == shard.run(msg)
    finally:
        engine.close()
    loop.join(timeout=30)


class _Listener:
    """Stands in for the listening socket of `ExpertShard._serve`: accept() hands over `conn`."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def accept(self) -> tuple[socket.socket, str]:
        return self.conn, ""

    def close(self) -> None:
        pass


def test_frames_through_a_shared_area_and_past_it() -> None:
    """Same-node frames: a payload that fits the area crosses in it (only the header on the
    socket) and arrives as a view of the area; a larger one falls back to the socket whole."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(30)
    b.settimeout(30)
    engine = SharedArea.create(f"moeray-test-{os.getpid()}.shm", half=4096)
    shard = SharedArea(engine.path, half=4096, create=False)
    engine.unlink()
    small = np.arange(1000, dtype=np.float32)  # 4000 bytes: fits
    big = np.arange(5000, dtype=np.float32)  # 20000 bytes: does not
    try:
        send_frame(a, small.data, engine.requests)
        b.setblocking(False)
        header = b.recv(64)  # the socket carries the 8-byte header and nothing else
        b.setblocking(True)
        assert len(header) == 8
        a.sendall(header)  # (replay it to the reader below)
        got = recv_frame(b, shard.requests)
        assert isinstance(got, memoryview)
        assert np.array_equal(np.frombuffer(got, dtype=np.float32), small)
        send_frame(a, big.data, engine.requests)
        got = recv_frame(b, shard.requests)
        assert isinstance(got, bytearray)
        assert np.array_equal(np.frombuffer(got, dtype=np.float32), big)
        assert not os.path.exists(engine.path)  # the name is gone, the mapping stays
        del got
    finally:
        a.close()
        b.close()
        engine.close()
        shard.close()


def test_shard_serves_through_a_shared_area_as_run_does() -> None:
    """The shard's loop with a shared area: request and reply cross in shared memory, and the
    reply equals the plain `run` call's bytes; a batch bigger than the area still works."""
    g = torch.Generator().manual_seed(2)
    weights = {0: (torch.randn(3, 8, 4, generator=g), torch.randn(3, 4, 4, generator=g))}
    shard = ExpertShard({0: [0, 1, 2]}, weights=weights)
    ids = torch.tensor([[0, 2], [1, -1], [-1, -1]], dtype=torch.int32)
    small = ShardBatch(0, torch.randn(3, 4, generator=g), torch.rand(3, 2, generator=g), ids)
    big_ids = torch.randint(0, 3, (400, 2), generator=g, dtype=torch.int32)
    big = ShardBatch(0, torch.randn(400, 4, generator=g), torch.rand(400, 2, generator=g), big_ids)
    area = SharedArea.create(f"moeray-test-{os.getpid()}-serve.shm", half=4096)
    engine, served = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    engine.settimeout(30)
    served_area = SharedArea(area.path, half=4096, create=False)
    area.unlink()
    loop = threading.Thread(target=shard._serve, args=(_Listener(served), "", served_area))
    loop.start()
    transport = StreamTransport([Link(engine, "unix", area)])
    try:
        for batch in (small, big, small):
            msg = batch.pack()
            (reply,) = transport.round_trip([msg], 30.0)
            assert bytes(reply) == shard.run(msg)
    finally:
        transport.close()
    loop.join(timeout=30)
    assert not loop.is_alive()
