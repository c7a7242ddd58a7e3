"""The served workload without the serving: moeray's engine in this process, fed on a clock.

bench/serving.py's "random" workload (prompts of random token ids, greedy, ignore_eos, Poisson
arrivals) handed straight to an `LLMEngine` as the arrival times come, stepped in this thread:
no Ray, no router, no HTTP, no client process. Output tok/s over the same span as vLLM's client
measures it (its start to the last finish) says how much of the served figure the engine alone
can give on this machine; the difference is what the front door and the client cost beside it.
Arrivals as vLLM's client makes them (numpy's gamma gaps after np.random.seed(seed), rescaled
so that the last request leaves at num_prompts / rate, the clock starting before the first
gap): with bench/serving.py's seed (0) the same arrival times as its runs.
One JSON line per rate.

    python bench/engine_arrivals.py --rates 8 16 [--dtype float32] [--num-prompts 64]

Measures, never asserts (STYLE rule 5).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
from moeray.cluster.config import EngineConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.workers.engine import LLMEngine
from moeray.workers.io_struct import SamplingParams

DEMO = Path(__file__).resolve().parent.parent / ".demo" / "bench"


def run(engine: LLMEngine, rate: float, args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    # vLLM's client: after np.random.seed(seed), one gamma(1, 1/rate) gap per request (the first
    # waits one too), summed and rescaled so that the last request leaves at num_prompts / rate:
    # the same arrival times as bench/serving.py's runs with that seed
    gaps = np.random.RandomState(args.seed).gamma(1.0, 1.0 / rate, args.num_prompts)
    arrivals = [float(a) for a in np.cumsum(gaps) * (args.num_prompts / rate) / gaps.sum()]
    prompts = [[rng.randrange(100, 30000) for _ in range(args.input_len)] for _ in arrivals]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    sent: dict[str, float] = {}
    ttft: list[float] = []
    done = steps = nxt = 0
    start = time.perf_counter()
    while done < len(prompts):
        now = time.perf_counter() - start
        while nxt < len(prompts) and arrivals[nxt] <= now:
            engine.add_request(f"r{nxt}", prompts[nxt], params)
            sent[f"r{nxt}"] = now
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, arrivals[nxt] - now))
            continue
        steps += 1
        for out in engine.step():
            if len(out.token_ids) == 1 and not out.finished:
                ttft.append(time.perf_counter() - start - sent[out.request_id])
            done += out.finished
    span = time.perf_counter() - start
    return {
        "bench": "engine_arrivals", "rate": rate, "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "dtype": args.dtype,
        "last_arrival_s": round(arrivals[-1], 2), "duration_s": round(span, 2),
        "output_throughput": round(args.num_prompts * args.output_len / span, 1),
        "steps": steps, "step_ms_mean": round(span / steps * 1e3, 1),
        "p50_ttft_ms": round(statistics.median(ttft) * 1e3, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[8.0, 16.0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="as bench/serving.py's servers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = DEMO if DEMO.exists() else build_demo_checkpoint(DEMO, preset="bench")
    engine = LLMEngine(model, EngineConfig(max_num_seqs=args.max_num_seqs), dtype=args.dtype)
    warm = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for i in range(4):
        engine.add_request(f"warm{i}", [100 + i] * args.input_len, warm)
    while engine.has_unfinished():
        engine.step()
    about = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for rate in args.rates:
        print(json.dumps({**run(engine, rate, args), **about}), flush=True)


if __name__ == "__main__":
    main()
