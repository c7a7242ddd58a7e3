"""Expert-shard actors: each holds some (layer, expert) FFNs and runs the tokens sent to it.

A shard is created with an *assignment* (model layer -> the global expert ids it holds) and loads
only those experts' tensors from the checkpoint's safetensors (per tensor, through
`workers.checkpoint.load_expert_weights`): a shard never reads the whole model.

Wire format. Per step and per MoE layer the engine sends each shard ONE message, a `ShardBatch`
packed into a single `bytes` object: a small int32 header, the local expert slots [t, K] int32,
the routing weights [t, K] float32 and the hidden rows [t, D] in the model's dtype. The reply is
the raw float32 bytes of [t, D]: the shard's routed output for those rows, already weighted and
summed over the experts this shard served. Measured on the 2-core dev machine, Ray compiled-graph
channels move one `bytes` object 3x faster than the same data as numpy arrays (Ray's numpy
serializer dominates), and torch tensors are slower still, so nothing but bytes crosses. The
same bytes travel over any transport: a Ray call (`run`), a compiled-graph channel, or a Unix
socket served by the actor itself (`serve_socket`, length-prefixed frames).

Shape letters: docs/SHAPES.md (t = the rows of the batch bound for this shard).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np
import torch
from moeray import kernels
from moeray.kernels.dispatch import resolve
from moeray.workers.gemv import expert_linear
from moeray.workers.moe import column_major, cpu_fused_moe

# dtype <-> header code; bf16 has no numpy twin, so tensors cross as raw bytes and are re-viewed.
_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
_HEADER = 5  # int32 words: layer, t, K, D, dtype code


@dataclass
class ShardBatch:
    """The rows of one MoE layer's batch that one shard serves.

    hidden [t, D] (model dtype), topk_weights [t, K] float32, local_ids [t, K] int32: the slot of
    each routed expert in the shard's table for `layer`, or -1 where another shard serves it.
    """

    layer: int
    hidden: torch.Tensor
    topk_weights: torch.Tensor
    local_ids: torch.Tensor

    def pack(self) -> bytes:
        """One contiguous bytes object: header, ids, weights, hidden."""
        return pack_batch(
            self.layer,
            raw_rows(self.hidden),
            self.hidden.dtype,
            self.topk_weights.to(torch.float32).numpy(),
            self.local_ids.to(torch.int32).numpy(),
        )

    @classmethod
    def unpack(cls, msg: bytes | bytearray) -> ShardBatch:
        """Inverse of `pack`; the tensors are views of one private copy of `msg` (of `msg` itself
        when it is a bytearray, e.g. a frame fresh from `recv_frame`: the caller hands it over)."""
        # writable, so torch.frombuffer needs no copy and warns about nothing
        buf = msg if isinstance(msg, bytearray) else bytearray(msg)
        layer, t, k, d, code = np.frombuffer(buf, dtype=np.int32, count=_HEADER).tolist()
        dtype = _DTYPES[code]
        if t == 0:  # torch.frombuffer refuses count=0
            ids0 = torch.empty(0, k, dtype=torch.int32)
            return cls(layer, torch.empty(0, d, dtype=dtype), torch.empty(0, k), ids0)
        off = _HEADER * 4
        ids = torch.frombuffer(buf, dtype=torch.int32, count=t * k, offset=off).view(t, k)
        off += t * k * 4
        weights = torch.frombuffer(buf, dtype=torch.float32, count=t * k, offset=off).view(t, k)
        off += t * k * 4
        hidden = torch.frombuffer(buf, dtype=dtype, count=t * d, offset=off).view(t, d)
        return cls(layer, hidden, weights, ids)


def raw_rows(hidden: torch.Tensor) -> np.ndarray:
    """hidden [T, D] (any float dtype) -> a numpy view of its bytes, [T, D * itemsize] uint8."""
    return hidden.contiguous().view(torch.uint8).numpy()


def pack_batch(
    layer: int,
    hidden_raw: np.ndarray,
    dtype: torch.dtype,
    weights: np.ndarray,
    local_ids: np.ndarray,
) -> bytes:
    """ShardBatch.pack on numpy views (the engine's per-layer hot path slices rows in numpy):
    hidden_raw [t, D * itemsize] uint8, weights [t, K] float32, local_ids [t, K] int32."""
    t = hidden_raw.shape[0]
    d = hidden_raw.shape[1] // dtype.itemsize
    header = np.array([layer, t, local_ids.shape[1], d, _DTYPES.index(dtype)], dtype=np.int32)
    parts = (
        header,
        np.ascontiguousarray(local_ids, dtype=np.int32),
        np.ascontiguousarray(weights, dtype=np.float32),
        np.ascontiguousarray(hidden_raw),
    )
    return b"".join([p.data for p in parts])  # numpy buffers, one copy into the message


_FRAME = struct.Struct("<Q")  # socket transport: every message is a length-prefixed frame


def send_frame(sock: socket.socket, payload: bytes | bytearray | memoryview) -> None:
    """Length prefix and payload in one sendmsg (scatter-gather: the payload is not copied)."""
    view = memoryview(payload)
    n = view.nbytes
    if n == 0:  # (cast refuses views with a zero in their shape)
        sock.sendall(_FRAME.pack(0))
        return
    view = view.cast("B")
    sent = sock.sendmsg([_FRAME.pack(n), view]) - _FRAME.size
    if sent < 0:  # not even the prefix went out (a full socket buffer): plain sendall
        sock.sendall(_FRAME.pack(n)[sent:])
        sent = 0
    if sent < n:
        sock.sendall(view[sent:])


def recv_frame(sock: socket.socket) -> bytearray:
    """One frame's payload, a fresh bytearray the caller owns; ConnectionError if the peer
    closed (e.g. the shard died)."""
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    return _recv_exact(sock, n)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("expert shard socket closed")
        got += k
    return buf


def unpack_result(msg: bytes | bytearray, rows: int, hidden_size: int) -> torch.Tensor:
    """A shard's reply -> float32 [rows, D] (a view of a private copy; of `msg` itself when it
    is a bytearray, which the caller hands over)."""
    buf = msg if isinstance(msg, bytearray) else bytearray(msg)
    return torch.frombuffer(buf, dtype=torch.float32).view(rows, hidden_size)


def _is_column_major(w: torch.Tensor) -> bool:
    """[..., out, in] stored with its last two dims swapped (moe.column_major's layout)."""
    return w.dim() >= 2 and w.shape[-1] > 1 and w.transpose(-1, -2).is_contiguous()


class ExpertShard:
    """The expert FFNs of one shard and the method the engine calls per layer.

    Created as a Ray actor by `workers.ray_experts.ShardPool` (`ray.remote(ExpertShard)`); it is a
    plain class so that tests and benchmarks can also run it in-process.
    """

    def __init__(
        self,
        assignment: dict[int, list[int]],
        checkpoint: str | None = None,
        dtype: str = "auto",
        weights: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        device: str = "cpu",
    ) -> None:
        """assignment: model layer -> global expert ids held. Weights come from `checkpoint`
        (only those experts' tensors are read) or, for synthetic benchmarks, from `weights`
        (layer -> full w1 [E, 2F, D], w2 [E, D, F], sliced here)."""
        if (checkpoint is None) == (weights is None):
            raise ValueError("ExpertShard needs exactly one of checkpoint= or weights=")
        self.device = torch.device(device)
        self.assignment = {int(li): sorted(int(e) for e in es) for li, es in assignment.items()}
        self.tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, experts in self.assignment.items():
            if weights is not None:
                full1, full2 = weights[layer]
                w1, w2 = full1[experts], full2[experts]
                col = _is_column_major(full1) and _is_column_major(full2)
            else:
                from moeray.workers.checkpoint import load_expert_weights

                assert checkpoint is not None
                w1, w2 = load_expert_weights(checkpoint, layer, experts, dtype)
                col = True  # as the in-process loader stores them (workers/loader.py)
            self.tables[layer] = (self._layout(w1, col), self._layout(w2, col))

    def _layout(self, w: torch.Tensor, col: bool) -> torch.Tensor:
        """The storage the in-process experts use for the same weights: fp32 on CPU column-major
        when `col` (see moe.column_major: those GEMMs stream weights ~1.5x faster at a few rows
        per expert; and the same layout means the same GEMM kernel, so the same numbers as the
        in-process experts), otherwise row-major."""
        w = w.to(self.device)
        if col and self.device.type == "cpu" and w.dtype == torch.float32:
            return column_major(w)
        return w.contiguous()

    def ready(self) -> dict[int, list[int]]:
        """Plain actor call used to wait for loading (and to probe liveness): the assignment."""
        return self.assignment

    def node_id(self) -> str:
        """The Ray node this actor runs on (the socket transport needs the engine's node)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def serve_socket(self, path: str) -> str:
        """Serves `run` on a Unix socket at `path` from a daemon thread, for one connection:
        receives packed ShardBatch frames, answers each with its result frame, and stops when
        the engine closes the connection. Returns once listening. (Plain calls keep working.)"""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        threading.Thread(target=self._serve, args=(srv, path), daemon=True).start()
        return path

    def _serve(self, srv: socket.socket, path: str) -> None:
        try:
            conn, _ = srv.accept()
            with conn:
                while True:
                    out = self._compute(ShardBatch.unpack(recv_frame(conn)))  # [t, D] f32
                    send_frame(conn, out.numpy().data)  # no copy
        except OSError:  # the engine closed the connection (or went away): this loop is done
            pass
        finally:
            srv.close()
            with contextlib.suppress(OSError):
                os.unlink(path)

    def run(self, msg: bytes) -> bytes:
        """Receives a packed ShardBatch, returns float32 [t, D] bytes (weighted, summed over K).

        An empty batch (t = 0, sent because a compiled graph runs every shard) returns b"".
        """
        return self._compute(ShardBatch.unpack(msg)).numpy().tobytes()

    def _compute(self, batch: ShardBatch) -> torch.Tensor:
        """The shard's routed output for `batch`: contiguous float32 [t, D] on the CPU."""
        t = batch.hidden.shape[0]
        if t == 0:
            return torch.empty(0, batch.hidden.shape[1])
        w1, w2 = self.tables[batch.layer]
        if self.device.type == "cpu":
            # fp32 activations on CPU: the reference upcasts anyway, and fp32 partials keep the
            # sum over shards as exact as the in-process sum
            x = batch.hidden.float()
            if resolve(x) == "torch":
                return cpu_fused_moe(x, w1, w2, batch.topk_weights, batch.local_ids, expert_linear)
            return kernels.fused_moe(x, w1, w2, batch.topk_weights, batch.local_ids).float()
        # CUDA kernels take the model dtype
        out = kernels.fused_moe(
            batch.hidden.to(self.device),
            w1,
            w2,
            batch.topk_weights.to(self.device),
            batch.local_ids.to(self.device),
        )  # [t, D]
        return out.float().cpu().contiguous()
