"""Benchmark of the MoE kernels: Triton vs the torch reference, against the GPU's roofline
(H100 or H200, by device name).

    python bench/kernels.py              GPU: Mixtral-8x7B and Qwen3-30B-A3B expert shapes, bf16,
                                         T = 1 .. 4096; one JSON line per (model, T, kernel)
    python bench/kernels.py --cpu-smoke  CPU: tiny shapes, torch reference vs the Triton
                                         interpreter (exercises the code path; timings say little)
    python bench/kernels.py --tune       GPU: tries block sizes per (shape, T) and writes the best
                                         to kernels/configs/fused_moe.json

Measures, never asserts (STYLE rule 5). Without CUDA, the GPU modes print why and exit 0.
fused_moe's bytes count the weights of the experts actually hit plus the activations it reads
and writes; FLOPs are 2 * T*K * 3*D*F (gate, up and down projections). Roofline fraction =
max(bytes / HBM bandwidth, FLOPs / tensor-core peak) / measured time.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOP_PER_S = 989e12
#: (HBM bytes/s, dense bf16 FLOP/s) by GPU name; anything else is judged against the H100's.
ROOFLINES = {"H200": (4.8e12, 989e12), "H100": (H100_HBM_BYTES_PER_S, H100_BF16_FLOP_PER_S)}


def roofline_of(device_name: str) -> tuple[str, float, float]:
    """(which roofline, HBM bytes/s, bf16 FLOP/s) for a torch.cuda device name."""
    for name, (hbm, flops) in ROOFLINES.items():
        if name in device_name:
            return name, hbm, flops
    return "H100", H100_HBM_BYTES_PER_S, H100_BF16_FLOP_PER_S


TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@dataclass(frozen=True)
class MoeShape:
    """One model's routed-expert layer: D hidden, F expert width, E experts, K top-k."""

    name: str
    D: int
    F: int
    E: int
    K: int


MODELS = [
    MoeShape("mixtral-8x7b", D=4096, F=14336, E=8, K=2),
    MoeShape("qwen3-30b-a3b", D=2048, F=768, E=128, K=8),
]
SMOKE = MoeShape("smoke", D=32, F=48, E=8, K=2)


def make_inputs(
    shape: MoeShape, T: int, dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """Random activations, weights and a softmax top-k routing of T tokens."""
    from moeray.kernels import reference

    gen = torch.Generator(device=device).manual_seed(T)
    D, F, E = shape.D, shape.F, shape.E
    hidden = torch.randn(T, D, device=device, generator=gen).to(dtype)
    w1 = (torch.randn(E, 2 * F, D, device=device, generator=gen) / D**0.5).to(dtype)
    w2 = (torch.randn(E, D, F, device=device, generator=gen) / F**0.5).to(dtype)
    logits = torch.randn(T, E, device=device, generator=gen)
    weights, ids = reference.topk_gating(logits, shape.K, renormalize=True)
    return {"hidden": hidden, "w1": w1, "w2": w2, "weights": weights, "ids": ids, "logits": logits}


def moe_traffic(shape: MoeShape, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(bytes, FLOPs) of one fused_moe call: weights of the experts hit + activations."""
    T, K, D, F = inputs["hidden"].shape[0], shape.K, shape.D, shape.F
    elt = inputs["hidden"].element_size()
    hit = int(torch.unique(inputs["ids"]).numel())
    weight_bytes = hit * 3 * D * F * elt
    # hidden read per slot, h written and read, y written and read, output written.
    act_bytes = (T * K * D + 2 * T * K * F + 2 * T * K * D + T * D) * elt
    return weight_bytes + act_bytes, 2.0 * T * K * 3 * D * F


def time_cuda(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on the GPU (triton.testing.do_bench: CUDA events, L2 flushed)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def time_cpu(fn: Callable[[], object], reps: int = 3) -> float:
    """Best-of-reps milliseconds of fn on the CPU (after one warm-up call: torch's first call of
    an op loads its kernels and can take hundreds of ms)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def bench_gpu() -> None:
    from moeray import kernels
    from moeray.kernels import reference

    device = torch.cuda.get_device_name()
    roof, hbm, peak = roofline_of(device)
    for shape in MODELS:
        for T in TOKENS:
            x = make_inputs(shape, T, torch.bfloat16, "cuda")
            args = (x["hidden"], x["w1"], x["w2"], x["weights"], x["ids"])
            with kernels.use_backend("triton"):
                ms = time_cuda(functools.partial(kernels.fused_moe, *args))
                gate_ms = time_cuda(
                    functools.partial(kernels.topk_gating, x["logits"], shape.K, renormalize=True)
                )
            ref_ms = time_cuda(functools.partial(reference.fused_moe, *args))
            nbytes, flops = moe_traffic(shape, x)
            roofline_ms = max(nbytes / hbm, flops / peak) * 1e3
            emit({
                "kernel": "fused_moe", "model": shape.name, "T": T, "dtype": "bfloat16", "device": device,
                "ms": round(ms, 4), "GB_per_s": round(nbytes / ms / 1e6, 1),
                "TFLOP_per_s": round(flops / ms / 1e9, 2), "roofline_fraction": round(roofline_ms / ms, 3), "roofline_of": roof,
                "hbm_fraction": round(nbytes / hbm / (ms / 1e3), 3),
                "peak_fraction": round(flops / peak / (ms / 1e3), 3),
                "torch_ms": round(ref_ms, 4), "speedup_vs_torch": round(ref_ms / ms, 2),
                "topk_gating_ms": round(gate_ms, 4),
            })  # fmt: skip
            del x
            torch.cuda.empty_cache()


def tune() -> None:
    """Grid-searches fused_moe block sizes per (model, T) and writes the best to the JSON config."""
    import itertools

    from moeray.kernels import block_config, triton_moe

    device = torch.cuda.get_device_name()
    # 64 candidates; compiled once each (the Triton cache keeps them across T).
    grid = itertools.product([16, 32, 64, 128], [64, 128], [64, 128], [4, 8], [3, 4])
    candidates = [
        dict(zip(["BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"], c)) for c in grid
    ]
    for shape in MODELS:
        best: dict[str, dict[str, int]] = {}
        for T in TOKENS:
            x = make_inputs(shape, T, torch.bfloat16, "cuda")
            timings = []
            for cfg in candidates:
                if cfg["BLOCK_M"] > max(16, 4 * T * shape.K // shape.E):
                    continue  # rows per expert are few: bigger row tiles are all padding
                args = (x["hidden"], x["w1"], x["w2"], x["weights"], x["ids"])
                run = functools.partial(triton_moe._launch_fused_moe, *args, config=cfg)
                try:
                    timings.append((time_cuda(run), cfg))
                except Exception as err:  # out of shared memory and the like: skip the candidate
                    print(f"skip {cfg}: {type(err).__name__}", file=sys.stderr)
            ms, cfg = min(timings, key=lambda mc: mc[0])
            best[str(T)] = cfg
            emit({"tune": shape.name, "T": T, "ms": round(ms, 4), "config": cfg, "device": device})
        key = block_config.tuned_key(
            device, triton_moe.shape_key(shape.E, shape.F, shape.D), torch.bfloat16
        )
        print(f"wrote {block_config.write_tuned('fused_moe', key, best)} [{key}]", file=sys.stderr)


def bench_cpu_smoke() -> None:
    """Torch reference vs the Triton interpreter on tiny shapes (TRITON_INTERPRET=1 set in main)."""
    from moeray import kernels
    from moeray.kernels import reference

    machine = f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
    date = datetime.date.today().isoformat()
    for T in (1, 7, 33):
        x = make_inputs(SMOKE, T, torch.float32, "cpu")
        args = (x["hidden"], x["w1"], x["w2"], x["weights"], x["ids"])
        ref_ms = time_cpu(functools.partial(reference.fused_moe, *args), reps=20)
        with kernels.use_backend("triton"):
            out = kernels.fused_moe(*args)
            interp_ms = time_cpu(functools.partial(kernels.fused_moe, *args), reps=1)
        err = (out - reference.fused_moe(*args)).abs().max().item()
        emit({
            "kernel": "fused_moe", "mode": "cpu-smoke", "model": SMOKE.name, "T": T, "D": SMOKE.D,
            "F": SMOKE.F, "E": SMOKE.E, "K": SMOKE.K, "dtype": "float32", "torch_ms": round(ref_ms, 3),
            "interpreter_ms": round(interp_ms, 1), "max_abs_err": err, "machine": machine, "date": date,
        })  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on CPU: torch vs interpreter"
    )
    mode.add_argument(
        "--tune", action="store_true", help="search block sizes, write kernels/configs"
    )
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        # Must precede the first import of moeray's triton_* modules (they decorate at import).
        os.environ["TRITON_INTERPRET"] = "1"
        bench_cpu_smoke()
        return 0
    if not torch.cuda.is_available():
        print(
            "bench/kernels.py: no CUDA device here, so no GPU figures; run with --cpu-smoke for the CPU check."
        )
        return 0
    tune() if args.tune else bench_gpu()
    return 0


if __name__ == "__main__":
    sys.exit(main())
