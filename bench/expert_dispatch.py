"""Expert parallelism over Ray actors: what one MoE-layer dispatch costs, and what it does to decode.

Two measurements in one run, one JSON line each (measures, never asserts):

1. `dispatch`: one MoE layer of the "bench" preset shape (D=512, F=1024, E=8, top-2) over 2
   shard actors, per tokens-per-step T in 1, 8, 32, 128, for each transport (Unix sockets, a
   Ray Compiled Graph, plain actor calls); `*_us` is the median, `*_min_us` the minimum:
   - dispatch_us: the round trip alone: pack one message per shard, send, receive, combine, with
     every expert id masked out (-1) so that the shards do no expert math but move the same bytes;
   - layer_us: the whole `RayExperts.forward_layer` (dispatch + the shards' expert FFNs);
   - local_layer_us: the same layer in-process (`LocalExperts`), for scale.
2. `decode`: end-to-end decode tok/s of the engine benchmark's model (build_demo_checkpoint
   preset="bench", Mixtral-style) at 32 concurrent requests, in-process vs 2 expert shards
   (per --decode-transports; "auto" is what `expert_shards=2` uses: sockets on one node),
   alternating for --rounds rounds on one engine; the best round of each mode (and the median),
   then a `summary` line with the ratio of the bests and the ratio of each round's pair.

    python bench/expert_dispatch.py [--dtype float32] [--concurrency 32] [--output-len 32]
                                    [--decode-transports auto compiled] [--skip-decode]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
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
from moeray.workers.ray_experts import TRANSPORTS, RayExperts, WeightSource

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import make_prompts, run_moeray

TOKENS = [1, 8, 32, 128]
SHARDS = 2


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def timed_us(fn: Callable[[], object], min_s: float = 1.0, min_iters: int = 20) -> dict[str, float]:
    """Per-call time (us) over at least min_iters calls and min_s seconds: the median, and the
    minimum (the better estimate on a machine shared with other jobs)."""
    for _ in range(3):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50": round(times[len(times) // 2] * 1e6, 1), "min": round(times[0] * 1e6, 1)}


def layer_inputs(
    T: int, D: int, E: int, K: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(T)
    hidden = torch.randn(T, D, generator=gen).to(dtype)
    w, ids = torch.topk(torch.softmax(torch.randn(T, E, generator=gen), -1), K)  # [T, K]
    return hidden, w, ids.to(torch.int32)


def bench_dispatch(dtype: torch.dtype) -> None:
    """The table of the docstring. The in-process layer is timed first, with no shard actor
    alive, so that nothing else competes for the cores while it runs."""
    p = PRESETS["bench"]
    D, F, E, K = p["hidden"], p["ffn"], p["experts"], p["top_k"]
    gen = torch.Generator().manual_seed(0)
    weights = {0: ((torch.randn(E, 2 * F, D, generator=gen) * 0.02).to(dtype),
                   (torch.randn(E, D, F, generator=gen) * 0.02).to(dtype))}  # fmt: skip
    local = LocalExperts(weights)
    local_us = {}
    for T in TOKENS:
        h, w, ids = layer_inputs(T, D, E, K, dtype)
        local_us[T] = timed_us(lambda: local.forward_layer(0, h, w, ids))  # noqa: B023
    placement = initial_placement(1, E, SHARDS)
    for transport in ("socket", "compiled", "plain"):
        backend = RayExperts.start(
            WeightSource(weights_ref=ray.put(weights)), placement, [0], transport=transport
        )
        try:
            for T in TOKENS:
                h, w, ids = layer_inputs(T, D, E, K, dtype)
                none = torch.full_like(ids, -1)  # no expert on any shard: transport only

                def round_trip() -> torch.Tensor:
                    msgs = [ShardBatch(0, h, w, none).pack() for _ in range(SHARDS)]  # noqa: B023
                    return backend._combine(h, [None] * SHARDS, backend._round_trip(msgs))  # noqa: B023

                dispatch = timed_us(round_trip)
                layer = timed_us(lambda: backend.forward_layer(0, h, w, ids))  # noqa: B023
                emit({"bench": "dispatch", "transport": transport, "shards": SHARDS,
                      "tokens": T, "D": D, "F": F, "E": E, "K": K,
                      "dtype": str(dtype).removeprefix("torch."),
                      "dispatch_us": dispatch["p50"], "dispatch_min_us": dispatch["min"],
                      "layer_us": layer["p50"], "layer_min_us": layer["min"],
                      "local_layer_us": local_us[T]["p50"],
                      "local_layer_min_us": local_us[T]["min"],
                      "load_avg_1m": round(os.getloadavg()[0], 2)})  # fmt: skip
        finally:
            backend.close()


def bench_decode(args: argparse.Namespace) -> None:
    """In-process and sharded decode, alternating for --rounds rounds on the same engine (the
    shards stay up, idle in recv, while the in-process rounds run), so both see the same machine
    load; each mode's best round is reported, with the median beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_checkpoint(Path(tmp) / "ckpt", preset="bench", dtype=args.dtype)
        config = EngineConfig(max_num_seqs=args.concurrency, num_kv_blocks=1024)
        engine = LLMEngine(path, config, dtype=args.dtype)
        vocab = engine.model.args.vocab_size
        prompts = make_prompts(args.concurrency, args.prompt_len, vocab)
        local = engine.model.expert_backend
        assert local is not None
        runs: dict[str, list[dict[str, float]]] = {"in-process": []}
        eps = {}
        try:
            for transport in args.decode_transports:
                eps[transport] = apply_expert_parallel(
                    engine.model, str(path), ExpertsConfig(shards=SHARDS), transport=transport
                )
                runs[f"{SHARDS}-shards-{transport}"] = []
            backends = {"in-process": local} | {
                f"{SHARDS}-shards-{t}": ep.backend for t, ep in eps.items()
            }
            for backend in backends.values():  # warm up every path
                engine.model.set_expert_backend(backend)
                run_moeray(engine, prompts[:2], 4)
            for _ in range(args.rounds):
                for mode, backend in backends.items():
                    engine.model.set_expert_backend(backend)
                    runs[mode].append(run_moeray(engine, prompts, args.output_len))
        finally:
            engine.model.set_expert_backend(local)
            for ep in eps.values():
                ep.close()
    best = {mode: max(rs, key=lambda r: r["decode_tok_s"]) for mode, rs in runs.items()}
    for mode, r in best.items():
        median = statistics.median(x["decode_tok_s"] for x in runs[mode])
        emit({"bench": "decode", "mode": mode, "concurrency": args.concurrency,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "dtype": args.dtype,
              "rounds": args.rounds, **{k: round(v, 3) for k, v in r.items()},
              "decode_tok_s_median": round(median, 3)})  # fmt: skip
    base, dist = best["in-process"], best[f"{SHARDS}-shards-{args.decode_transports[0]}"]
    pairs = [d["decode_tok_s"] / b["decode_tok_s"] for b, d in zip(
        runs["in-process"], runs[f"{SHARDS}-shards-{args.decode_transports[0]}"])]  # fmt: skip
    emit({"bench": "summary", "decode_ratio": round(dist["decode_tok_s"] / base["decode_tok_s"], 3),
          "total_ratio": round(dist["total_tok_s"] / base["total_tok_s"], 3),
          "decode_ratio_per_round": [round(x, 3) for x in pairs]})  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating decode rounds per mode")
    ap.add_argument("--skip-decode", action="store_true", help="only the dispatch table")
    ap.add_argument("--decode-transports", nargs="+", default=["auto"], choices=TRANSPORTS)
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
