"""The engine side of the socket transport that needs no Ray: frames over a real socket pair, the
numpy combine, and waiting with torch's OpenMP workers parked (workers.ray_experts.OmpParking)."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest
import torch
from moeray.workers.expert_shard import ExpertShard, ShardBatch, recv_frame, send_frame
from moeray.workers.ray_experts import OmpParking, RayExperts


def test_parked_wait_returns_the_result_and_raises_the_error(two_threads: None) -> None:
    parking = OmpParking()
    if not parking.active:
        pytest.skip("torch is not built with libgomp here")
    a = torch.randn(64, 64)
    for i in range(20):  # interleaved with torch's own parallel regions (the same thread pool)
        expected = a @ a
        assert parking.run(lambda i=i: i * 2) == i * 2
        assert torch.equal(a @ a, expected)

    def boom() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        parking.run(boom)
    assert parking.run(lambda: "again") == "again"  # nothing left held after an error


def test_parked_wait_from_another_thread(two_threads: None) -> None:
    parking = OmpParking()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(parking.run(lambda: sum(range(10)))))
    t.start()
    t.join(timeout=30)
    assert out == [45]


def test_one_thread_runs_the_wait_directly() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert OmpParking().run(lambda: 7) == 7
    finally:
        torch.set_num_threads(before)


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


def test_shard_reply_and_combine_match_the_torch_sum() -> None:
    """_combine (numpy) == zeros + index_add_ in torch, for all-row and row-subset replies."""
    T, D = 6, 8
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(T, D, generator=g), torch.randn(3, D, generator=g)]
    rows: list[np.ndarray | None] = [None, np.array([0, 2, 5])]
    expected = torch.zeros(T, D)
    expected += parts[0]
    expected.index_add_(0, torch.tensor([0, 2, 5]), parts[1])
    replies = [p.numpy().tobytes() for p in parts]
    backend = RayExperts.__new__(RayExperts)  # _combine reads no state
    out = backend._combine(torch.zeros(T, D), rows, [bytearray(r) for r in replies])
    assert torch.equal(out, expected)
    assert torch.equal(backend._combine(torch.zeros(T, D), rows, replies), expected)


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
