"""Decode-step latency of moeray's model against transformers' forward, on the demo "bench" model.

Measures one decode step (forward + logits + argmax) at a given batch and context length through
moeray's paged KV cache, and the same step of transformers' model with its DynamicCache, runs
alternating in blocks so both see the same machine load. moeray's model gets the CPU transform
(workers/cpu_tuning.py) as the engine applies it, unless --no-cpu-tuning. Prints one JSON line
per (impl, batch).

    python bench/model_step.py --batch 1 32 --context 128 --threads 2 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.workers.cpu_tuning import apply_cpu_tuning
from moeray.workers.forward_context import ForwardContext
from moeray.workers.loader import load_model
from moeray.workers.model import CausalLM

BLOCK = 16


def moeray_step(model: CausalLM, batch: int, context: int) -> Callable[[], None]:
    per_seq = context // BLOCK + 2
    kv = model.make_kv_cache(batch * per_seq, BLOCK)
    tables = torch.arange(batch * per_seq).view(batch, per_seq)  # [B, M]
    pos = context - 1
    slots = tables[:, pos // BLOCK] * BLOCK + pos % BLOCK  # [B]
    ids = torch.randint(0, model.args.vocab_size, (batch,))
    positions = torch.full((batch,), pos)

    def step() -> None:
        ctx = ForwardContext(kv, slots, tables, list(range(batch + 1)), [context] * batch, True)
        model.compute_logits(model(ids, positions, ctx)).argmax(-1)

    return step


def hf_step(path: Path, batch: int, context: int, dtype: str) -> Callable[[], None]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (batch, context - 1))
    cache = transformers.DynamicCache(config=hf.config)
    hf(prompt, past_key_values=cache, use_cache=True)
    ids = torch.randint(0, hf.config.vocab_size, (batch, 1))

    def step() -> None:
        hf(ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        cache.crop(-1)  # drop the new token: keep the context length fixed across repetitions

    return step


#: Idle time before each block of steps: BLAS and OpenMP worker threads busy-wait for a while
#: after their last call, which must not overlap the other implementation's block.
SETTLE_S = 0.3
ROUNDS = 4


def measure(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Blocks of repeats/ROUNDS steps per implementation, alternating for ROUNDS rounds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        for _ in range(3):
            step()
    for _ in range(ROUNDS):
        for name, step in steps.items():
            time.sleep(SETTLE_S)
            for _ in range(max(1, repeats // ROUNDS)):
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-cpu-tuning", action="store_true", help="plain torch layers")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = build_demo_checkpoint(Path(tmp) / "bench", preset="bench", dtype=args.dtype)
        model = load_model(path, progress=False)
        if not args.no_cpu_tuning:
            apply_cpu_tuning(model)
        for batch in args.batch:
            steps = {"moeray": moeray_step(model, batch, args.context)}
            if not args.no_hf:
                steps["transformers"] = hf_step(path, batch, args.context, args.dtype)
            for name, ms in measure(steps, args.repeats).items():
                row = {"impl": name, "batch": batch, "context": args.context, "threads": args.threads,
                       "dtype": args.dtype, "cpu_tuning": not args.no_cpu_tuning,
                       "median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2),
                       "tok_per_s_median": round(batch / statistics.median(ms) * 1e3, 1)}  # fmt: skip
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
