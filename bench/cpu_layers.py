"""moeray's C++ CPU layer kernels against the paths they stand in for, on the bench model's shapes.

- MoE layer (E 8, D 512, F 1024, top-2): `kernels.fused_moe` in one call (moeray's extension),
  the same under MOERAY_KERNELS=onednn (a Python loop over experts around oneDNN's GEMMs), and
  the GEMMs alone (moeray's, the two per expert that got tokens), per token count. Three
  layers' weights are cycled, so every call reads its experts from memory as a decode step does.
- Decode attention (H 8, G 2, Dh 64, block size 16): `kernels.decode_attention` (K/V read in
  place through the block tables) against workers/attention.py's torch path (gather the
  context into a padded copy, one SDPA), per batch size, contexts of 130-190 tokens, eight
  layers' block tables over a 64 MB cache, each call timed alone after 64 MB of other data went
  through the caches (in a decode step the layer's expert weights do): K/V come from memory.

    python bench/cpu_layers.py [--dtypes float32 bfloat16] [--tokens 1 8 25 64] [--batches 1 8 25 64]

One JSON line per measurement. Measures, never asserts (STYLE rule 5). Without moeray's C++
kernels on this CPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from moeray import kernels
from moeray.kernels import cpu_gemm
from moeray.workers import attention

E, D, F_, K = 8, 512, 1024, 2
H, G, DH, S = 8, 2, 64, 16
#: Layers of the bench model: decode attention cycles through this many K/V sets per step.
LAYERS = 8


def per_call_us(fn: Callable[[int], object], copies: int, min_s: float) -> float:
    for i in range(copies):
        fn(i)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        for i in range(copies):
            fn(i)
        calls += copies
    return (time.perf_counter() - start) / calls * 1e6


#: Written over before each cold call: twice the L3 of the dev VM.
EVICT = torch.empty(16 * 2**20)


def cold_call_us(fn: Callable[[int], object], copies: int, min_s: float) -> float:
    """Median us of single calls, each after the caches were filled with other data (as a decode
    step's attention finds them after the layers' weights streamed through)."""
    times: list[float] = []
    spent = time.perf_counter()
    while time.perf_counter() - spent < min_s or len(times) < 5:
        for i in range(copies):
            EVICT.add_(1.0)
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def moe_row(
    T: int, layers: list[Any], onednn: list[Any], g: torch.Generator, min_s: float
) -> dict[str, Any]:
    """One token count: us per call of the three ways to run the layer."""
    dtype = layers[0][0].dtype
    x = torch.randn(T, D, generator=g).to(dtype)
    weights, ids = kernels.topk_gating(torch.randn(T, E, generator=g), K)
    n = {e: int((ids == e).sum()) for e in range(E) if bool((ids == e).any())}
    xs = {e: x[:c] for e, c in n.items()}
    hs = {e: torch.randn(c, F_, generator=g).to(dtype) for e, c in n.items()}

    def gemms(i: int) -> None:
        w1, w2 = layers[i]
        for e in n:
            kernels.packed_linear(xs[e], w1.experts[e])
            kernels.packed_linear(hs[e], w2.experts[e])

    def onednn_layer(i: int) -> None:
        with kernels.use_backend("onednn"):
            kernels.fused_moe(x, *onednn[i], weights, ids)

    us = {
        "one_call": per_call_us(lambda i: kernels.fused_moe(x, *layers[i], weights, ids), 3, min_s),
        "onednn_loop": per_call_us(onednn_layer, 3, min_s),
        "gemms_alone": per_call_us(gemms, 3, min_s),
    }
    return {"layer": "moe", "tokens": T, "experts_hit": len(n),
            **{f"{k}_us": round(v, 1) for k, v in us.items()}}  # fmt: skip


def moe_rows(dtype: torch.dtype, tokens: list[int], min_s: float) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    plain = [
        ((torch.randn(E, 2 * F_, D, generator=g) / 20).to(dtype),
         (torch.randn(E, D, F_, generator=g) / 20).to(dtype))
        for _ in range(3)
    ]  # fmt: skip
    layers = [kernels.prepare_expert_weights(w1, w2) for w1, w2 in plain]
    with kernels.use_backend("onednn"):
        onednn = [kernels.prepare_expert_weights(w1, w2) for w1, w2 in plain]
    return [moe_row(T, layers, onednn, g, min_s) for T in tokens]


def attention_row(B: int, caches: tuple[torch.Tensor, torch.Tensor], g: torch.Generator,
                  min_s: float) -> dict[str, Any]:  # fmt: skip
    """One batch size: us per call of the kernel and of the gather + SDPA path, cycling through
    LAYERS sets of block tables, caches cold (cold_call_us)."""
    k_cache, v_cache = caches
    calls = []
    for _ in range(LAYERS):
        lens = [int(t) for t in torch.randint(130, 191, (B,), generator=g)]
        tables = torch.stack([torch.randperm(k_cache.shape[0], generator=g)[:12] for _ in range(B)])
        q = torch.randn(B, H, DH, generator=g).to(k_cache.dtype)
        index, mask = attention._decode_meta(tables, lens, S)
        meta = attention._StepMeta(index, mask, None, None, None, [])
        calls.append((q, tables, torch.tensor(lens), meta))
    us = {
        "kernel": cold_call_us(
            lambda i: kernels.decode_attention(
                calls[i][0], k_cache, v_cache, calls[i][1], calls[i][2], DH**-0.5
            ),
            LAYERS,
            min_s,
        ),
        "gather_sdpa": cold_call_us(
            lambda i: attention._decode(calls[i][0], k_cache, v_cache, calls[i][3], DH**-0.5),
            LAYERS,
            min_s,
        ),
    }
    return {
        "layer": "decode_attention",
        "batch": B,
        **{f"{k}_us": round(v, 1) for k, v in us.items()},
    }


def attention_rows(dtype: torch.dtype, batches: list[int], min_s: float) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(1)
    N = 4096  # blocks: a 64 MB fp32 cache per tensor, the tables spread over it
    caches = (
        torch.randn(N, S, G, DH, generator=g).to(dtype),
        torch.randn(N, S, G, DH, generator=g).to(dtype),
    )
    return [attention_row(B, caches, g, min_s) for B in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])  # fmt: skip
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 25, 64])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 25, 64])
    ap.add_argument("--min-seconds", type=float, default=0.5, help="per measurement")
    args = ap.parse_args()
    if not cpu_gemm.available():
        print(
            json.dumps({"bench": "cpu_layers", "skipped": "moeray's C++ kernels do not run here"})
        )
        return
    about = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = getattr(torch, name)
            rows = moe_rows(dtype, args.tokens, args.min_seconds)
            rows += attention_rows(dtype, args.batches, args.min_seconds)
            for row in rows:
                print(
                    json.dumps({"bench": "cpu_layers", "dtype": name, **row, **about}), flush=True
                )


if __name__ == "__main__":
    main()
