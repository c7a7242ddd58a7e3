"""Expert-shard actors: each holds some (layer, expert) FFNs and runs the tokens sent to it.

A shard is created with an *assignment* (model layer -> the global expert ids it holds) and loads
only those experts' tensors from the checkpoint's safetensors (per tensor, through
`workers.checkpoint.load_expert_weights`): a shard never reads the whole model.

Wire format. Per step and per MoE layer the engine sends each shard ONE message, a `ShardBatch`
packed into a single `bytes` object: a small int32 header, the local expert slots [t, K] int32,
the routing weights [t, K] float32 and the hidden rows [t, D] in the model's dtype. The reply is
the raw float32 bytes of [n, D]: one weighted expert output per (row, choice) slot this shard
served, row-major, NOT summed over K (the engine adds them in global expert order, as the
in-process kernel does: workers/expert_routing.py). Only bytes cross (Ray's numpy and torch
serializers cost more than the data at these sizes). The same bytes travel over either
transport (workers/shard_transport.py): a plain Ray call (`run`), or a stream connection the
actor serves itself (`serve_stream`: a Unix socket when the engine is on this node, TCP
otherwise; length-prefixed frames). On one node the payloads go through a shared-memory area
(`SharedArea`: a file in /dev/shm both processes map, one half per direction) and the socket
carries only the 8-byte frame headers; a payload larger than its half falls back to the socket.

Shape letters: docs/SHAPES.md (t = the rows of the batch bound for this shard, n = its slots).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import struct
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
import torch
from moeray.kernels import ExpertWeights, fused_moe, prepare_expert_weights

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
    def unpack(cls, msg: bytes | bytearray | memoryview) -> ShardBatch:
        """Inverse of `pack`; the tensors are views of one private copy of `msg` (of `msg` itself
        when it is writable, e.g. a frame fresh from `recv_frame`: the caller hands it over)."""
        # writable, so torch.frombuffer needs no copy and warns about nothing
        writable = isinstance(msg, bytearray) or (isinstance(msg, memoryview) and not msg.readonly)
        buf = msg if writable else bytearray(msg)
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
_IN_AREA = 1 << 63  # header flag: the payload is in the shared-memory area, not on the socket
SHARED_AREA_BYTES = 4 << 20  # per direction and connection (larger payloads use the socket)


class SharedArea:
    """One same-node connection's shared memory: a file in /dev/shm (the temp dir where there is
    none) mapped by the engine and the shard; the first half carries requests, the second half
    replies. Only one message per direction is in flight, so a half is free again once its reader
    has consumed the frame. The engine creates it, the shard opens it by path, and the engine
    unlinks the name once both have it mapped."""

    def __init__(self, path: str, half: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:  # reserved now: a full tmpfs fails here, not as SIGBUS on a later write
                os.posix_fallocate(fd, 0, 2 * half)
            self._map = mmap.mmap(fd, 2 * half)
        except OSError:
            if create:
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.path = path
        view = memoryview(self._map)
        self.requests, self.replies = view[:half], view[half:]

    @classmethod
    def create(cls, name: str, half: int = SHARED_AREA_BYTES) -> SharedArea:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        return cls(os.path.join(base, name), half, create=True)

    def unlink(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        """Releases the mapping once no frame view into it is alive any more (until then the
        garbage collector keeps it)."""
        with contextlib.suppress(BufferError):
            self.requests.release()
            self.replies.release()
            self._map.close()


def send_frame(
    sock: socket.socket, payload: bytes | bytearray | memoryview, area: memoryview | None = None
) -> None:
    """Length prefix and payload: into `area` (one copy) with only the prefix on the socket, when
    an area is given and the payload fits it; else both in one sendmsg (scatter-gather)."""
    view = memoryview(payload)
    n = view.nbytes
    if n == 0:  # (cast refuses views with a zero in their shape)
        sock.sendall(_FRAME.pack(0))
        return
    view = view.cast("B")
    if area is not None and n <= area.nbytes:
        area[:n] = view
        sock.sendall(_FRAME.pack(n | _IN_AREA))
        return
    sent = sock.sendmsg([_FRAME.pack(n), view]) - _FRAME.size
    if sent < 0:  # not even the prefix went out (a full socket buffer): plain sendall
        sock.sendall(_FRAME.pack(n)[sent:])
        sent = 0
    if sent < n:
        sock.sendall(view[sent:])


def recv_frame(sock: socket.socket, area: memoryview | None = None) -> bytearray | memoryview:
    """One frame's payload: a fresh bytearray the caller owns, or, for a frame sent through
    `area`, a view of it that is valid until the peer's next frame (consume it first).
    ConnectionError if the peer closed (e.g. the shard died)."""
    (n,) = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if n & _IN_AREA:
        if area is None:
            raise ConnectionError("a shared-memory frame on a connection without an area")
        return area[: n & ~_IN_AREA]
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
        # layer -> (w1 [e, 2F, D], w2 [e, D, F]) in kernels.prepare_expert_weights' form, as
        # the in-process experts (moe.LocalExperts) hold them: same kernel, same numbers
        self.tables: dict[int, tuple[ExpertWeights, ExpertWeights]] = {}
        for layer, experts in self.assignment.items():
            if weights is not None:
                full1, full2 = weights[layer]
                w1, w2 = full1[experts], full2[experts]
            else:
                from moeray.workers.checkpoint import load_expert_weights

                assert checkpoint is not None
                w1, w2 = load_expert_weights(checkpoint, layer, experts, dtype)
            self.tables[layer] = prepare_expert_weights(
                w1.to(self.device).contiguous(), w2.to(self.device).contiguous()
            )

    def ready(self) -> dict[int, list[int]]:
        """Plain actor call used to wait for loading (and to probe liveness): the assignment."""
        return self.assignment

    def where(self) -> tuple[str, str, int]:
        """(Ray node id, node IP, pid) of this actor: the engine picks the transport by node,
        the registry records both, and tests find the process to stop."""
        import ray

        ctx = ray.get_runtime_context()
        return str(ctx.get_node_id()), str(ray.util.get_node_ip_address()), os.getpid()

    def serve_stream(self, kind: str, path: str = "", area: str = "") -> str:
        """Serves `run` on one stream connection from a daemon thread: kind "unix" listens on
        the Unix socket `path` (the engine is on this node), "tcp" on a free port of this
        node's IP (the engine is elsewhere). Receives packed ShardBatch frames, answers each
        with its result frame, stops when the engine closes the connection. `area`: the path of
        the engine's `SharedArea` for this connection (same node only), mapped before this
        returns. Returns the address to connect to ("path" or "host:port") once listening.
        Plain calls keep working."""
        if kind == "unix":
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(path)
            address = path
        elif kind == "tcp":
            import ray

            host = str(ray.util.get_node_ip_address())
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind((host, 0))
            address = f"{host}:{srv.getsockname()[1]}"
        else:
            raise ValueError(f"kind must be unix or tcp, got {kind!r}")
        shared = SharedArea(area, os.path.getsize(area) // 2, create=False) if area else None
        srv.listen(1)
        threading.Thread(target=self._serve, args=(srv, path, shared), daemon=True).start()
        return address

    def _serve(self, srv: socket.socket, path: str, area: SharedArea | None = None) -> None:
        requests = area.requests if area else None
        replies = area.replies if area else None
        try:
            conn, _ = srv.accept()
            with conn:
                if conn.family == socket.AF_INET:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                while True:
                    batch = ShardBatch.unpack(recv_frame(conn, requests))
                    out = self._compute(batch)  # [n, D] f32
                    del batch  # (its tensors may view the request area)
                    send_frame(conn, out.numpy().data, replies)  # no copy on the socket path
        except OSError:  # the engine closed the connection (or went away): this loop is done
            pass
        finally:
            srv.close()
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if area is not None:
                area.close()

    def run(self, msg: bytes) -> bytes:
        """Receives a packed ShardBatch, returns float32 [n, D] bytes: one weighted expert
        output row per (row, choice) slot this shard serves (local id >= 0), row-major.

        An empty batch (t = 0) returns b"".
        """
        return self._compute(ShardBatch.unpack(msg)).numpy().tobytes()

    def _compute(self, batch: ShardBatch) -> torch.Tensor:
        """The shard's weighted expert outputs for `batch`, one row per served (row, choice)
        slot, NOT summed over K: contiguous float32 [n, D] on the CPU.

        The engine adds them per token in global expert order (workers/expert_routing.py), as
        the in-process fused_moe does; a sum here would add them in this shard's order. Each
        slot becomes a K = 1 row for the same public kernels.fused_moe the in-process experts
        run: an expert's GEMM still sees exactly the rows it sees in-process, in the same order
        (slots are row-major, rows ascend), so the products are the same bits."""
        ids = batch.local_ids  # [t, K]
        served = ids >= 0  # [t, K]
        n = int(served.sum())
        if n == 0:
            return torch.empty(0, batch.hidden.shape[1])
        rows = served.nonzero()[:, 0]  # [n] row of each served slot, row-major
        w1, w2 = self.tables[batch.layer]
        dev = self.device
        out = fused_moe(
            batch.hidden.index_select(0, rows).to(dev),  # [n, D]
            w1,
            w2,
            batch.topk_weights[served].unsqueeze(1).to(dev),  # [n, 1]
            ids[served].unsqueeze(1).to(dev),  # [n, 1]
            out_dtype=torch.float32,  # unrounded products: the engine adds them up
        )  # [n, D]
        return out.cpu().contiguous()
