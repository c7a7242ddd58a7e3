"""Expert parallelism over Ray actors: what one MoE-layer dispatch costs, on one node and across
raylets, and what shards do to decode and to a served tier. Measures, never asserts; one JSON line
per result.

The run starts a local multi-node Ray cluster (`ray.cluster_utils.Cluster`): the head (this
process's node) advertises `moeray_bench_here`, one worker raylet `moeray_bench_there`, so shard
actors land on the engine's node or on another raylet on demand.

1. `dispatch`: one MoE layer of the "bench" preset shape (D=512, F=1024, E=8, top-2) over 2 shard
   actors, per tokens-per-step T in 1, 8, 32, 128, for `same-node` (Unix sockets, payloads in shared memory),
   `across-raylets` (TCP) and `plain` (Ray actor calls, same node); `*_us` is the median,
   `*_min_us` the minimum:
   - dispatch_us: the round trip alone: pack one message per shard, send, receive, combine, with
     every expert id masked out (-1) so that the shards do no expert math;
   - layer_us: the whole `RayExperts.forward_layer` (dispatch + the shards' expert FFNs);
   - local_layer_us: the same layer in-process (`LocalExperts`), for scale.
2. `decode`: end-to-end decode tok/s of the engine benchmark's model (build_demo_checkpoint
   preset="bench") at --concurrency requests, in-process vs 2 expert shards on the engine's node,
   alternating for --rounds rounds on one engine; a `summary` line with the ratios.
3. `served`: the same checkpoint served twice by one moeray app (LocalStack on the cluster), an
   in-process tier and a 2-shard tier; --concurrency gRPC streams of --output-len tokens each,
   tiers alternating for --rounds rounds; output tok/s per tier and `served_ratio`.

    python bench/expert_dispatch.py [--dtype float32] [--concurrency 32] [--output-len 32]
                                    [--rounds 3] [--skip-decode] [--skip-served]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from moeray.cluster.config import EngineConfig, ExpertsConfig
from moeray.cluster.demo_model import PRESETS, build_demo_checkpoint
from moeray.cluster.expert_parallel import apply_expert_parallel
from moeray.cluster.placement import initial_placement
from moeray.workers.engine import LLMEngine
from moeray.workers.expert_routing import dispatch_plan
from moeray.workers.expert_shard import pack_batch, raw_rows
from moeray.workers.moe import LocalExperts
from moeray.workers.ray_experts import RayExperts, ShardResources, WeightSource

sys.path.insert(0, str(Path(__file__).parent))
from engine_throughput import make_prompts, run_moeray

TOKENS = [1, 8, 32, 128]
SHARDS = 2
HERE, THERE = "moeray_bench_here", "moeray_bench_there"
#: mode -> (transport, resource the shards ask for)
MODES = {
    "same-node": ("socket", HERE),
    "across-raylets": ("socket", THERE),
    "plain": ("plain", HERE),
}


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
    for mode, (transport, resource) in MODES.items():
        backend = RayExperts.start(
            WeightSource(weights_ref=ray.put(weights)), placement, [0], transport=transport,
            resources=ShardResources(resource=resource),
        )  # fmt: skip
        kinds = getattr(backend._active.transport, "kinds", [transport] * SHARDS)
        try:
            for T in TOKENS:
                h, w, ids = layer_inputs(T, D, E, K, dtype)
                plan = dispatch_plan(backend.routes[0], ids.numpy())

                masked = np.full(tuple(ids.shape), -1, dtype=np.int32)  # [T, K]

                def round_trip() -> Any:
                    # every shard gets the whole batch with no expert of its own: bytes only,
                    # packed per shard from numpy views as RayExperts.forward_layer packs them
                    raw, wts = raw_rows(h), w.float().numpy()  # noqa: B023
                    msgs = [pack_batch(0, raw, h.dtype, wts, masked) for _ in range(SHARDS)]  # noqa: B023
                    return backend._active.round_trip(msgs, 1.0)  # noqa: B023

                dispatch = timed_us(round_trip)
                layer = timed_us(lambda: backend.forward_layer(0, h, w, ids))  # noqa: B023
                emit({"bench": "dispatch", "mode": mode, "links": kinds, "shards": SHARDS,
                      "tokens": T, "D": D, "F": F, "E": E, "K": K,
                      "rows_per_shard": [0 if p.rows is None else len(p.rows) for p in plan],
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
            for transport in ("socket",):
                experts = ExpertsConfig(shards=SHARDS, shard_resource=HERE)
                eps[transport] = apply_expert_parallel(engine.model, str(path), experts)
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
    base, dist = best["in-process"], best[f"{SHARDS}-shards-socket"]
    pairs = [d["decode_tok_s"] / b["decode_tok_s"] for b, d in zip(
        runs["in-process"], runs[f"{SHARDS}-shards-socket"])]  # fmt: skip
    emit({"bench": "summary", "decode_ratio": round(dist["decode_tok_s"] / base["decode_tok_s"], 3),
          "total_ratio": round(dist["total_tok_s"] / base["total_tok_s"], 3),
          "decode_ratio_per_round": [round(x, 3) for x in pairs]})  # fmt: skip


def bench_served(args: argparse.Namespace, address: str) -> None:
    """One app, two tiers of the same checkpoint (in-process and 2 shards), streams over gRPC."""
    from moeray.cluster.app import LocalStack
    from moeray.cluster.config import MoerayConfig
    from moeray.cluster.redis_server import free_port
    from moeray.router.client import MoerayClient

    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_demo_checkpoint(Path(tmp) / "ckpt", preset="bench", dtype=args.dtype))
        engine = {"max_num_seqs": args.concurrency, "num_kv_blocks": 1024}
        experts = {"shards": SHARDS, "shard_resource": HERE}
        config = MoerayConfig(
            tiers=[{"name": "local", "model": path, "engine": engine},
                   {"name": "sharded", "model": path, "engine": engine, "experts": experts}],
            router={"fast_tier": "local", "reasoning_tier": "sharded"},
            serve={"grpc_port": free_port(), "http_port": free_port()},
        )  # fmt: skip
        vocab = PRESETS["bench"]["vocab"]
        prompts = make_prompts(args.concurrency, args.prompt_len, vocab)
        with LocalStack(config, ray_address=address).start(timeout_s=900) as stack:
            target = stack.endpoints()["grpc"]

            def stream(tier: str, prompt: list[int], n: int) -> int:
                with MoerayClient(target, timeout=600) as c:
                    return sum(
                        len(d.token_ids)
                        for d in c.generate(
                            prompt_token_ids=prompt,
                            tier=tier,
                            max_tokens=n,
                            temperature=0,
                            ignore_eos=True,
                        )
                    )

            def run(tier: str, n: int) -> float:
                start = time.perf_counter()
                with ThreadPoolExecutor(len(prompts)) as pool:
                    tokens = sum(pool.map(lambda p: stream(tier, p, n), prompts))
                return tokens / (time.perf_counter() - start)

            runs: dict[str, list[float]] = {"local": [], "sharded": []}
            for tier in runs:  # warm up
                run(tier, 4)
            for _ in range(args.rounds):
                for tier in runs:
                    runs[tier].append(run(tier, args.output_len))
    for tier, rs in runs.items():
        emit({"bench": "served", "tier": tier, "concurrency": args.concurrency,
              "output_len": args.output_len, "dtype": args.dtype,
              "output_tok_s_best": round(max(rs), 2),
              "output_tok_s_median": round(statistics.median(rs), 2),
              "load_avg_1m": round(os.getloadavg()[0], 2)})  # fmt: skip
    emit({"bench": "summary", "served_ratio": round(max(runs["sharded"]) / max(runs["local"]), 3),
          "served_ratio_per_round": [round(s / x, 3) for x, s in zip(runs["local"], runs["sharded"])]})  # fmt: skip


def main() -> None:
    from ray.cluster_utils import Cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode")
    ap.add_argument("--skip-dispatch", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--skip-served", action="store_true")
    args = ap.parse_args()
    emit({"bench": "machine", "cpu": platform.processor() or platform.machine(),
          "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "ray": ray.__version__, "date": datetime.date.today().isoformat(),
          "load_avg_1m": round(os.getloadavg()[0], 2)})  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 8, "resources": {HERE: 8}})
    try:
        cluster.add_node(num_cpus=4, resources={THERE: 8})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        if not args.skip_dispatch:
            bench_dispatch(getattr(torch, args.dtype))
        if not args.skip_decode:
            bench_decode(args)
        if not args.skip_served:
            bench_served(args, cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
