"""The expert autoscaler's effect on a skewed workload: decode before, during and after a
rebalance. Measures, never asserts; one JSON line per result, then a markdown table.

The checkpoint is a Mixtral (8 experts, top-2) whose gate sends most tokens to experts 0 and 3
(as in tests/cluster/test_autoscaler.py, at a size where the expert FFNs cost something:
D=256, F=1024). Its routed experts run on 3 shard actors, striped, so both hot experts start on
shard 0. One engine (this process) decodes --concurrency requests of --output-len tokens:

1. `before`: the initial placement: decode tok/s, and per step the time the engine waits for
   its experts (the sum over MoE layers of the dispatch round trip: the slowest shard's time,
   "max-shard step time");
2. the rebalance: the load the engine reported to Redis is planned exactly as the expert
   controller plans it (cluster/placement.py: positions, `plan_rebalance` within 3 shards,
   4 slots per shard, 3 replicas at most) and published as the next epoch while decoding goes
   on; the backend prepares the new shards in the background and swaps between steps.
   `during`: step-time p50/p99/max over the steps from the publication to the swap (+ a few);
3. `after`: the same as 1 on the new placement.

    python bench/autoscale.py [--concurrency 32] [--output-len 32] [--rounds 2]
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
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from moeray.cluster.config import EngineConfig, ExpertsConfig
from moeray.cluster.expert_load import balancedness
from moeray.cluster.expert_parallel import apply_expert_parallel
from moeray.cluster.placement import plan_rebalance, positional
from moeray.cluster.redis_server import RedisServer
from moeray.cluster.state import ClusterState
from moeray.workers.engine import LLMEngine
from moeray.workers.io_struct import SamplingParams

MODEL = "default"


def make_checkpoint(directory: Path) -> Path:
    """tests/cluster/test_autoscaler.py's skewed checkpoint (experts 0 and 3 hot), bigger."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.cluster.test_autoscaler import make_skewed_checkpoint

    return make_skewed_checkpoint(
        directory, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
        num_key_value_heads=4,
    )  # fmt: skip


class StepClock:
    """Wraps a backend's forward_layer to add up, per step, the time spent waiting for shards."""

    def __init__(self, backend: Any) -> None:
        self.backend, self.expert_s = backend, 0.0
        inner = backend.forward_layer

        def timed(*args: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(*args)
            finally:
                self.expert_s += time.perf_counter() - t

        backend.forward_layer = timed

    def take(self) -> float:
        out, self.expert_s = self.expert_s, 0.0
        return out


def decode(
    engine: LLMEngine, clock: StepClock, n: int, length: int, on_step: Any = None
) -> dict[str, Any]:
    """n requests of `length` greedy tokens; tok/s of the decode steps, per-step times."""
    params = SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True)
    for i in range(n):
        engine.add_request(
            f"b{time.time_ns()}-{i}", [(7 * i + j) % 300 + 1 for j in range(4)], params
        )
    steps, experts = [], []
    tokens = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        t = time.perf_counter()
        clock.take()
        outs = engine.step()
        steps.append(time.perf_counter() - t)
        experts.append(clock.take())
        tokens += len(outs)
        if on_step is not None:
            on_step(len(steps))
    wall = time.perf_counter() - start
    return {"tok_s": n * length / wall, "steps": steps, "expert_s": experts}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1e3, q)) if xs else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    meta = {
        "date": datetime.date.today().isoformat(), "host": platform.node(),
        "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0],
    }  # fmt: skip
    results: list[dict[str, Any]] = []
    redis_server = RedisServer().start()
    ray.init(
        address="local", num_cpus=8, resources={"moeray_expert_slot": 12},
        include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
    )  # fmt: skip
    state = ClusterState(redis_server.url, load_window_s=60.0)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_checkpoint(Path(tmp))
            engine = LLMEngine(
                path, EngineConfig(num_kv_blocks=512, block_size=16, max_num_seqs=64)
            )
            ep = apply_expert_parallel(
                engine.model, str(path), ExpertsConfig(shards=3, dispatch_deadline_s=5.0), state,
                load_push_every_steps=1,
            )  # fmt: skip
            clock = StepClock(ep.backend)
            a = engine.model.args
            decode(engine, clock, 4, 4)  # warm up
            before = [
                decode(engine, clock, args.concurrency, args.output_len) for _ in range(args.rounds)
            ]
            assert ep.reporter is not None
            ep.reporter.flush()
            loads = state.read_load_total(MODEL, len(a.moe_layers), a.num_experts)
            cur = state.read_placement(MODEL)
            assert cur is not None
            pos, _ = positional(cur)
            plan = plan_rebalance(loads, pos, 3, 4, 1, 3)
            b0, b1 = balancedness(loads, cur), balancedness(loads, plan)
            swaps = ep.backend.swaps
            marks: dict[str, int] = {}

            def publish(step: int) -> None:
                if step == 2:
                    marks["published"] = step
                    state.publish_placement(MODEL, plan)
                if "published" in marks and "swapped" not in marks and ep.backend.swaps > swaps:
                    marks["swapped"] = step

            t0 = time.perf_counter()
            during = decode(engine, clock, args.concurrency, args.output_len * 16, publish)
            end = marks.get("swapped", len(during["steps"])) + 3
            window = during["steps"][marks["published"] : end]
            swap_s = time.perf_counter() - t0
            after = [
                decode(engine, clock, args.concurrency, args.output_len) for _ in range(args.rounds)
            ]
            ep.close()
    finally:
        state.close()
        ray.shutdown()
        redis_server.stop()

    def summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
        steps = [s for r in runs for s in r["steps"][1:]]  # decode steps (the first is prefill)
        experts = [s for r in runs for s in r["expert_s"][1:]]
        return {
            "phase": name, "decode_tok_s": round(statistics.median(r["tok_s"] for r in runs), 1),
            "step_ms_p50": round(pct(steps, 50), 2),
            "max_shard_step_ms_p50": round(pct(experts, 50), 2),
            "max_shard_step_ms_p99": round(pct(experts, 99), 2),
        }  # fmt: skip

    results.append({**summary("before", before), "balancedness": round(b0, 3)})
    results.append({
        "phase": "during", "steps_in_window": len(window),
        "steps_until_swap": marks.get("swapped", -1) - marks["published"],
        "step_ms_p50": round(pct(window, 50), 2), "step_ms_p99": round(pct(window, 99), 2),
        "step_ms_max": round(pct(window, 100), 2), "run_s": round(swap_s, 2),
    })  # fmt: skip
    results.append({**summary("after", after), "balancedness": round(b1, 3)})
    for r in results:
        print(json.dumps({**meta, **r, "concurrency": args.concurrency}))
    print("\n| phase | decode tok/s | step p50 ms | max-shard step p50 / p99 ms | notes |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        if r["phase"] == "during":
            print(f"| during | | {r['step_ms_p50']} | | step p99 {r['step_ms_p99']} ms, max "
                  f"{r['step_ms_max']} ms over {r['steps_in_window']} steps; swap after "
                  f"{r['steps_until_swap']} steps |")  # fmt: skip
        else:
            print(f"| {r['phase']} | {r['decode_tok_s']} | {r['step_ms_p50']} | "
                  f"{r['max_shard_step_ms_p50']} / {r['max_shard_step_ms_p99']} | "
                  f"balancedness {r['balancedness']} |")  # fmt: skip


if __name__ == "__main__":
    main()
