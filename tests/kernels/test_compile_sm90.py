"""Every Triton kernel compiles for an H100 (sm_90) without a GPU, with the block sizes of the
CUDA configs: ahead-of-time triton.compile down to a cubin with the ptxas that triton bundles.

This catches what the interpreter cannot: constructs the GPU compiler rejects, tiles that need
more shared memory than an H100 has, and GEMMs that would not use tensor cores (wgmma) or whose
weight loads the compiler could not pipeline (cp.async). The compiles run
in a subprocess because this folder's conftest sets TRITON_INTERPRET=1 for this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

H100_SHARED_BYTES = 232448  # 227 KiB of shared memory per block on sm_90


def _specialise(
    fn, ptrs: dict[str, str], constexprs: dict[str, object], divisible: tuple[str, ...]
):
    """Signature and attributes as the JIT would specialise them for model shapes (D, F and
    strides divisible by 16, unit inner strides as constants), so the compiler pipelines loads."""
    from triton.compiler import ASTSource

    sig = {n: ptrs.get(n, "i32") for n in fn.arg_names} | {n: "constexpr" for n in constexprs}
    hints = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in (*ptrs, *divisible)}
    return ASTSource(fn, sig, constexprs=constexprs, attrs=hints)


def compile_all() -> list[dict[str, object]]:
    """Compiles each kernel for sm_90; returns one record per kernel (run without the interpreter)."""
    import triton
    from moeray.kernels import triton_gating, triton_moe, triton_norm
    from triton.backends.compiler import GPUTarget

    bf16, i32, f32 = "*bf16", "*i32", "*fp32"
    moe_ptrs = {"sorted_slots_ptr": i32, "block_experts_ptr": i32}
    gemm = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "DOT_FP32": False}
    cases = [
        (triton_gating._topk_gating_kernel, {"logits_ptr": bf16, "bias_ptr": f32, "weights_ptr": f32, "ids_ptr": i32},
         {"TOP_K": 8, "SIGMOID": False, "HAS_BIAS": True, "RENORMALIZE": True, "BLOCK_T": 16, "BLOCK_E": 128,
          "BLOCK_K": 8, "stride_le": 1}, ("stride_lt",), 4, 1),
        (triton_moe._expert_counts_kernel, {"ids_ptr": i32, "counts_ptr": i32}, {"BLOCK": 1024}, (), 4, 1),
        (triton_moe._expert_scatter_kernel,
         {n: i32 for n in ("ids_ptr", "counts_ptr", "sorted_slots_ptr", "slot_rows_ptr", "offsets_ptr", "block_experts_ptr")},
         {"BLOCK_M": 64, "BLOCK": 1024, "BLOCK_E": 128}, (), 4, 1),
        (triton_moe._permute_kernel, {"x_ptr": bf16, "sorted_slots_ptr": i32, "out_ptr": bf16}, {"BLOCK_D": 1024},
         ("D", "stride_x", "stride_o"), 4, 1),
        (triton_moe._combine_kernel, {"y_ptr": bf16, "slot_rows_ptr": i32, "w_ptr": f32, "out_ptr": bf16},
         {"TOP_K": 8, "BLOCK_D": 1024}, ("D", "stride_y", "stride_o"), 4, 1),
        (triton_moe._gate_up_kernel, {"x_ptr": bf16, "w1_ptr": bf16, "h_ptr": bf16} | moe_ptrs,
         gemm | {"stride_xd": 1, "stride_wd": 1},
         ("D", "F", "stride_xt", "stride_we", "stride_wn", "stride_hp"), 8, 3),
        (triton_moe._down_kernel, {"h_ptr": bf16, "w2_ptr": bf16, "y_ptr": bf16} | moe_ptrs,
         gemm | {"stride_wf": 1}, ("D", "F", "stride_hp", "stride_we", "stride_wd", "stride_yp"), 8, 3),
        (triton_norm._rms_norm_kernel, {"x_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16, "eps": "fp32"},
         {"BLOCK_D": 8192}, ("D", "stride_x", "stride_o"), 8, 1),
        (triton_norm._add_rms_norm_kernel, {"x_ptr": bf16, "r_ptr": bf16, "w_ptr": bf16, "out_ptr": bf16, "sum_ptr": bf16,
         "eps": "fp32"}, {"BLOCK_D": 8192}, ("D", "stride_x", "stride_r", "stride_o", "stride_s"), 8, 1),
        (triton_norm._silu_and_mul_kernel, {"gu_ptr": bf16, "out_ptr": bf16}, {"BLOCK_F": 1024},
         ("F", "stride_g", "stride_o"), 4, 1),
    ]  # fmt: skip
    records = []
    for fn, ptrs, constexprs, divisible, warps, stages in cases:
        src = _specialise(
            fn, {k: v for k, v in ptrs.items() if k not in constexprs}, constexprs, divisible
        )
        k = triton.compile(
            src,
            target=GPUTarget("cuda", 90, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        ptx = k.asm["ptx"]
        records.append({
            "kernel": fn.__name__, "cubin_bytes": len(k.asm["cubin"]), "shared": k.metadata.shared,
            "wgmma": "wgmma" in ptx, "async_copies": ptx.count("cp.async"),
        })  # fmt: skip
    return records


@pytest.mark.timeout(300)
def test_kernels_compile_for_h100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=280, env=env
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = {r["kernel"]: r for r in map(json.loads, proc.stdout.splitlines())}
    print(records)
    assert len(records) == 10
    for name, rec in records.items():
        assert rec["cubin_bytes"] > 0, name
        assert rec["shared"] <= H100_SHARED_BYTES, (
            f"{name} needs {rec['shared']} bytes of shared memory"
        )
    for gemm in ("_gate_up_kernel", "_down_kernel"):  # Hopper tensor cores, loads pipelined
        assert records[gemm]["wgmma"] and records[gemm]["async_copies"] > 0, records[gemm]


if __name__ == "__main__":
    for record in compile_all():
        print(json.dumps(record))
