"""Front-door overhead: end-to-end latency through Serve minus the engine's own time.

Runs the moeray app (LocalStack) on one tiny demo checkpoint and sends N sequential one-token
requests (max_tokens=1, greedy) over gRPC and over OpenAI HTTP; then runs the same requests on an
in-process AsyncLLMEngine (no Ray, no network). overhead = e2e - engine at p50 and p99. Also
times the routing decision (QueryRouter.decide) alone. Prints one JSON object per line.

    python bench/frontdoor.py --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from moeray.cluster.app import LocalStack
from moeray.cluster.config import MoerayConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.router.messages import RouteInput
from moeray.router.policy import QueryRouter
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers.async_engine import AsyncLLMEngine
from moeray.workers.io_struct import SamplingParams

PROMPT = "Summarize the plot of Hamlet in one sentence."


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(name: str, ms: list[float], **extra: object) -> dict[str, object]:
    return {"bench": name, "n": len(ms), "p50_ms": round(pct(ms, 0.5), 3),
            "p99_ms": round(pct(ms, 0.99), 3), "mean_ms": round(statistics.mean(ms), 3),
            **extra}  # fmt: skip


def grpc_latencies(address: str, n: int) -> list[float]:
    req = pb.GenerateRequest(prompt=PROMPT, tier="fast",
                             sampling=pb.SamplingParams(max_tokens=1, temperature=0))  # fmt: skip
    out = []
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        for i in range(n + 10):
            t = time.perf_counter()
            list(stub.Generate(req, timeout=60))
            if i >= 10:  # warm-up
                out.append((time.perf_counter() - t) * 1e3)
    return out


def http_latencies(base: str, n: int) -> list[float]:
    import urllib.request

    body = json.dumps({"model": "fast", "prompt": PROMPT, "max_tokens": 1, "temperature": 0})
    out = []
    for i in range(n + 10):
        req = urllib.request.Request(base + "/completions", data=body.encode(),
                                     headers={"content-type": "application/json"})  # fmt: skip
        t = time.perf_counter()
        urllib.request.urlopen(req, timeout=60).read()
        if i >= 10:
            out.append((time.perf_counter() - t) * 1e3)
    return out


async def engine_latencies(path: Path, n: int) -> list[float]:
    engine = AsyncLLMEngine.from_pretrained(path)
    params = SamplingParams(max_tokens=1, temperature=0)
    out = []
    try:
        for i in range(n + 10):
            t = time.perf_counter()
            async for _ in engine.generate(f"r{i}", PROMPT, params):
                pass
            if i >= 10:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    machine = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%F")}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_demo_checkpoint(Path(tmp) / "tiny", preset="tiny")
        config = MoerayConfig(
            tiers=[{"name": "fast", "model": str(path)}, {"name": "reasoning", "model": str(path)}],
            serve={"grpc_port": free_port(), "http_port": free_port()},
        )
        engine = asyncio.run(engine_latencies(path, args.requests))
        with LocalStack(config, num_cpus=2) as stack:
            ends = stack.endpoints()
            g = grpc_latencies(ends["grpc"], args.requests)
            h = http_latencies(ends["http"], args.requests)
    rows = [
        summary("engine_only_1_token", engine, **machine),
        summary("grpc_e2e_1_token", g, **machine),
        summary("http_e2e_1_token", h, **machine),
        {"bench": "grpc_overhead", "p50_ms": round(pct(g, 0.5) - pct(engine, 0.5), 3),
         "p99_ms": round(pct(g, 0.99) - pct(engine, 0.99), 3), **machine},
        {"bench": "http_overhead", "p50_ms": round(pct(h, 0.5) - pct(engine, 0.5), 3),
         "p99_ms": round(pct(h, 0.99) - pct(engine, 0.99), 3), **machine},
        summary("route_decision", decision_latencies(config, 2000), **machine),
    ]  # fmt: skip
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
