"""moeray's CPU GEMM (kernels/cpu_gemm.cpp) against float64 products of the same inputs.

Each output must lie within the rounding bound of an fp32-accumulated product: K * 2^-24 of
|x| @ |w|^T, plus, for bf16 outputs, half a bf16 ulp of the result. Shapes cover the kernel's
loops and their edges: one row (the streaming loop), 2-13 rows (register tiles of 6, 4, 2, 1),
16-47 rows (AMX's row tiles of 32 and 16 and a padded tail, on CPUs with AMX: bf16 with K a
multiple of 32), column counts that are not multiples of the 4-block tile or of a 16-column block,
odd K (fp32), strided inputs, no rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
from moeray import kernels
from moeray.kernels import PackedWeight, cpu_gemm, cpu_packed, packed_linear

pytestmark = pytest.mark.skipif(
    not cpu_gemm.available(),
    reason="this CPU has neither AVX512_BF16 nor AVX2 with FMA, or the extension did not build",
)


def _bound(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    K = x.shape[1]
    bound = K * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    if dtype == torch.bfloat16:
        bound = bound + ref.abs() * 2.0**-8
    return bound + 1e-30


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5, 6, 7, 13, 16, 32, 33, 47])
@pytest.mark.parametrize(
    ("out", "inp"), [(64, 32), (70, 24), (24, 70), (200, 130), (16, 2), (70, 96), (48, 256)]
)
def test_linear_is_within_rounding_of_float64(dtype, rows, out, inp):
    g = torch.Generator().manual_seed(rows * 1000 + out)
    w = torch.randn(out, inp, generator=g).to(dtype)
    x = torch.randn(rows, 2 * inp, generator=g).to(dtype)[:, ::2]  # strided input
    got = cpu_gemm.linear(x, cpu_gemm.pack(w), out)
    assert got.shape == (rows, out) and got.dtype == dtype
    ref = x.double() @ w.double().T
    err = (got.double() - ref).abs()
    assert bool((err <= _bound(x, w, ref, dtype)).all()), f"max err {err.max().item():.3e}"


def test_amx_and_the_avx512_loop_both_hold_the_bound():
    """On a CPU with AMX every bf16 call with K % 32 == 0 runs on tiles; MOERAY_AMX=0 (read once
    per process) keeps the AVX-512 loop, which must stay right there too. Run in a child process
    so that both are checked on such a machine (elsewhere the child runs what this one does)."""
    code = (
        "import torch; from moeray.kernels import cpu_gemm; "
        "g = torch.Generator().manual_seed(3); "
        "w = torch.randn(70, 96, generator=g).bfloat16(); "
        "x = torch.randn(37, 96, generator=g).bfloat16(); "
        "got = cpu_gemm.linear(x, cpu_gemm.pack(w), 70).double(); "
        "ref = x.double() @ w.double().T; "
        "bound = 96 * 2.0**-24 * (x.double().abs() @ w.double().abs().T) + ref.abs() * 2.0**-8; "
        "print(cpu_gemm.amx(), bool(((got - ref).abs() <= bound + 1e-30).all()))"
    )
    env = {**os.environ, "MOERAY_AMX": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]


def test_a_bad_moeray_amx_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch):
    for ok in ("0", "1"):
        monkeypatch.setenv("MOERAY_AMX", ok)
        cpu_gemm._check_amx_env()
    monkeypatch.setenv("MOERAY_AMX", "off")
    with pytest.raises(ValueError, match=r"MOERAY_AMX must be 0 .* got 'off'"):
        cpu_gemm._check_amx_env()


def test_odd_fp32_columns():
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(33, 7, generator=g), torch.randn(4, 7, generator=g)
    for t in (1, 4):
        ref = x[:t].double() @ w.double().T
        err = (cpu_gemm.linear(x[:t], cpu_gemm.pack(w), 33).double() - ref).abs()
        assert bool((err <= _bound(x[:t], w, ref, torch.float32)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype, on_thread_counts):
    """Each output is one thread's fixed-order sum: a one-thread shard and a two-thread engine
    compute an expert's rows alike."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(1000, 256, generator=g).to(dtype)
    x = torch.randn(9, 256, generator=g).to(dtype)
    packed = cpu_gemm.pack(w)
    outs = on_thread_counts(
        lambda: (cpu_gemm.linear(x[:1], packed, 1000), cpu_gemm.linear(x, packed, 1000))
    )
    for one, many in outs[1:]:
        assert torch.equal(one, outs[0][0]) and torch.equal(many, outs[0][1])


def test_packed_weight_takes_it_unless_told_otherwise():
    w = torch.randn(48, 32)
    x = torch.randn(3, 32)
    own = PackedWeight(w)
    assert own.blocked is not None and own.packed is None
    with kernels.use_backend("onednn"):
        onednn = PackedWeight(w)
        assert kernels.dispatch.packs_cpu_weights(w)
    assert onednn.blocked is None and onednn.packed is not None
    torch.testing.assert_close(packed_linear(x, own), packed_linear(x, onednn))


@pytest.mark.skipif(
    not cpu_packed.onednn_supports(torch.bfloat16), reason="oneDNN has no bf16 GEMM on this CPU"
)
def test_odd_bf16_columns_stay_on_onednn():
    """vdpbf16ps multiplies pairs along K: a bf16 weight with odd K is left to oneDNN."""
    w = torch.randn(32, 7).to(torch.bfloat16)
    packed = PackedWeight(w)
    assert packed.blocked is None
    x = torch.randn(2, 7).to(torch.bfloat16)
    torch.testing.assert_close(packed_linear(x, packed), torch.nn.functional.linear(x, w))


def test_mismatched_input_is_refused():
    packed = cpu_gemm.pack(torch.randn(32, 16))
    with pytest.raises(RuntimeError, match=r"x must be \[T, 16\] of the weight's dtype"):
        cpu_gemm.linear(torch.randn(2, 8), packed, 32)
    with pytest.raises(RuntimeError, match="of the weight's dtype"):
        cpu_gemm.linear(torch.randn(2, 16).to(torch.bfloat16), packed, 32)
    with pytest.raises(RuntimeError, match="N does not match"):
        cpu_gemm.linear(torch.randn(2, 16), packed, 48)


def test_the_best_instruction_set_the_cpu_has_is_built(monkeypatch: pytest.MonkeyPatch):
    avx512 = set(cpu_gemm.ISAS["avx512"][0])
    for flags, runs in [
        (avx512 | {"avx2", "fma"}, ["avx512", "avx2"]),
        ({"avx2", "fma", "avx512f", "avx512bw"}, ["avx2"]),  # AVX-512 without bf16 dot products
        ({"avx", "avx2"}, []),  # no FMA
    ]:
        monkeypatch.setattr(cpu_gemm, "_cpu_flags", lambda flags=flags: flags)
        assert cpu_gemm.isas() == runs
        assert cpu_gemm.isa() == next(iter(runs), None)
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_gemm.build("neon")
    # a build this CPU cannot run is refused, not compiled and imported (SIGILL)
    with pytest.raises(ValueError, match="isa 'avx2': this CPU cannot run it"):
        cpu_gemm.build("avx2")


def test_a_stale_build_lock_does_not_block_loading():
    """A builder killed mid-build leaves torch's lock file; one older than a build could take is
    removed, and the finished build is imported (fresh locks are left to their builders)."""
    isa = cpu_gemm.isa()
    assert isa is not None
    _, directory = cpu_gemm._name_and_directory(isa)
    lock = directory / "lock"
    assert not lock.exists()
    lock.touch()
    try:
        old = time.time() - cpu_gemm.STALE_LOCK_S - 1
        os.utime(lock, (old, old))
        module = cpu_gemm.build(isa)
        assert not lock.exists()
        x, w = torch.randn(2, 16), torch.randn(16, 16)
        torch.testing.assert_close(module.linear(x, module.pack(w), 16), x @ w.T)
    finally:
        lock.unlink(missing_ok=True)


# --- fused_moe: one MoE layer in one call --------------------------------------------------


def _moe_case(T: int, E: int, K: int, D: int, F_: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(E, 2 * F_, D, generator=g) / 4).to(dtype)
    w2 = (torch.randn(E, D, F_, generator=g) / 4).to(dtype)
    hidden = torch.randn(T, D, generator=g).to(dtype)
    weights, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=g), -1), K)
    return w1, w2, hidden, weights, ids.to(torch.int32)


def _stacked(w: torch.Tensor) -> torch.Tensor:
    return torch.stack([cpu_gemm.pack(x) for x in w.unbind(0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("T", "D", "F_"), [(1, 48, 40), (9, 40, 24), (40, 64, 64)])
def test_fused_moe_is_the_loop_over_linear(dtype, T, D, F_):
    """The one-call layer computes what a loop over linear() with torch's SwiGLU does: the same
    GEMM on the same rows for w1, a SwiGLU within a few fp32 ulps (its own e^x), so w2's
    products within what that moves, the combine in expert order. Foreign ids (-1, a shard's
    view) and ids past E contribute nothing. A wrong row, expert, weight or column tail is off
    by orders of magnitude more."""
    E, K = 6, 2
    w1, w2, hidden, weights, ids = _moe_case(T, E, K, D, F_, dtype, T + D)
    ids[::3, 0] = -1
    ids[1::4, 1] = E + 3
    got = cpu_gemm.fused_moe(hidden, _stacked(w1), _stacked(w2), weights, ids, F_)
    assert got.shape == (T, D) and got.dtype == torch.float32
    # act may differ from torch's SwiGLU by a few fp32 ulps, and then by one rounding step of
    # the dtype; y moves by that times |act| @ |w2|^T (plus, in bf16, one rounding of y)
    ulps = 2.0**-20 if dtype == torch.float32 else 2.0**-8
    y_ulps = 0.0 if dtype == torch.float32 else 2.0**-8  # y is rounded to bf16 too
    ref = torch.zeros(T, D, dtype=torch.float64)
    bound = torch.zeros(T, D, dtype=torch.float64)
    for e in range(E):
        tok, k = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            h = cpu_gemm.linear(hidden[tok], cpu_gemm.pack(w1[e]), 2 * F_).double()
            act = (torch.nn.functional.silu(h[:, :F_]) * h[:, F_:]).to(dtype)
            y = cpu_gemm.linear(act, cpu_gemm.pack(w2[e]), D).double()
            w = weights[tok, k, None].double()
            ref.index_add_(0, tok, y * w)
            spread = act.double().abs() @ w2[e].double().abs().T  # [n, D]
            moved = (ulps + F_ * 2.0**-24) * spread + y_ulps * y.abs()
            bound.index_add_(0, tok, moved * w)
    bound += K * 2.0**-24 * ref.abs() + 1e-30  # the fp32 combine
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_per_slot_rows_add_up_to_the_layer_bit_for_bit(dtype):
    """What sharded experts rely on (workers/expert_routing.py): each (token, choice) slot run
    alone as a K = 1 row, the fp32 rows added per token in ascending expert id, equals the
    in-process layer exactly. A fused multiply-add in the combine would break it."""
    E, K, D, F_ = 8, 3, 40, 48
    w1, w2, hidden, weights, ids = _moe_case(17, E, K, D, F_, dtype, 7)
    s1, s2 = _stacked(w1), _stacked(w2)
    layer = cpu_gemm.fused_moe(hidden, s1, s2, weights, ids, F_)
    # a shard's call: every (token, choice) slot a K = 1 row, row-major, so each expert's GEMM
    # sees the same rows as in the layer (workers/expert_shard.py)
    slots = cpu_gemm.fused_moe(
        hidden.repeat_interleave(K, 0), s1, s2, weights.reshape(-1, 1), ids.reshape(-1, 1), F_
    ).view(17, K, D)
    summed = torch.zeros(17, D)
    for k in ids.argsort(dim=1, stable=True).T:  # per token, its slots by ascending expert id
        summed += slots[torch.arange(17), k]
    assert torch.equal(layer, summed)


def test_fused_moe_swiglu_holds_over_the_whole_range():
    """silu(g) * u with g = u = x, read back through identity weights: within 4 fp32 ulps of the
    float64 value from -100 to 100 (e^x is clamped at +-88.4: below -88.4 both values are under
    1e-33, and the bound allows that much)."""
    D = 32
    x = torch.linspace(-100.0, 100.0, 64 * D).reshape(64, D)
    eye = torch.eye(D)
    w1 = torch.cat([eye, eye])[None]  # [1, 2D, D]: gate = up = x
    w2 = eye[None]  # [1, D, D]
    ones = torch.ones(64, 1)
    first = torch.zeros(64, 1, dtype=torch.int32)
    got = cpu_gemm.fused_moe(x, _stacked(w1), _stacked(w2), ones, first, D)
    ref = torch.nn.functional.silu(x.double()) * x.double()
    err = (got.double() - ref).abs()
    assert bool((err <= 4 * 2.0**-24 * ref.abs() + 1e-30).all()), f"max err {err.max().item():.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("T", "D", "F_"),
    # the second pass and the SwiGLU on one thread; every pass shared between the threads
    [(11, 64, 80), (16, 128, 512)],
)
def test_fused_moe_does_not_depend_on_the_thread_count(dtype, T, D, F_, on_thread_counts):
    w1, w2, hidden, weights, ids = _moe_case(T, 4, 2, D, F_, dtype, 3)
    s1, s2 = _stacked(w1), _stacked(w2)
    outs = on_thread_counts(lambda: cpu_gemm.fused_moe(hidden, s1, s2, weights, ids, F_))
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_fused_moe_refuses_mismatched_input():
    w1, w2, hidden, weights, ids = _moe_case(3, 4, 2, 32, 16, torch.float32, 1)
    s1, s2 = _stacked(w1), _stacked(w2)
    with pytest.raises(RuntimeError, match=r"hidden must be \[T, 32\] of the weights' dtype"):
        cpu_gemm.fused_moe(hidden[:, :16], s1, s2, weights, ids, 16)
    with pytest.raises(RuntimeError, match="of the weights' dtype"):
        cpu_gemm.fused_moe(hidden.to(torch.bfloat16), s1, s2, weights, ids, 16)
    with pytest.raises(RuntimeError, match="w1 must pack"):
        cpu_gemm.fused_moe(hidden, s1, s2, weights, ids, 24)
    with pytest.raises(RuntimeError, match="w1 and w2 must be"):
        cpu_gemm.fused_moe(hidden, s1[0], s2, weights, ids, 16)
    with pytest.raises(RuntimeError, match=r"must be \[T, K\]"):
        cpu_gemm.fused_moe(hidden, s1, s2, weights[:2], ids[:2], 16)
