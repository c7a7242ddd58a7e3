"""Expert parallelism over Ray actors: what one MoE-layer dispatch costs, and what it does to decode.

Two measurements in one run, one JSON line each (measures, never asserts):

1. `dispatch`: one MoE layer of the "bench" preset shape (D=512, F=1024, E=8, top-2) over 2
   shard actors, per tokens-per-step T in 1, 8, 32, 128, for the compiled graph and for plain
   actor calls:
   - dispatch_us: the round trip alone: pack one message per shard, send, receive, combine, with
     every expert id masked out (-1) so that the shards do no expert math but move the same bytes;
   - layer_us: the whole `RayExperts.forward_layer` (dispatch + the shards' expert FFNs);
   - local_layer_us: the same layer in-process (`LocalExperts`), for scale.
2. `decode`: end-to-end decode tok/s of the engine benchmark's model (build_demo_checkpoint
   preset="bench", Mixtral-style) at 32 concurrent requests, in-process vs 2 expert shards
   (compiled graph), then a `summary` line with the ratio.

    python bench/expert_dispatch.py [--dtype float32] [--concurrency 32] [--output-len 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from moeray.cluster.config import EngineConfig, ExpertsConfig
from moeray.cluster.demo_model import PRESETS, build_demo_checkpoint
from moeray.cluster.expert_parallel import apply_expert_parallel
from moeray.cluster.placement import initial_placement
from moeray.workers.engine import LLMEngine
from moeray.workers.expert_shard import ShardBatch
from moeray.workers.moe import LocalExperts
from moeray.workers.ray_experts import RayExperts, WeightSource

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import make_prompts, run_moeray

TOKENS = [1, 8, 32, 128]
SHARDS = 2


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def timed_us(fn: Callable[[], object], min_s: float = 1.0, min_iters: int = 20) -> float:
    """Median of per-call times (us) over at least min_iters calls and min_s seconds."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6


def measure_layer(
    backend: RayExperts, local: LocalExperts, T: int, gen: torch.Generator, dtype: torch.dtype
) -> dict[str, float]:
    """dispatch_us, layer_us and local_layer_us of one layer at T tokens (see the docstring)."""
    D, E = local.weights[0][1].shape[1], local.weights[0][0].shape[0]
    hidden = torch.randn(T, D, generator=gen).to(dtype)
    w, ids = torch.topk(
        torch.softmax(torch.randn(T, E, generator=gen), -1), PRESETS["bench"]["top_k"]
    )
    ids = ids.to(torch.int32)
    none = torch.full_like(ids, -1)  # no expert on any shard: transport only

    def round_trip() -> torch.Tensor:
        msgs = [ShardBatch(0, hidden, w, none).pack() for _ in range(SHARDS)]
        return backend._combine(hidden, [None] * SHARDS, backend._round_trip(msgs))

    return {
        "dispatch_us": round(timed_us(round_trip), 1),
        "layer_us": round(timed_us(lambda: backend.forward_layer(0, hidden, w, ids)), 1),
        "local_layer_us": round(timed_us(lambda: local.forward_layer(0, hidden, w, ids)), 1),
    }


def bench_dispatch(dtype: torch.dtype) -> None:
    p = PRESETS["bench"]
    D, F, E, K = p["hidden"], p["ffn"], p["experts"], p["top_k"]
    gen = torch.Generator().manual_seed(0)
    weights = {0: ((torch.randn(E, 2 * F, D, generator=gen) * 0.02).to(dtype),
                   (torch.randn(E, D, F, generator=gen) * 0.02).to(dtype))}  # fmt: skip
    local = LocalExperts(weights)
    placement = initial_placement(1, E, SHARDS)
    for compiled in (True, False):
        backend = RayExperts.start(
            WeightSource(weights_ref=ray.put(weights)), placement, [0], compiled_graph=compiled
        )
        try:
            for T in TOKENS:
                emit({"bench": "dispatch", "transport": "compiled" if compiled else "plain",
                      "shards": SHARDS, "tokens": T, "D": D, "F": F, "E": E, "K": K,
                      "dtype": str(dtype).removeprefix("torch."),
                      **measure_layer(backend, local, T, gen, dtype)})  # fmt: skip
        finally:
            backend.close()


def bench_decode(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_checkpoint(Path(tmp) / "ckpt", preset="bench", dtype=args.dtype)
        config = EngineConfig(max_num_seqs=args.concurrency, num_kv_blocks=1024)
        engine = LLMEngine(path, config, dtype=args.dtype)
        vocab = engine.model.args.vocab_size
        prompts = make_prompts(args.concurrency, args.prompt_len, vocab)
        run_moeray(engine, prompts[:2], 4)  # warm up
        results = {"in-process": run_moeray(engine, prompts, args.output_len)}
        ep = apply_expert_parallel(engine.model, str(path), ExpertsConfig(shards=SHARDS))
        try:
            run_moeray(engine, prompts[:2], 4)
            results[f"{SHARDS}-shards"] = run_moeray(engine, prompts, args.output_len)
        finally:
            ep.close()
    for mode, r in results.items():
        emit({"bench": "decode", "mode": mode, "concurrency": args.concurrency,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "dtype": args.dtype,
              **{k: round(v, 3) for k, v in r.items()}})  # fmt: skip
    base, dist = results["in-process"], results[f"{SHARDS}-shards"]
    emit({"bench": "summary", "decode_ratio": round(dist["decode_tok_s"] / base["decode_tok_s"], 3),
          "total_ratio": round(dist["total_tok_s"] / base["total_tok_s"], 3)})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--skip-decode", action="store_true", help="only the dispatch table")
    args = ap.parse_args()
    emit({"bench": "machine", "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "ray": ray.__version__, "date": datetime.date.today().isoformat(),
          "load_avg_1m": round(os.getloadavg()[0], 2)})  # fmt: skip
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        bench_dispatch(getattr(torch, args.dtype))
        if not args.skip_decode:
            bench_decode(args)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
