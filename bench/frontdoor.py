"""Front-door overhead: per request, end-to-end latency through the app minus the engine's time.

Runs the moeray app (LocalStack) on one tiny demo checkpoint and sends N sequential one-token
requests (max_tokens=1, greedy) over gRPC and over OpenAI HTTP (non-streamed). The engine
replica reports its own time for each request (receipt of the Generate call to the last delta,
workers/engine_service.py): gRPC in the trailing metadata `moeray-engine-time-ms`, HTTP in the
header `x-moeray-engine-time-ms`. overhead = e2e - engine time of the SAME request; its p50 / p99
are reported (not p50(e2e) - p50(engine), which mixes two distributions). Also times an
in-process AsyncLLMEngine (no Ray, no network) and the routing decision (QueryRouter.decide).
`--rounds N` repeats the served measurement on N fresh stacks. Prints one JSON object per line.

    python bench/frontdoor.py --requests 200 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from moeray.cluster.app import LocalStack
from moeray.cluster.config import MoerayConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.router.ingress import ENGINE_TIME_KEY
from moeray.router.messages import RouteInput
from moeray.router.openai_responses import ENGINE_TIME_HEADER
from moeray.router.policy import QueryRouter
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.io_struct import SamplingParams

PROMPT = "Summarize the plot of Hamlet in one sentence."
WARMUP = 10
#: (e2e ms, engine ms) of one request.
Sample = tuple[float, float]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(name: str, ms: list[float], **extra: object) -> dict[str, object]:
    return {"bench": name, "n": len(ms), "p50_ms": round(pct(ms, 0.5), 3),
            "p99_ms": round(pct(ms, 0.99), 3), "mean_ms": round(statistics.mean(ms), 3),
            **extra}  # fmt: skip


def grpc_samples(address: str, n: int) -> list[Sample]:
    req = pb.GenerateRequest(prompt=PROMPT, tier="fast",
                             sampling=pb.SamplingParams(max_tokens=1, temperature=0))  # fmt: skip
    out = []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(n + WARMUP):
            t = time.perf_counter()
            call = stub.Generate(req, timeout=60)
            for _ in call:
                pass
            e2e = (time.perf_counter() - t) * 1e3
            if i >= WARMUP:
                out.append((e2e, float(dict(call.trailing_metadata())[ENGINE_TIME_KEY])))
    return out


def http_samples(base: str, n: int) -> list[Sample]:
    import urllib.request

    body = json.dumps({"model": "fast", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    out = []
    for i in range(n + WARMUP):
        req = urllib.request.Request(base + "/completions", data=body.encode(),
                                     headers={"content-type": "application/json"})  # fmt: skip
        t = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            engine_ms = float(r.headers[ENGINE_TIME_HEADER])
        if i >= WARMUP:
            out.append(((time.perf_counter() - t) * 1e3, engine_ms))
    return out


async def engine_latencies(path: Path, n: int) -> list[float]:
    engine = AsyncLLMEngine.from_pretrained(path)
    params = SamplingParams(max_tokens=1, temperature=0)
    out = []
    try:
        for i in range(n + WARMUP):
            t = time.perf_counter()
            async for _ in engine.generate(f"r{i}", PROMPT, params):
                pass
            if i >= WARMUP:
                out.append((time.perf_counter() - t) * 1e3)
    finally:
        engine.shutdown()
    return out


def decision_latencies(config: MoerayConfig, n: int) -> list[float]:
    router = QueryRouter.from_config(config)
    inputs = [RouteInput(prompt=f"{PROMPT} ({i})") for i in range(n)]
    out = []
    for inp in inputs:
        t = time.perf_counter()
        router.decide(inp)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def transport_rows(name: str, samples: list[Sample], **extra: object) -> list[dict[str, object]]:
    """e2e, engine and per-request overhead (e2e - engine of the same request) summaries."""
    e2e = [s[0] for s in samples]
    engine = [s[1] for s in samples]
    overhead = [s[0] - s[1] for s in samples]
    return [summary(f"{name}_e2e_1_token", e2e, **extra),
            summary(f"{name}_engine_in_replica", engine, **extra),
            summary(f"{name}_overhead", overhead, **extra)]  # fmt: skip


def run_stack(config: MoerayConfig, n: int) -> dict[str, list[Sample]]:
    """Serves the app and samples both protocols."""
    ports = {"grpc_port": free_port(), "http_port": free_port()}  # fresh ones per stack
    config = config.model_copy(update={"serve": config.serve.model_copy(update=ports)})
    with LocalStack(config, num_cpus=2) as stack:
        ends = stack.endpoints()
        return {"grpc": grpc_samples(ends["grpc"], n), "http": http_samples(ends["http"], n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    machine: dict[str, Any] = {"machine": platform.processor() or platform.machine(),
                               "date": time.strftime("%F")}  # fmt: skip
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_checkpoint(Path(tmp) / "tiny", preset="tiny")
        config = MoerayConfig(
            tiers=[{"name": "fast", "model": str(path)}, {"name": "reasoning", "model": str(path)}],
            serve={"grpc_port": free_port(), "http_port": free_port()},
        )
        engine = asyncio.run(engine_latencies(path, args.requests))
        rows.append(summary("engine_only_in_process_1_token", engine, **machine))
        for rnd in range(args.rounds):
            load = round(os.getloadavg()[0], 1)
            got = run_stack(config, args.requests)
            extra = {"round": rnd, "load_avg_1m": load, **machine}
            for transport, samples in got.items():
                rows += transport_rows(transport, samples, **extra)
        rows.append(summary("route_decision", decision_latencies(config, 2000), **machine))
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
