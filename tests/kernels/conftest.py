"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET is read when a @triton.jit function is *decorated*, i.e. when moeray's triton_*
modules are imported. This conftest sets it at import time, before any test here imports them;
test_triton_vs_reference.py asserts it took effect (a test folder collected earlier that imported
the triton_* modules would make the kernels compile for a GPU instead, and that test says so).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

# Tolerances scale with the largest reference magnitude: bf16 keeps 8 bits of mantissa and the
# Triton path rounds its intermediates (h, y) to the activation dtype, the reference does not.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def compare(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    """Asserts out ~ ref within the dtype's tolerance; prints max/mean error (see pytest -s)."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{name}: dtype {out.dtype} != {ref.dtype}"
    err = (out.float() - ref.float()).abs()
    scale = max(ref.float().abs().max().item(), 1.0) if ref.numel() else 1.0
    max_err = err.max().item() if err.numel() else 0.0
    mean_err = err.mean().item() if err.numel() else 0.0
    print(f"{name}: max err {max_err:.3e}, mean err {mean_err:.3e}, scale {scale:.3g}, {ref.dtype}")
    assert max_err <= TOLERANCE[ref.dtype] * scale, f"{name}: max err {max_err:.3e} too large"


@pytest.fixture
def close():
    """The comparison helper, as a fixture so test modules need not import conftest."""
    return compare


def _on_thread_counts(run, counts=(1, 2, 3)):
    """[run() with torch on each of `counts` intra-op threads]; the thread count is restored."""
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in counts:
            torch.set_num_threads(threads)
            outs.append(run())
        return outs
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def on_thread_counts():
    """Runs a callable on 1, 2 and 3 torch threads: `outs = on_thread_counts(lambda: ...)`."""
    return _on_thread_counts
