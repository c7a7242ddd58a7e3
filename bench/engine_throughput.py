"""Engine throughput: moeray vs transformers generate() on the same checkpoint, same run, same dtype.

Builds the "bench" preset demo checkpoint (a Mixtral-style MoE) in a temp dir, then for each
concurrency (default 1 and 32) generates `--output-len` tokens (ignore_eos) from prompts of
`--prompt-len` random tokens with greedy decoding, and prints one JSON line per (engine,
concurrency) and one with the ratios:

- ttft_s: time to the first generated token (moeray: per request, averaged; transformers: a
  max_new_tokens=1 run of the same batch);
- decode_tok_s: tokens generated after the first one, per second of decode time;
- total_tok_s: all generated tokens over the whole wall time.

transformers runs the prompts as one static batch (they have the same length, so no padding);
moeray gets them as concurrent requests. Measures, never asserts.

    python bench/engine_throughput.py [--dtype float32|bfloat16] [--concurrency 1 32]
        [--no-cpu-tuning]   (moeray's engine without workers/cpu_tuning.py)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from moeray.cluster.config import EngineConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.workers.engine import LLMEngine
from moeray.workers.io_struct import SamplingParams


def make_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=gen).tolist()


def run_moeray(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params, stream=True)
    first: dict[str, float] = {}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            first.setdefault(out.request_id, now)
    end = time.perf_counter()
    n = len(prompts)
    decode_start = max(first.values())
    return {
        "ttft_s": sum(t - start for t in first.values()) / n,
        "decode_tok_s": n * (output_len - 1) / (end - decode_start),
        "total_tok_s": n * output_len / (end - start),
        "wall_s": end - start,
    }


def run_transformers(model: Any, prompts: list[list[int]], output_len: int) -> dict[str, float]:
    ids = torch.tensor(prompts, device=model.device)
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kwargs)
        wall = time.perf_counter() - t0
    n = len(prompts)
    return {
        "ttft_s": ttft,
        "decode_tok_s": n * (output_len - 1) / max(wall - ttft, 1e-9),
        "total_tok_s": n * output_len / wall,
        "wall_s": wall,
    }


def best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The best of the repeats for each figure (the machine is shared: noise only slows)."""
    return {k: (min if k in ("ttft_s", "wall_s") else max)(r[k] for r in runs) for k in runs[0]}


#: Idle time before each measured run: OpenMP worker threads busy-wait for a while after their
#: last parallel region (unless OMP_WAIT_POLICY=passive), which must not overlap the other run.
SETTLE_S = 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs; the best is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--no-cpu-tuning", action="store_true", help="plain torch layers in moeray")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_checkpoint(Path(tmp) / "ckpt", preset=args.preset, dtype=args.dtype)
        config = EngineConfig(max_num_seqs=max(args.concurrency), cpu_tuning=not args.no_cpu_tuning)
        engine = LLMEngine(path, config, dtype=args.dtype, device=args.device)
        device = engine.runner.device
        hf = None
        if not args.skip_transformers:
            hf = (
                transformers.AutoModelForCausalLM.from_pretrained(
                    path, dtype=getattr(torch, args.dtype)
                )
                .to(device)
                .eval()
            )
        vocab = engine.vocab_size
        warm = make_prompts(2, 8, vocab, seed=1)
        run_moeray(engine, warm, 4)
        if hf is not None:
            run_transformers(hf, warm, 4)
        for c in args.concurrency:
            prompts = make_prompts(c, args.prompt_len, vocab)
            common = {
                "concurrency": c,
                "prompt_len": args.prompt_len,
                "output_len": args.output_len,
                "dtype": args.dtype,
                "preset": args.preset,
                "cpu_tuning": not args.no_cpu_tuning,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "machine": f"{platform.machine()} x{os.cpu_count()} cpu",
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "date": time.strftime("%Y-%m-%d"),
            }
            ours: list[dict[str, float]] = []
            theirs: list[dict[str, float]] = []
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                time.sleep(SETTLE_S)
                ours.append(run_moeray(engine, prompts, args.output_len))
                if hf is not None:
                    time.sleep(SETTLE_S)
                    theirs.append(run_transformers(hf, prompts, args.output_len))
            print(json.dumps({"engine": "moeray", **common, **best(ours)}), flush=True)
            if hf is None:
                continue
            print(json.dumps({"engine": "transformers", **common, **best(theirs)}), flush=True)
            b_ours, b_theirs = best(ours), best(theirs)
            ratio = {k: b_ours[k] / b_theirs[k] for k in ("decode_tok_s", "total_tok_s")}
            ratio["ttft_s"] = b_theirs["ttft_s"] / b_ours["ttft_s"]  # > 1: moeray is faster
            print(json.dumps({"engine": "ratio moeray/transformers", **common, **ratio}))


if __name__ == "__main__":
    main()
