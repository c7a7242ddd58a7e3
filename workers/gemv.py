"""fp32 linear layers on CPU through numpy's BLAS: the batch-1 decode GEMV, and whole model
steps inside `cpu_blas_step`.

A decode step of one sequence multiplies one row by every weight matrix of the model, so the step
is bound by how fast those matrices stream from DRAM. With the column-major weights the CPU loader
stores (moe.column_major), torch's BLAS call for x[1, in] @ W^T streams at about 22 GB/s on the
2-core dev VM, while OpenBLAS (the BLAS numpy ships) streams the same contiguous [in, out] matrix
at 30-39 GB/s on one thread (measured, cold weights, 2026-11-23: expert w1 [2048, 512]
188 -> 140 us, w2 [512, 1024] 116 -> 84 us, the [32000, 512] LM head 2.35 -> 1.69 ms).
Outside cpu_blas_step, inputs of more than one row keep torch's GEMM (OpenBLAS on one thread is
slower there). The numpy calls share memory with the tensors (no copies); outputs are new
tensors. Same math (fp32 products and sums), different summation order than torch's kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from moeray.workers.omp import OmpParking

log = logging.getLogger(__name__)
#: OpenBLAS's thread-count setters, by the symbol names of its builds (numpy ships scipy-openblas).
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")  # fmt: skip


_step = threading.local()  # .threads: OpenBLAS threads of the model step running on this thread


@functools.cache
def _openblas_setter() -> Any:
    """OpenBLAS's set_num_threads of the library numpy loaded, or None."""
    np.zeros(1) @ np.zeros(1)  # make sure numpy's BLAS is loaded
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                return setter
    return None


@functools.cache
def numpy_blas_ready() -> bool:
    """Makes numpy's OpenBLAS single-threaded (once per process); False when it can't be.

    One thread is what pays: OpenBLAS's worker threads busy-wait after each call, and beside
    torch's own OpenMP workers on a small machine they starve each other (measured: a batch-1
    decode step 11 -> 65 ms with two OpenBLAS threads). One OpenBLAS thread on the caller's core
    streams at 30-39 GB/s, still faster than torch's call. Without a setter to call (another BLAS
    under numpy), the torch path is kept.
    """
    setter = _openblas_setter()
    if setter is not None:
        setter(1)
        return True
    log.info("numpy's BLAS is not OpenBLAS: batch-1 linears stay on torch")
    return False


def blas_step_active() -> bool:
    """True inside cpu_blas_step on this thread: every fp32 CPU GEMM goes through numpy."""
    return getattr(_step, "threads", 0) > 0


@contextlib.contextmanager
def cpu_blas_step(threads: int) -> Iterator[None]:
    """One fp32 CPU model step with its GEMMs in numpy's OpenBLAS on `threads` threads, and
    torch's intra-op pool down to one thread meanwhile (restored after).

    Why: on the 2-core dev VM the step's GEMMs stream and compute faster in OpenBLAS than in
    torch's BLAS at every batch size measured, but the two libraries' worker threads busy-wait
    after each call and starve each other when both pools are up; one pool at a time is what
    pays (bench-model step, measured 2026-11-23: batch 1 10.7 -> 7.0 ms, batch 32 66.6 -> 56.2
    ms). The engine uses it only when its experts are in-process (expert shards need the
    cores the spinning workers would take). threads < 2, or no OpenBLAS: a plain step.
    """
    if threads < 2 or not numpy_blas_ready():
        yield
        return
    setter = _openblas_setter()
    assert setter is not None
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    setter(threads)
    _step.threads = threads
    try:
        yield
    finally:
        _step.threads = 0
        setter(1)
        torch.set_num_threads(before)


def expert_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The routed experts' GEMM on fp32 CPU (`moe.cpu_fused_moe`, in-process and in the expert
    shards alike, so both give the same numbers): numpy's BLAS for column-major weights at any
    row count (OpenBLAS splits its GEMMs over output blocks, so its thread count does not change
    the bits), torch otherwise."""
    if _numpy_operands(x, weight):
        return torch.from_numpy(x.numpy() @ weight.t().numpy())
    return F.linear(x, weight)


#: Weights at least this big (bytes) take the two-thread split outside a BLAS step (the LM head).
SPLIT_MIN_BYTES = 16 * 1024 * 1024


class _SplitWorker:
    """A second thread for half of a large GEMM, blocked on a queue (no spinning) in between.
    The caller computes the other half; numpy releases the GIL inside OpenBLAS (one thread
    each), and torch's OpenMP workers are parked meanwhile so they do not take the core."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._parking = OmpParking()
        self._lock = threading.Lock()  # one split GEMM at a time (the worker has one job slot)
        threading.Thread(target=self._loop, name="moeray-gemm-half", daemon=True).start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException as e:  # handed back to the caller
                self._error = e
            finally:
                self._done.set()

    def matmul(self, x: np.ndarray, wt: np.ndarray) -> np.ndarray:
        """x [M, in] @ wt [in, out], the out columns split between the two threads."""
        out = np.empty((x.shape[0], wt.shape[1]), dtype=np.float32)
        half = wt.shape[1] // 2

        def both() -> None:
            self._done.clear()
            self._error = None

            def other_half() -> None:
                np.matmul(x, wt[:, half:], out=out[:, half:])

            self._jobs.put(other_half)
            np.matmul(x, wt[:, :half], out=out[:, :half])
            self._done.wait()
            if self._error is not None:
                raise self._error

        with self._lock:
            self._parking.run(both)
        return out


@functools.cache
def _split_worker() -> _SplitWorker:
    return _SplitWorker()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); x [1, in] (or, inside cpu_blas_step, x [T, in]) fp32 on CPU
    with a column-major weight [out, in] (the CPU loader's layout) goes through numpy's BLAS,
    anything else through torch (row-major weights keep torch's exact numbers)."""
    if not _numpy_operands(x, weight):
        return F.linear(x, weight, bias)
    if x.shape[0] == 1 or blas_step_active():
        out = torch.from_numpy(x.numpy() @ weight.t().numpy())  # [T, in] @ contiguous [in, out]
    elif weight.numel() * 4 >= SPLIT_MIN_BYTES and torch.get_num_threads() >= 2:
        # A large GEMM outside a BLAS step (experts on shards: torch's pool stays up): two
        # single-threaded OpenBLAS halves (the 32-row LM head: 11.1 ms in torch, see _SplitWorker).
        out = torch.from_numpy(_split_worker().matmul(x.contiguous().numpy(), weight.t().numpy()))
    else:
        return F.linear(x, weight, bias)
    return out if bias is None else out.add_(bias)


def _numpy_operands(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU x [T, in] and a column-major fp32 weight [out, in], no autograd, OpenBLAS ready."""
    return (
        x.dim() == 2 and x.dtype == torch.float32 and x.device.type == "cpu"
        and weight.dim() == 2 and weight.dtype == torch.float32 and weight.stride(0) == 1
        and not x.requires_grad and not weight.requires_grad and numpy_blas_ready()
    )  # fmt: skip
