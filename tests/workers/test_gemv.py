"""workers/gemv.py: fp32 CPU linears through numpy's OpenBLAS, and the per-step thread policy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from moeray.workers.engine import LLMEngine
from moeray.workers.gemv import blas_step_active, cpu_blas_step, linear, numpy_blas_ready
from moeray.workers.moe import column_major


def test_blas_step_routes_every_row_count_and_restores_threads(two_threads: None) -> None:
    assert numpy_blas_ready()
    torch.manual_seed(0)
    w = column_major(torch.randn(96, 64))
    xs = torch.randn(5, 64)
    assert torch.equal(linear(xs, w), F.linear(xs, w))  # outside a step: torch for 5 rows
    with cpu_blas_step(2):
        assert blas_step_active() and torch.get_num_threads() == 1
        inside = linear(xs, w)
        # Row-major weights keep torch's own numbers (same thread count: MKL's bits depend on it).
        rowmajor_same = torch.equal(linear(xs, w.contiguous()), F.linear(xs, w.contiguous()))
    assert not blas_step_active() and torch.get_num_threads() == 2
    assert not torch.equal(inside, F.linear(xs, w))  # numpy's BLAS really ran
    torch.testing.assert_close(inside, F.linear(xs, w), rtol=1e-6, atol=1e-5)
    assert rowmajor_same
    with cpu_blas_step(1):  # one thread: nothing to trade, a plain step
        assert not blas_step_active() and torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), cpu_blas_step(2):
        raise RuntimeError("a failing step")
    assert not blas_step_active() and torch.get_num_threads() == 2


def test_engine_uses_the_policy_for_fp32_cpu_only(
    tiny_checkpoint: Callable[..., Path], two_threads: None
) -> None:
    fp32 = LLMEngine(tiny_checkpoint("mixtral"))
    bf16 = LLMEngine(tiny_checkpoint("mixtral", dtype="bfloat16"))
    assert fp32.blas_threads == 2 and bf16.blas_threads == 0


def test_large_gemm_outside_a_step_splits_over_two_threads(two_threads: None) -> None:
    """The sharded engine's LM head: two single-threaded OpenBLAS halves, same numbers as one
    OpenBLAS call over the whole matrix would give to fp32 rounding; threads called at once."""
    import threading

    from moeray.workers.gemv import SPLIT_MIN_BYTES

    torch.manual_seed(0)
    out_features = SPLIT_MIN_BYTES // (4 * 256) + 7  # odd: the halves differ by one column
    w = column_major(torch.randn(out_features, 256))
    xs = torch.randn(6, 256)
    want = F.linear(xs, w)
    got = linear(xs, w)
    assert got.shape == want.shape and not torch.equal(got, want)  # numpy's BLAS ran
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    results: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: results.append(linear(xs, w))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3 and all(torch.equal(r, got) for r in results)
