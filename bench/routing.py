"""Routing decision latency: the feature policy per request, and separately the classifier's cost.

    python bench/routing.py [--iters 20000] [--classifier-iters 50]

Prints JSON lines: {"bench": "routing", "policy": ..., "case": ..., "p50_us": ..., "p99_us": ...,
"cpu_p50_us": ..., "cpu_p99_us": ..., "n": ..., "machine": ..., "date": ..., "load_avg_1m": ...}. Cases: the prompts of router/data/default_routing.jsonl
(cycled), a 3-turn chat, and a 200 kB pasted document (only its head and tail are scanned).
Measures; never gates CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from collections.abc import Callable, Sequence

from moeray.cluster.config import RouterConfig
from moeray.router.classifier import DEFAULT_DATA_PATH, load_labeled_jsonl
from moeray.router.features import FeatureScorer
from moeray.router.messages import ChatMessage, RouteInput, TierLoad
from moeray.router.policy import Scorer, route

TIERS = ("fast", "reasoning")


def _percentiles(samples_ns: list[int], prefix: str) -> dict[str, float]:
    s = sorted(samples_ns)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] / 1e3  # noqa: E731
    return {f"{prefix}p50_us": round(pick(0.50), 2), f"{prefix}p99_us": round(pick(0.99), 2)}


def time_decisions(requests: Sequence[RouteInput], iters: int, scorer: Scorer) -> dict[str, float]:
    """Times route() one call at a time (the way the front door calls it).

    Wall time, and this thread's CPU time: on a shared, oversubscribed host the wall p99 is the
    scheduler's preemptions, the CPU p99 is the decision's own cost.
    """
    cfg, load = RouterConfig(), TierLoad({"reasoning": 3})
    for r in requests[:50]:  # warm caches and lazy loads
        route(r, cfg, TIERS, load, scorer)
    wall, cpu = [], []
    for i in range(iters):
        r = requests[i % len(requests)]
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        route(r, cfg, TIERS, load, scorer)
        cpu.append(time.thread_time_ns() - c0)
        wall.append(time.perf_counter_ns() - t0)
    return {**_percentiles(wall, ""), **_percentiles(cpu, "cpu_"), "n": iters}


def cases() -> dict[str, list[RouteInput]]:
    texts = [e.text for e in load_labeled_jsonl(DEFAULT_DATA_PATH)]
    chat = RouteInput(
        messages=(
            ChatMessage("system", "You are a helpful assistant."),
            ChatMessage("user", "My binary search loops forever, can you help?"),
            ChatMessage("assistant", "Sure, please paste the code."),
            ChatMessage("user", "while lo < hi: mid = (lo + hi) // 2; if a[mid] < x: lo = mid"),
        )
    )
    doc = ("The committee reviewed the quarterly figures in detail. " * 3700)[:200_000]
    return {
        "dataset_prompts": [RouteInput(prompt=t) for t in texts],
        "chat_4_turns": [chat],
        "doc_200kB": [RouteInput(prompt="Summarize this report:\n" + doc)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=20000)
    parser.add_argument("--classifier-iters", type=int, default=50)
    args = parser.parse_args()
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        "date": dt.date.today().isoformat(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    runs: list[tuple[str, Callable[[], Scorer], int]] = [("features", FeatureScorer, args.iters)]
    try:
        from moeray.router.classifier import EmbeddingClassifier, _embedder

        _embedder()
        train = load_labeled_jsonl(DEFAULT_DATA_PATH, split="train")
        clf = EmbeddingClassifier.train(train)
        runs.append(("classifier", lambda: clf, args.classifier_iters))
    except ImportError as e:
        print(json.dumps({"bench": "routing", "policy": "classifier", "skipped": str(e)}))
    for policy, make, iters in runs:
        scorer = make()
        for case, reqs in cases().items():
            res = time_decisions(reqs, iters, scorer)
            print(json.dumps({"bench": "routing", "policy": policy, "case": case, **res, **meta}))


if __name__ == "__main__":
    main()
