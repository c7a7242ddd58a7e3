"""CPU GEMMs of linear layers: moeray's (kernels/cpu_gemm.cpp) vs oneDNN's packed GEMM vs F.linear.

For each dtype, weight shape and row count: microseconds per call with the weights cycled
through a set larger than the last-level cache (as a decode step meets them: every weight comes
from memory), the weight bytes streamed per second, and the ratio oneDNN / moeray. Shapes: the
bench checkpoint's (an expert's w1 [2048, 512] and w2 [512, 1024], qkv [768, 512], the LM head
[32000, 512]) and a Mixtral-8x7B-sized expert w2 [4096, 14336]. One JSON line per measurement.

    python bench/cpu_gemm.py                       # fp32 and bf16, 1 .. 512 rows, torch's threads
    python bench/cpu_gemm.py --threads 1 --rows 1 8

Measures, never asserts (STYLE rule 5). Without moeray's GEMM on this CPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from moeray.kernels import cpu_gemm

SHAPES = {
    "expert_w1": (2048, 512),
    "expert_w2": (512, 1024),
    "qkv": (768, 512),
    "lm_head": (32000, 512),
    "mixtral_w2": (4096, 14336),
}
#: Bytes of weights cycled per measurement: past a 32 MB L3 several times over.
CYCLE_BYTES = 128 << 20


def per_call_us(fn: Callable[[int], object], copies: int, min_s: float) -> float:
    for i in range(copies):  # warm: first-touch and the packing are not measured
        fn(i)
    calls, start = 0, time.perf_counter()
    while True:
        for i in range(copies):
            fn(i)
        calls += copies
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / calls * 1e6


def implementations(
    x: torch.Tensor,
    n: int,
    ws: list[torch.Tensor],
    ours: list[torch.Tensor],
    onednn: list[torch.Tensor],
) -> dict[str, Callable[[int], object]]:
    """The three ways to compute x @ ws[i].T, by name: call with the weight's index."""
    return {
        "moeray": lambda i: cpu_gemm.linear(x, ours[i], n),
        "onednn": lambda i: torch.ops.mkldnn._linear_pointwise(x, onednn[i], None, "none", [], ""),
        "f_linear": lambda i: F.linear(x, ws[i]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])  # fmt: skip
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 8, 32, 128, 512])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-seconds", type=float, default=0.3, help="per (impl, shape, rows)")
    args = ap.parse_args()
    if not cpu_gemm.available():
        print(json.dumps({"bench": "cpu_gemm", "skipped": "moeray's CPU GEMM does not run here"}))
        return
    torch.set_num_threads(args.threads)
    about = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "threads": args.threads,
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with torch.inference_mode():
        for dtype_name in args.dtypes:
            dtype = getattr(torch, dtype_name)
            for shape_name in args.shapes:
                n, k = SHAPES[shape_name]
                nbytes = n * k * dtype.itemsize
                copies = max(2, CYCLE_BYTES // nbytes)
                ws = [torch.randn(n, k).to(dtype) for _ in range(copies)]
                ours = [cpu_gemm.pack(w) for w in ws]
                onednn = [torch.ops.mkldnn._reorder_linear_weight(w) for w in ws]
                for rows in args.rows:
                    x = torch.randn(rows, k).to(dtype)
                    impls = implementations(x, n, ws, ours, onednn)
                    us = {name: per_call_us(fn, copies, args.min_seconds) for name, fn in impls.items()}  # fmt: skip
                    print(json.dumps({
                        "bench": "cpu_gemm", "dtype": dtype_name, "shape": shape_name,
                        "n": n, "k": k, "rows": rows,
                        **{f"{name}_us": round(t, 1) for name, t in us.items()},
                        "moeray_weight_gb_s": round(nbytes / us["moeray"] / 1e3, 1),
                        "onednn_over_moeray": round(us["onednn"] / us["moeray"], 2),
                        **about,
                    }), flush=True)  # fmt: skip
                del ws, ours, onednn


if __name__ == "__main__":
    main()
