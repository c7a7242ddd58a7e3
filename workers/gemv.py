"""Batch-1 fp32 linear layers on CPU through numpy's BLAS: the decode GEMV at one request.

A decode step of one sequence multiplies one row by every weight matrix of the model, so the step
is bound by how fast those matrices stream from DRAM. With the column-major weights the CPU loader
stores (moe.column_major), torch's BLAS call for x[1, in] @ W^T streams at about 22 GB/s on the
2-core dev VM, while OpenBLAS (the BLAS numpy ships) streams the same contiguous [in, out] matrix
at 30-39 GB/s on one thread (measured, cold weights, 2026-11-23: expert w1 [2048, 512]
188 -> 140 us, w2 [512, 1024] 116 -> 84 us, the [32000, 512] LM head 2.35 -> 1.69 ms). Batches of more than one row keep torch's GEMM, which is
the faster one there. The numpy calls share memory with the tensors (no copies); outputs are new
tensors. Same math (fp32 products and sums), different summation order than torch's kernel.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
#: OpenBLAS's thread-count setters, by the symbol names of its builds (numpy ships scipy-openblas).
_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")  # fmt: skip


@functools.cache
def numpy_blas_ready() -> bool:
    """Makes numpy's OpenBLAS single-threaded (once per process); False when it can't be.

    One thread is what pays: OpenBLAS's worker threads busy-wait after each call, and beside
    torch's own OpenMP workers on a small machine they starve each other (measured: a batch-1
    decode step 11 -> 65 ms with two OpenBLAS threads). One OpenBLAS thread on the caller's core
    streams at 30-39 GB/s, still faster than torch's call. Without a setter to call (another BLAS
    under numpy), the torch path is kept.
    """
    np.zeros(1) @ np.zeros(1)  # make sure numpy's BLAS is loaded
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter(1)
                return True
    log.info("numpy's BLAS is not OpenBLAS: batch-1 linears stay on torch")
    return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); x [1, in] fp32 on CPU with a column-major weight [out, in] (the
    CPU loader's layout) goes through numpy's BLAS, anything else through torch (row-major
    weights keep torch's exact numbers: measured no faster through numpy in the model)."""
    if (
        x.dim() == 2 and x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
        and weight.dtype == torch.float32 and weight.dim() == 2 and weight.stride(0) == 1
        and not x.requires_grad and not weight.requires_grad and numpy_blas_ready()
    ):  # fmt: skip
        out = torch.from_numpy(x.numpy() @ weight.t().numpy())  # [1, in] @ contiguous [in, out]
        return out if bias is None else out.add_(bias)
    return F.linear(x, weight, bias)
