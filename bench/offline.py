"""Offline generation: moeray's `LLM` beside vLLM's offline `LLM` (CPU build) and transformers.

Same checkpoint (default: the demo preset "bench", a Mixtral-style MoE with D 512, 8 layers, E 8,
K 2, built into ./.demo/bench on first use; or `--model PATH`), same prompts, same dtype. For each
dtype (default fp32 and bf16) and request count (default 1 and 32): prompts of 64 random token
ids, 64 new tokens each, greedy, ignore_eos, all prompts handed to the engine at once
(`LLM.generate`; transformers: one static batch of equal-length prompts). Figure: output tok/s =
generated tokens / wall time of the call.

Each engine runs in a process of its own (bench/_offline_worker.py; vLLM's in its venv,
.bench/vllm-venv, installed on first use by bench/_vllm_env.py), loads the model once and waits
for commands, so the engines take turns on the same machine: per repeat and request count every
engine runs once, in an order that rotates with the repeat, after `--settle` seconds of idle time
(BLAS and OpenMP workers spin after their last call and must not overlap the next engine's run).
Each repeat uses new prompts (the same for every engine), so no engine's prefix cache holds them.
The best and the median of `--repeats` are reported.

Output: one JSON object per line (`"bench": "offline"` per engine, dtype and request count, with
best and median tok/s; `"offline-ratio"` for moeray / vLLM, moeray / transformers and vLLM /
transformers), then a markdown table. `--json-out FILE` also writes the JSON lines to FILE;
worker logs go to .bench/logs/offline-<time>/.

    .venv/bin/python bench/offline.py                       # fp32 and bf16, 1 and 32 requests
    .venv/bin/python bench/offline.py --dtypes float32 --requests 32 --repeats 2
    .venv/bin/python bench/offline.py --engines moeray vllm --output-len 16 --repeats 1

vLLM's CPU settings come from the environment (VLLM_CPU_OMP_THREADS_BIND,
VLLM_CPU_NUM_OF_RESERVED_CPU, VLLM_CPU_KVCACHE_SPACE: 2 GiB when unset); on 2 cores its default
binds the model to one core. moeray and transformers use torch's default thread count (all
cores) unless `--threads N`. FOOTGUN: on a machine that other jobs keep busy, two OpenMP threads
on two cores collapse (every parallel region waits for a descheduled thread: moeray's bf16 decode
was 5x slower with 2 threads than with 1 at load average 19), while vLLM's one bound thread does
not; compare on a quiet machine, or with `--threads 1`. Measures, never asserts (STYLE rule 5).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _vllm_env import (
    DEFAULT_VLLM_VERSION,
    REPO,
    SETTLE_S,
    Child,
    emit,
    machine,
    markdown_table,
    outside_cwd,
    ratio,
    vllm_env,
    vllm_python,
)

DEMO_PATH = REPO / ".demo" / "bench"
WORKER = Path(__file__).resolve().parent / "_offline_worker.py"
ENGINES = ("moeray", "vllm", "transformers")
RATIOS = (("moeray", "vllm"), ("moeray", "transformers"), ("vllm", "transformers"))


class Worker:
    """One engine's worker process and its line protocol (bench/_offline_worker.py)."""

    def __init__(self, engine: str, python: Path, model: Path, dtype: str, max_batch: int,
                 log: Path, threads: int | None) -> None:  # fmt: skip
        self.engine = engine
        self.about: dict[str, Any] = {}
        argv = [str(python), "-P", str(WORKER), engine, str(model), dtype, str(max_batch)]
        if engine == "vllm":
            env = vllm_env()  # vLLM binds its own threads (VLLM_CPU_OMP_THREADS_BIND)
        else:
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
        self.child = Child(f"{engine}-{dtype}", argv, log, cwd=outside_cwd(), env=env, pipe=True)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.child.proc.stdout is not None
        for line in self.child.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # end of stream: the worker exited

    def reply(self, timeout_s: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"{self.child.name}: no answer in {timeout_s:.0f} s; "
                               f"log {self.child.log_path}:\n{self.child.tail()}") from None  # fmt: skip
        if line is None:
            raise RuntimeError(f"{self.child.name} exited ({self.child.proc.poll()}):\n"
                               f"{self.child.tail()}")  # fmt: skip
        return dict(json.loads(line))

    def run(self, prompts: list[list[int]], output_len: int, timeout_s: float) -> dict[str, Any]:
        assert self.child.proc.stdin is not None
        self.child.proc.stdin.write(json.dumps({"prompts": prompts, "output_len": output_len}))
        self.child.proc.stdin.write("\n")
        self.child.proc.stdin.flush()
        return self.reply(timeout_s)

    def stop(self) -> None:
        """End of stdin first (the worker exits and its engine shuts down), then the session."""
        with contextlib.suppress(OSError):
            assert self.child.proc.stdin is not None
            self.child.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.child.proc.wait(timeout=20.0)
        self.child.stop(grace_s=30.0)


def prompt_vocab(model: Path) -> int:
    """Prompt token ids are drawn from [3, V): V = the smaller of the tokenizer's and the model's
    vocabulary (vLLM rejects ids its tokenizer does not know)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    cfg = json.loads((model / "config.json").read_text())
    return min(tok, int(cfg.get("vocab_size", tok)))


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def start_workers(args: argparse.Namespace, model: Path, dtype: str, logs: Path,
                  vllm_py: Path | None) -> dict[str, Worker]:  # fmt: skip
    """Starts the engines one after another (a load never overlaps another's), each warmed up
    with a short run at every request count."""
    workers: dict[str, Worker] = {}
    try:
        for engine in args.engines:
            py = vllm_py if engine == "vllm" else Path(sys.executable)
            assert py is not None
            log = logs / f"{engine}-{dtype}.log"
            w = Worker(engine, py, model, dtype, max(args.requests), log, args.threads)
            workers[engine] = w
            ready = w.reply(args.load_timeout)
            w.about = {k: v for k, v in ready.items() if k not in ("ready", "load_s")}
            emit({"bench": "offline-worker", "engine": engine, "dtype": dtype, **ready})
            for n in args.requests:
                w.run(
                    make_prompts(n, args.prompt_len, args.vocab, seed=-1 - n), 8, args.run_timeout
                )
    except BaseException:
        for w in workers.values():
            w.stop()
        raise
    return workers


def measure(args: argparse.Namespace, workers: dict[str, Worker], dtype: str,
            common: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """Every engine once per repeat and request count, in rotating order; one record each."""
    runs: dict[tuple[int, str], list[float]] = {}
    for rep in range(args.repeats):
        for n in args.requests:
            prompts = make_prompts(n, args.prompt_len, args.vocab, seed=1000 * rep + n)
            order = list(workers)[rep % len(workers) :] + list(workers)[: rep % len(workers)]
            for engine in order:
                time.sleep(args.settle)
                res = workers[engine].run(prompts, args.output_len, args.run_timeout)
                expected = n * args.output_len
                if res["output_tokens"] != expected:
                    print(f"[offline] {engine} generated {res['output_tokens']} tokens, expected "
                          f"{expected}", file=sys.stderr)  # fmt: skip
                runs.setdefault((n, engine), []).append(res["output_tokens"] / res["wall_s"])
    records = []
    for (n, engine), tok_s in runs.items():
        records.append({"bench": "offline", "engine": engine, "dtype": dtype, "requests": n,
                        "prompt_len": args.prompt_len, "output_len": args.output_len,
                        "repeats": len(tok_s), "output_tok_s_best": max(tok_s),
                        "output_tok_s_median": statistics.median(tok_s),
                        "output_tok_s_runs": tok_s, **workers[engine].about, **common})  # fmt: skip
    return records


def ratio_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["dtype"], r["requests"], r["engine"]): r for r in records}
    out = []
    for (dtype, n, engine), r in by.items():
        for a, b in RATIOS:
            if engine == a and (dtype, n, b) in by:
                ref = by[(dtype, n, b)]
                out.append({"bench": "offline-ratio", "compare": f"{a} / {b}", "dtype": dtype,
                            "requests": n,
                            "best": ratio(r["output_tok_s_best"], ref["output_tok_s_best"]),
                            "median": ratio(r["output_tok_s_median"],
                                            ref["output_tok_s_median"])})  # fmt: skip
    return out


def table(records: list[dict[str, Any]], engines: list[str]) -> str:
    by = {(r["dtype"], r["requests"], r["engine"]): r for r in records}
    pairs = [(a, b) for a, b in RATIOS if a in engines and b in engines]
    header = ["dtype", "requests"] + [f"{e} tok/s" for e in engines]
    header += [f"{a} / {b}" for a, b in pairs]
    rows = []
    for dtype, n in dict.fromkeys((r["dtype"], r["requests"]) for r in records):  # run order
        best = {e: by[(dtype, n, e)]["output_tok_s_best"] for e in engines if (dtype, n, e) in by}
        rows.append([dtype, n, *(best.get(e) for e in engines),
                     *(ratio(best.get(a), best.get(b)) for a, b in pairs)])  # fmt: skip
    return markdown_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"local HF checkpoint (default: the 'bench' demo preset in {DEMO_PATH})",
    )
    ap.add_argument(
        "--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"]
    )
    ap.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="OMP_NUM_THREADS of moeray and transformers (default: torch's, all cores)",
    )
    ap.add_argument("--settle", type=float, default=SETTLE_S, help="idle seconds before each run")
    ap.add_argument("--load-timeout", type=float, default=900.0)
    ap.add_argument("--run-timeout", type=float, default=900.0)
    ap.add_argument("--vllm-version", default=DEFAULT_VLLM_VERSION)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    if min(args.requests) < 1 or args.prompt_len < 1 or args.output_len < 1 or args.repeats < 1:
        ap.error("--requests, --prompt-len, --output-len and --repeats must be at least 1")
    return args  # fmt: skip


def main() -> None:
    args = parse_args()
    t_start = time.monotonic()
    model = args.model.resolve() if args.model else DEMO_PATH
    if args.model is None and not (model / "config.json").is_file():
        from moeray.cluster.demo_model import build_demo_checkpoint

        print(f"[offline] building the 'bench' demo checkpoint in {model}", file=sys.stderr)
        build_demo_checkpoint(model, preset="bench", dtype="float32")
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model: no config.json in {model}")
    args.vocab = prompt_vocab(model)
    vllm_py = vllm_python(args.vllm_version) if "vllm" in args.engines else None
    logs = REPO / ".bench" / "logs" / time.strftime("offline-%Y%m%d-%H%M%S")
    logs.mkdir(parents=True)
    out_file = args.json_out.open("w") if args.json_out else None
    records: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        workers = start_workers(args, model, dtype, logs, vllm_py)
        try:
            common = {"model": str(model), "settle_s": args.settle, **machine()}
            for rec in measure(args, workers, dtype, common):
                records.append(rec)
                emit(rec)
                if out_file:
                    emit(rec, out_file)
        finally:
            for w in workers.values():
                w.stop()
    for rec in ratio_records(records):
        emit(rec)
        if out_file:
            emit(rec, out_file)
    info = machine()
    print(f"\n{info['machine']}, {info['date']}, output tok/s (best of {args.repeats}), "
          f"{args.prompt_len}-token prompts, {args.output_len} new tokens; logs: {logs}\n")  # fmt: skip
    print(table(records, [e for e in ENGINES if e in args.engines]))
    print(f"\n[offline] total {time.monotonic() - t_start:.0f} s", file=sys.stderr)
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
