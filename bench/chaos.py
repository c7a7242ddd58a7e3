"""The chaos suite: overload, bad input and faults against a live `moeray serve` on loopback.

Starts `moeray serve --config <generated yaml>` as a child process (two tiny demo checkpoints, a
redis-server of its own so that it can kill it), runs the scenarios and prints one table (and,
with --json, one JSON object per row). Scenarios (--scenarios, comma-separated):

- overload:     `--limit` long streams fill the fast tier, then `--factor - 1` times as many
                requests arrive at once, over gRPC and over HTTP; then as many clients keep a
                call each in flight until `--refusals` more are answered. Every one must be
                refused with RESOURCE_EXHAUSTED / 429 + Retry-After; reports the refusals' p50 /
                p99 latency of each phase.
- queue_wait:   the reasoning tier's seats (engine.max_num_seqs) are full; requests admitted
                behind them must get a first token or a refusal within router.max_queue_wait_s.
- bad_input:    a corpus of malformed requests over both protocols (hand-written cases naming
                the field, plus seeded random mutations of valid bodies): each must get
                INVALID_ARGUMENT / 400 naming its field; none may get 500, INTERNAL or UNKNOWN.
- huge_prompt:  a 3.9 MiB prompt while a stream runs: refused at once, the stream not stalled.
- cancel_storm: streams cancelled at random moments over both protocols: every KV block freed,
                every request that left the client counted in moeray_requests_total (an HTTP one
                the client cancelled before sending it is shown as "never sent").
- redis_kill:   the redis-server stopped during 20 streams: 20/20 complete; Redis back, serving on.
- engine_kill:  the reasoning tier's engine replica SIGKILLed during 8 streams: in-flight ones get
                UNAVAILABLE, health turns 503 within a second, the tier serves again after Serve
                restarts the replica.
- shard_kill:   on the sharded stack (below), 100 greedy streams of a fixed length; while they
                stream, one expert-shard actor's process is SIGKILLed: 100/100 complete, their
                tokens identical to a reference run of the same prompts (same stack, no fault),
                the shard replaced.
- node_removal: the same, removing a worker node that holds shards (`cluster.remove_node`).

The other scenarios share one `moeray serve` on a Ray instance of its own. shard_kill and
node_removal run afterwards on a second stack: a local multi-node Ray cluster
(`ray.cluster_utils.Cluster`: a head holding the router and the engine replica, --workers worker
raylets carrying the expert-slot resource) with `moeray serve --ray-address` serving one tier of
--shards expert shards (a tiny demo checkpoint); the reference run comes first. Everything
started (Ray clusters, redis-servers, servers) is stopped at the end.

    python bench/chaos.py                       # every scenario, --limit 256 --factor 10
    python bench/chaos.py --scenarios bad_input,overload --limit 32 --json
    python bench/chaos.py --scenarios overload --limit 3   # 10x of a small limit: issue 14's bound
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import itertools
import json
import logging
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import grpc
import yaml
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import RedisServer, free_port
from moeray.v1 import inference_pb2 as pb
from prometheus_client.parser import text_string_to_metric_families

GENERATE = "/moeray.v1.Inference/Generate"
#: Refusals must be this fast (the issue's bound) at p99.
REFUSAL_P99_MS = 50.0
#: The fast tier's context: room for seat-holding streams that outlast an overload phase.
FAST_LEN = 4096


@dataclass
class Row:
    scenario: str
    protocol: str
    expected: str
    observed: str
    ok: bool


# ---- the served stack ------------------------------------------------------------------------


class Served:
    """`moeray serve` in a child process (own process group) with a redis-server of our own."""

    #: "local": a Ray of its own, never one `ray start` left running (ShardedServed: its cluster)
    ray_address = "local"

    def __init__(self, root: Path, limit: int, queue_wait_s: float) -> None:
        self.root, self.limit, self.queue_wait_s = root, limit, queue_wait_s
        self.redis = RedisServer().start()
        self.grpc_port, self.http_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = root / "serve.log"

    def config(self) -> dict[str, Any]:
        ckpt = {n: self.root / n for n in ("fast", "reasoning")}
        for seed, path in enumerate(ckpt.values()):
            if not (path / "config.json").is_file():
                build_demo_checkpoint(path, preset="tiny", seed=seed, num_layers=2)
        return {
            "tiers": [
                {"name": "fast", "model": str(ckpt["fast"]), "engine": {
                    "max_model_len": FAST_LEN, "max_tokens_limit": 4000,
                    "max_num_seqs": self.limit, "max_queue": self.limit,
                    "num_kv_blocks": self.limit * FAST_LEN // 16 + 64}},
                {"name": "reasoning", "model": str(ckpt["reasoning"]), "engine": {
                    "max_model_len": 4096, "max_tokens_limit": 4000, "max_num_seqs": 8,
                    "max_queue": 256, "num_kv_blocks": 2200}},
            ],
            "router": {"max_inflight_per_tier": self.limit, "max_message_bytes": 4 * 2**20,
                       "max_queue_wait_s": self.queue_wait_s},
            "state": {"redis_url": self.redis.url},
            "serve": {"grpc_port": self.grpc_port, "http_port": self.http_port},
        }  # fmt: skip

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 300.0) -> None:
        cfg = self.root / "chaos.yaml"
        cfg.write_text(yaml.safe_dump(self.config()))
        cmd = [
            sys.executable,
            "-m",
            "moeray.cluster.cli",
            "serve",
            "--config",
            str(cfg),
            "--ray-address",
            self.ray_address,
        ]
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while b"moeray is serving" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeray serve exited: {self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"moeray serve did not start in {timeout_s} s")
            time.sleep(0.5)

    def replica_pids(self, name: str) -> list[int]:
        """Pids of this server's Serve replica processes of deployment `name` (descendants of
        the serve process only: other Ray clusters may run on the machine)."""
        assert self.proc is not None
        found = []
        for pid in _descendants(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if f"ServeReplica:moeray:{name}" in cmd:
                found.append(pid)
        return found

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.redis.stop()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        ppid = int(text[text.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


#: The custom resource expert shards ask for (experts.shard_resource's default): only the
#: worker raylets of the sharded stack advertise it.
SLOT = "moeray_expert_slot"
#: Resources only the sharded stack's head advertises: its engine replica and router stay there,
#: so that a worker node can go without taking either (losing those is Serve's business).
HEAD_ENGINE, HEAD_ROUTER = "chaos_head_engine", "chaos_head_router"
SHARDED_TIER = "sharded"


class ShardedServed(Served):
    """`moeray serve --ray-address <cluster>` on a local multi-node Ray cluster
    (`ray.cluster_utils.Cluster`: a head holding the engine replica and the router, `workers`
    worker raylets carrying the expert-slot resource), serving one sharded tier (a tiny demo
    checkpoint, `shards` expert-shard actors); a redis-server of our own. This process joins the
    cluster to find the shard actors and the nodes of Serve's replicas (Ray's state API)."""

    def __init__(self, root: Path, workers: int, shards: int, seats: int) -> None:
        super().__init__(root, seats, queue_wait_s=60.0)
        self.workers, self.shards = workers, shards
        self.cluster: Any = None
        self.worker_nodes: list[Any] = []

    def config(self) -> dict[str, Any]:
        ckpt = self.root / SHARDED_TIER
        if not (ckpt / "config.json").is_file():
            build_demo_checkpoint(ckpt, preset="tiny", seed=3, num_layers=2)
        # Prefix caching off: the fault runs repeat the reference run's prompts, and a fault
        # must be the only difference between the two.
        return {
            "tiers": [{"name": SHARDED_TIER, "model": str(ckpt), "resource": HEAD_ENGINE,
                       "engine": {"max_model_len": 256, "max_tokens_limit": 200,
                                  "max_num_seqs": self.limit, "max_queue": self.limit,
                                  "num_kv_blocks": self.limit * 8 + 64,
                                  "enable_prefix_caching": False},
                       "experts": {"shards": self.shards, "dispatch_deadline_s": 5.0}}],
            "router": {"fast_tier": SHARDED_TIER, "reasoning_tier": SHARDED_TIER,
                       "max_inflight_per_tier": self.limit,
                       "max_queue_wait_s": self.queue_wait_s},
            "state": {"redis_url": self.redis.url},
            "serve": {"grpc_port": self.grpc_port, "http_port": self.http_port,
                      "router_resource": HEAD_ROUTER},
        }  # fmt: skip

    def start(self, timeout_s: float = 600.0) -> None:
        import ray
        from ray.cluster_utils import Cluster

        # the dashboard serves Ray's state API (which node holds which Serve replica)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 4, "include_dashboard": True,
            "resources": {HEAD_ENGINE: 1, HEAD_ROUTER: 1}})  # fmt: skip
        self.worker_nodes = [
            self.cluster.add_node(num_cpus=4, resources={SLOT: 2 * self.shards + 2})
            for _ in range(self.workers)
        ]
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        self.ray_address = self.cluster.address
        super().start(timeout_s)

    def state(self) -> Any:
        from moeray.cluster.state import ClusterState

        return ClusterState(self.redis.url)

    def shard_where(self) -> dict[int, tuple[str, int]]:
        """Replica id -> (Ray node id, pid) of every shard actor the tier's controller owns."""
        import ray
        from moeray.cluster.expert_parallel import shard_namespace

        state = self.state()
        try:
            directory = state.shard_directory(SHARDED_TIER)
        finally:
            state.close()
        out: dict[int, tuple[str, int]] = {}
        for rid, name in directory.items():
            handle = ray.get_actor(name, namespace=shard_namespace("default"))
            where = cast(tuple[str, str, int], ray.get(handle.where.remote(), timeout=30))
            out[rid] = (where[0], where[2])
        return out

    def moeray_actor_nodes(self) -> set[str]:
        """Ray node ids holding a live Serve replica of the moeray app (router, engine, expert
        controller)."""
        from ray.util.state import list_actors

        return {str(a.node_id) for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000,
                                                raise_on_missing_output=False)
                if a.class_name.startswith("ServeReplica:moeray:")}  # fmt: skip

    def close(self) -> None:
        import ray

        try:
            super().close()
        finally:
            ray.shutdown()
            if self.cluster is not None:
                self.cluster.shutdown()


# ---- clients -----------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def gen_request(prompt: str, tier: str, max_tokens: int, **kw: Any) -> bytes:
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return pb.GenerateRequest(prompt=prompt, tier=tier, sampling=sampling, **kw).SerializeToString()


@dataclass
class Outcome:
    code: str  # gRPC status name, or the HTTP status as a string
    detail: str  # gRPC details, or the HTTP error's message
    field: str  # the field the refusal named (HTTP param; gRPC: first word of the details)
    ms: float  # time to the status or the first message
    messages: int = 0
    headers: dict[str, str] | None = None


class Clients:
    def __init__(self, served: Served) -> None:
        self.served = served
        self.channel = grpc.aio.insecure_channel(
            served.grpc, options=[("grpc.max_send_message_length", 64 * 2**20)]
        )
        self._generate = self.channel.unary_stream(
            GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString
        )
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        # /metrics and /health on a new connection each: a keep-alive one left idle through a
        # scenario may have been closed by the server (ServerDisconnectedError when reused).
        self.control = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def fresh_http(self) -> None:
        """New keep-alive connections for the next phase: one left idle longer than the server's
        keep-alive (uvicorn's 5 s, e.g. while a slow burst's last answers come in) is closed by
        the server, and a request sent on it fails in the client (ServerDisconnectedError)
        without reaching moeray."""
        await self.http.close()
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def close(self) -> None:
        await self.channel.close()
        await self.http.close()
        await self.control.close()

    async def grpc_call(self, body: bytes, timeout: float = 120.0, hold: asyncio.Event | None = None,
                        first: asyncio.Event | None = None) -> Outcome:  # fmt: skip
        """One Generate with a raw body; `hold`: cancel the call once it is set (after the first
        message); `first` is set when the first message arrives."""
        start = time.perf_counter()
        call = self._generate(body, timeout=timeout)
        n, ms = 0, 0.0
        try:
            async for _ in call:
                if n == 0:
                    ms = (time.perf_counter() - start) * 1e3
                    if first is not None:
                        first.set()
                    if hold is not None:
                        await hold.wait()
                        call.cancel()
                        return Outcome("CANCELLED_BY_CLIENT", "", "", ms, 1)
                n += 1
            return Outcome("OK", "", "", ms, n)
        except grpc.aio.AioRpcError as e:
            if first is not None:
                first.set()
            d = e.details() or ""
            return Outcome(
                e.code().name, d, d.split(" ")[0], (time.perf_counter() - start) * 1e3, n
            )

    async def http_call(self, path: str, body: bytes, timeout: float = 120.0) -> Outcome:
        start = time.perf_counter()
        try:
            async with self.http.post(self.served.http + path, data=body,
                                      headers={"content-type": "application/json"},
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as r:  # fmt: skip
                raw = await r.read()
                ms = (time.perf_counter() - start) * 1e3
                detail, field = "", ""
                if r.status != 200:
                    with contextlib.suppress(Exception):
                        err = json.loads(raw)["error"]
                        detail, field = err["message"], err["param"] or ""
                return Outcome(str(r.status), detail, field, ms, 1, dict(r.headers))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return Outcome(type(e).__name__, str(e), "", (time.perf_counter() - start) * 1e3)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.control.get(self.served.http + "/metrics") as r:
            text = await r.text()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def health(self) -> int:
        try:
            async with self.control.get(self.served.http + "/health",
                                     timeout=aiohttp.ClientTimeout(total=5)) as r:  # fmt: skip
                return r.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return 0

    async def kv_freed(self, tier: str, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = await self.metrics()
            g = {dict(k[1]).get("field"): v for k, v in m.items()
                 if k[0] == "moeray_engine" and dict(k[1]).get("tier") == tier}  # fmt: skip
            if (
                g.get("running") == 0
                and g.get("waiting") == 0
                and (g.get("kv_blocks_free") == g.get("kv_blocks_total"))
            ):
                return True
            await asyncio.sleep(0.3)
        return False

    async def outcomes(self) -> Counter[tuple[str, str, str]]:
        m = await self.metrics()
        out: Counter[tuple[str, str, str]] = Counter()
        for (name, labels), v in m.items():
            if name == "moeray_requests_total":
                d = dict(labels)
                out[(d["tier"], d["protocol"], d["outcome"])] = int(v)
        return out


def http_body(prompt: str, model: str, max_tokens: int, **kw: Any) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": 0, "ignore_eos": True, **kw}).encode()  # fmt: skip


# ---- overload ----------------------------------------------------------------------------------


async def fill(c: Clients, tier: str, n: int, hold: asyncio.Event,
               max_tokens: int) -> tuple[list[asyncio.Task[Outcome]], int]:  # fmt: skip
    """n long streams on `tier`, each held after its first message until `hold` is set;
    returns once every one has its first message (or failed), with the count that started."""
    firsts = [asyncio.Event() for _ in range(n)]
    body = gen_request("hold the seat", tier, max_tokens)
    tasks = [asyncio.create_task(c.grpc_call(body, 300, hold, f)) for f in firsts]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 300)
    started = sum(1 for t in tasks if not t.done() or t.result().code == "CANCELLED_BY_CLIENT")
    return tasks, started


async def kept_in_flight(
    send: Callable[[], Awaitable[Outcome]], clients: int, rounds: int
) -> list[Outcome]:
    """`clients` callers, each sending its next call when its last is answered, `rounds` each."""
    out: list[Outcome] = []

    async def client() -> None:
        for _ in range(rounds):
            out.append(await send())

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


async def overload(c: Clients, limit: int, factor: int, refusals: int) -> list[Row]:
    rows = []
    for protocol in ("grpc", "http"):
        hold = asyncio.Event()
        held, started = await fill(c, "fast", limit, hold, 4000)
        extra = (factor - 1) * limit
        if protocol == "grpc":
            body = gen_request("one more", "fast", 1)
            send = functools.partial(c.grpc_call, body, 60)
        else:
            hb = http_body("one more", "fast", 1)
            send = functools.partial(c.http_call, "/v1/completions", hb, 60)
        if protocol == "http":
            await c.fresh_http()
        burst = await asyncio.gather(*(send() for _ in range(extra)))
        if protocol == "http":
            await c.fresh_http()
        sustained = await kept_in_flight(send, extra, max(1, refusals // extra))
        hold.set()
        await asyncio.gather(*held)
        refused = "RESOURCE_EXHAUSTED" if protocol == "grpc" else "429"
        for how, results in (("at once", burst), ("kept in flight", sustained)):
            codes = Counter(r.code for r in results)
            ms = [r.ms for r in results if r.code == refused]
            retry_after = all((r.headers or {}).get("Retry-After") == "1"
                              for r in results if r.code == "429")  # fmt: skip
            observed = (f"{started}/{limit} admitted; {len(results)} more: {dict(codes)}; "
                        f"refusal p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms")  # fmt: skip
            if protocol == "http":
                observed += f"; Retry-After {'on all' if retry_after else 'MISSING'}"
            ok = (started == limit and codes[refused] == len(results)
                  and pct(ms, 0.99) <= REFUSAL_P99_MS and retry_after)  # fmt: skip
            name = f"overload {factor}x ({factor * limit} vs {limit}), {extra} {how}"
            rows.append(Row(name, protocol, f"{refused} within {REFUSAL_P99_MS:.0f} ms p99",
                            observed, ok))  # fmt: skip
        await c.kv_freed("fast")
    return rows


async def queue_wait(c: Clients, wait_s: float) -> list[Row]:
    """8 seats on the reasoning tier held; 24 more admitted: a first token or 429 in time."""
    hold = asyncio.Event()
    held, _ = await fill(c, "reasoning", 8, hold, 4000)
    body = gen_request("waiting for a seat", "reasoning", 4)
    results = await asyncio.gather(*(c.grpc_call(body, 60) for _ in range(24)))
    hold.set()
    await asyncio.gather(*held)
    codes = Counter(r.code for r in results)
    worst = max(r.ms for r in results)
    ok = worst <= (wait_s + 1.0) * 1e3 and set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    return [Row("admitted, waiting for a seat (8 seats, 24 more)", "grpc",
                f"first message or RESOURCE_EXHAUSTED within max_queue_wait_s={wait_s:g} s",
                f"{dict(codes)}; slowest answer {worst / 1e3:.2f} s", ok)]  # fmt: skip


# ---- bad input ---------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def grpc_corpus() -> list[tuple[str, bytes, str, str]]:
    """(name, raw GenerateRequest bytes, expected code, field the details must start with)."""
    S = pb.SamplingParams
    ok_prompt = _ld(2, b"hello")
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    cases: list[tuple[str, Any, str]] = [
        ("empty prompt", pb.GenerateRequest(prompt=""), "prompt"),
        ("blank prompt", pb.GenerateRequest(prompt="   \n"), "prompt"),
        ("no input", pb.GenerateRequest(tier="fast"), "input"),
        ("prompt beyond context", pb.GenerateRequest(prompt="word " * (FAST_LEN + 100),
                                                     tier="fast"), "prompt"),
        ("max_tokens 0", pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=0)),
         "sampling.max_tokens"),
        ("max_tokens -1", pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=-1)),
         "sampling.max_tokens"),
        ("max_tokens 2^31-1", pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=2**31 - 1)),
         "sampling.max_tokens"),
        ("temperature -1", pb.GenerateRequest(prompt="hi", sampling=S(temperature=-1)),
         "sampling.temperature"),
        ("temperature nan", pb.GenerateRequest(prompt="hi", sampling=S(temperature=float("nan"))),
         "sampling.temperature"),
        ("temperature inf", pb.GenerateRequest(prompt="hi", sampling=S(temperature=float("inf"))),
         "sampling.temperature"),
        ("top_p 0", pb.GenerateRequest(prompt="hi", sampling=S(top_p=0)), "sampling.top_p"),
        ("top_p 1.5", pb.GenerateRequest(prompt="hi", sampling=S(top_p=1.5)), "sampling.top_p"),
        ("min_tokens -1", pb.GenerateRequest(prompt="hi", sampling=S(min_tokens=-1)),
         "sampling.min_tokens"),
        ("top_p nan", pb.GenerateRequest(prompt="hi", sampling=S(top_p=float("nan"))),
         "sampling.top_p"),
        ("top_k -2", pb.GenerateRequest(prompt="hi", sampling=S(top_k=-2)), "sampling.top_k"),
        ("17 stop strings", pb.GenerateRequest(prompt="hi", sampling=S(stop=["x"] * 17)),
         "sampling.stop"),
        ("empty stop string", pb.GenerateRequest(prompt="hi", sampling=S(stop=[""])),
         "sampling.stop"),
        ("stop string too long", pb.GenerateRequest(prompt="hi", sampling=S(stop=["x" * 300])),
         "sampling.stop"),
        ("unknown tier", pb.GenerateRequest(prompt="hi", tier="huge"), "tier"),
        ("tier 1 KiB", pb.GenerateRequest(prompt="hi", tier="t" * 1024), "tier"),
        ("request_id too long", pb.GenerateRequest(prompt="hi", request_id="r" * 200),
         "request_id"),
        ("prompt_bytes bad UTF-8", pb.GenerateRequest(prompt_bytes=b"caf\xc3 \xff"), "prompt"),
        ("prompt_bytes lone surrogate", pb.GenerateRequest(prompt_bytes=b"\xed\xa0\x80"),
         "prompt"),
        ("prompt_bytes empty", pb.GenerateRequest(prompt_bytes=b""), "prompt"),
        # Longer than any tier's context (the router reads the field's length, unparsed).
        ("oversize prompt", pb.GenerateRequest(prompt="x" * (4 * 2**20 + 10)), "prompt"),
        ("empty messages", pb.GenerateRequest(messages=pb.ChatMessages()), "messages"),
        ("bad role", pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="robot", content="hi")])), "messages[0].role"),
        ("all contents empty", pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="user", content="")])), "messages"),
        ("2000 messages", pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="user", content="a")] * 2000)), "messages"),
        ("empty token ids", pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), "prompt_token_ids"),
        ("token id beyond vocab", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[10**6]),
                                                     tier="fast"), "prompt_token_ids"),
        ("token ids beyond context", pb.GenerateRequest(prompt_token_ids=pb.TokenIds(
            ids=[1] * (FAST_LEN + 100)), tier="fast"), "prompt_token_ids"),
        ("tools on a prompt", pb.GenerateRequest(prompt="hi", tools=[pb.Tool(name="f")],
                                                 tool_choice=pb.ToolChoice(function="f")), "tools"),
        ("tool name with a space", pb.GenerateRequest(messages=chat, tools=[pb.Tool(name="a b")],
                                                      tool_choice=pb.ToolChoice(mode="required")),
         "tools[0].name"),
        ("tool parameters no JSON", pb.GenerateRequest(messages=chat, tools=[
            pb.Tool(name="f", parameters="{")], tool_choice=pb.ToolChoice(function="f")),
         "tools[0].parameters"),
        ("tool_choice names no tool", pb.GenerateRequest(messages=chat, tools=[pb.Tool(name="f")],
                                                         tool_choice=pb.ToolChoice(function="g")),
         "tool_choice"),
        ("tool_choice mode unknown", pb.GenerateRequest(messages=chat, tools=[pb.Tool(name="f")],
                                                        tool_choice=pb.ToolChoice(mode="always")),
         "tool_choice"),
        ("tool call arguments no JSON", pb.GenerateRequest(messages=pb.ChatMessages(messages=[
            pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(name="f", arguments="{")]),
            pb.ChatMessage(role="user", content="hi")])), "messages[0].tool_calls[0].arguments"),
    ]  # fmt: skip
    out = [(n, m.SerializeToString(), "INVALID_ARGUMENT", f) for n, m, f in cases]
    raw = [
        ("prompt invalid UTF-8", _ld(2, b"caf\xc3\x28"), "prompt"),
        ("prompt 0xff bytes", _ld(2, b"\xff\xfe\xfd"), "prompt"),
        ("prompt lone surrogate", _ld(2, b"ab\xed\xa0\x80"), "prompt"),
        ("prompt truncated UTF-8", _ld(2, b"caf\xc3"), "prompt"),
        ("request_id invalid UTF-8", _ld(1, b"\xff") + ok_prompt, "request_id"),
        ("tier invalid UTF-8", ok_prompt + _ld(6, b"\xc0\xaf"), "tier"),
        (
            "message content invalid UTF-8",
            _ld(3, _ld(1, _ld(1, b"user") + _ld(2, b"\xff"))),
            "messages[0].content",
        ),
        (
            "message role invalid UTF-8",
            _ld(3, _ld(1, _ld(1, b"\xfe") + _ld(2, b"hi"))),
            "messages[0].role",
        ),
        ("stop invalid UTF-8", ok_prompt + _ld(7, _ld(6, b"\xff")), "sampling.stop"),
        ("truncated message", ok_prompt[:-2], "request"),
        ("length beyond end", b"\x12\x7fhello", "request"),
        ("bad wire type", b"\x17hello", "request"),
        ("field number 0", b"\x02\x01x", "request"),
        ("unterminated varint", b"\x08" + b"\xff" * 11, "request"),
    ]
    out += [(n, b, "INVALID_ARGUMENT", f) for n, b, f in raw]
    rng = random.Random(14)
    for i in range(20):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        with contextlib.suppress(Exception):
            pb.GenerateRequest.FromString(junk)  # parses: skip (it may even be valid)
            continue
        out.append((f"random bytes #{i}", junk, "INVALID_ARGUMENT", "request"))
    return out


def http_corpus() -> list[tuple[str, str, bytes, str, str]]:
    """(name, path, body, expected status, expected param)."""
    C, CH = "/v1/completions", "/v1/chat/completions"

    def j(**kw: Any) -> bytes:
        return json.dumps({"model": "auto", "prompt": "hi", **kw}).encode()

    def chat(**kw: Any) -> bytes:
        return json.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi"}],
                           **kw}).encode()  # fmt: skip

    cases = [
        ("not JSON", C, b"{not json", "body"),
        ("invalid UTF-8 body", C, b'{"prompt": "\xff"}', "body"),
        ("empty body", C, b"", "body"),
        ("JSON array", C, b"[1, 2]", "body"),
        ("JSON string", C, b'"hi"', "body"),
        ("nested 100k deep", C, b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000
         + b"}", "body"),
        ("nested 100k deep, no object", C, b"[" * 100_000 + b"]" * 100_000, "body"),
        ("missing prompt", C, b'{"model": "auto"}', "prompt"),
        ("empty prompt", C, j(prompt=""), "prompt"),
        ("prompt number", C, j(prompt=5), "prompt"),
        ("prompt null", C, j(prompt=None), "prompt"),
        ("prompt two strings", C, j(prompt=["a", "b"]), "prompt"),
        ("prompt lone surrogate", C, b'{"prompt": "\\ud800"}', "prompt"),
        ("prompt beyond context", C, j(prompt="word " * (FAST_LEN + 100), model="fast"),
         "prompt"),
        ("token id beyond vocab", C, j(prompt=[10**6], model="fast"), "prompt"),
        ("token id negative", C, j(prompt=[-1], model="fast"), "prompt"),
        ("token id true", C, j(prompt=[True]), "prompt"),
        # A body longer than any request holding an acceptable prompt: refused unparsed.
        ("oversize prompt", C, j(prompt="x" * (4 * 2**20 + 10)), "body"),
        ("max_tokens true", C, j(max_tokens=True), "max_tokens"),
        ("max_tokens false", C, j(max_tokens=False), "max_tokens"),
        ("max_tokens string", C, j(max_tokens="5"), "max_tokens"),
        ("max_tokens 1.5", C, j(max_tokens=1.5), "max_tokens"),
        ("max_tokens 0", C, j(max_tokens=0), "max_tokens"),
        ("max_tokens 10^30", C, j(max_tokens=10**30), "max_tokens"),
        ("max_tokens above limit", C, j(max_tokens=4001, model="fast"), "max_tokens"),
        ("max_completion_tokens 0", CH, chat(max_completion_tokens=0), "max_completion_tokens"),
        ("seed 2^64", C, j(seed=2**64), "seed"),
        ("seed 10^30", C, j(seed=10**30), "seed"),
        ("seed -2^63-1", C, j(seed=-(2**63) - 1), "seed"),
        ("seed true", C, j(seed=True), "seed"),
        ("seed 1.5", C, j(seed=1.5), "seed"),
        ("temperature string", C, j(temperature="hot"), "temperature"),
        ("temperature true", C, j(temperature=True), "temperature"),
        ("temperature -1", C, j(temperature=-1), "temperature"),
        ("temperature 1e400", C, b'{"prompt": "hi", "temperature": 1e400}', "temperature"),
        ("top_p 2", C, j(top_p=2), "top_p"),
        ("top_p 0", C, j(top_p=0), "top_p"),
        ("top_k -5", C, j(top_k=-5), "top_k"),
        ("top_k true", C, j(top_k=True), "top_k"),
        ("n 0", C, j(n=0), "n"),
        ("n 10^6", C, j(n=10**6), "n"),
        ("n true", C, j(n=True), "n"),
        ("stream string", C, j(stream="yes"), "stream"),
        ("stream 1", C, j(stream=1), "stream"),
        ("ignore_eos 1", C, j(ignore_eos=1), "ignore_eos"),
        ("stop 17 strings", C, j(stop=["x"] * 17), "stop"),
        ("stop empty string", C, j(stop=[""]), "stop"),
        ("stop number", C, j(stop=[1]), "stop"),
        ("stream_options string", C, j(stream_options="x"), "stream_options"),
        ("model number", C, j(model=5), "model"),
        ("model unknown", C, j(model="gpt-9"), "model"),
        ("tools with tool_choice auto", CH, chat(tools=[{"type": "function",
                                                          "function": {"name": "f"}}]),
         "tool_choice"),
        ("a tool named with a space", CH, chat(tools=[{"type": "function",
                                                       "function": {"name": "a b"}}],
                                               tool_choice="required"), "tools[0].function.name"),
        ("tool_choice", CH, chat(tool_choice="required"), "tool_choice"),
        ("functions", CH, chat(functions=[{"name": "f"}]), "functions"),
        ("a tool call's arguments not JSON", CH, chat(messages=[
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c", "type": "function",
                             "function": {"name": "f", "arguments": "{oops"}}]}]),
         "messages[1].tool_calls[0].function.arguments"),
        ("response_format xml", CH, chat(response_format={"type": "xml"}), "response_format"),
        ("response_format bad schema", CH, chat(response_format={
            "type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
         "response_format"),
        ("logprobs 1 (chat: a boolean)", CH, chat(logprobs=1), "logprobs"),
        ("top_logprobs without logprobs", CH, chat(top_logprobs=3), "top_logprobs"),
        ("top_logprobs 21", CH, chat(logprobs=True, top_logprobs=21), "top_logprobs"),
        ("logprobs 21 (completions)", C, j(logprobs=21), "logprobs"),
        ("echo (chat)", CH, chat(echo=True), "echo"),
        ("best_of 2", C, j(best_of=2), "best_of"),
        ("logit_bias 101", C, j(logit_bias={"50": 101}), "logit_bias"),
        ("logit_bias key not an id", C, j(logit_bias={"a": 1}), "logit_bias"),
        ("suffix", C, j(suffix="end"), "suffix"),
        ("min_tokens over max_tokens", C, j(max_tokens=2, min_tokens=3), "min_tokens"),
        ("presence_penalty 3", C, j(presence_penalty=3.0), "presence_penalty"),
        ("frequency_penalty true", C, j(frequency_penalty=True), "frequency_penalty"),
        ("repetition_penalty -1", C, j(repetition_penalty=-1.0), "repetition_penalty"),
        ("unknown field", C, j(colour="blue"), "colour"),
        ("empty messages", CH, chat(messages=[]), "messages"),
        ("messages not a list", CH, chat(messages="hi"), "messages"),
        ("message role robot", CH, chat(messages=[{"role": "robot", "content": "hi"}]),
         "messages[0].role"),
        ("message without role", CH, chat(messages=[{"content": "hi"}]), "messages[0].role"),
        ("message content number", CH, chat(messages=[{"role": "user", "content": 5}]),
         "messages[0].content"),
        ("message image part", CH, chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]), "messages[0].content"),
        ("message content lone surrogate", CH,
         b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages[0].content"),
        ("all contents empty", CH, chat(messages=[{"role": "user", "content": ""}]), "messages"),
    ]  # fmt: skip
    return [(n, p, b, "400", f) for n, p, b, f in cases]


def _mutations(n: int) -> list[tuple[str, str, bytes]]:
    """Seeded random byte mutations of valid HTTP bodies (any status but 5xx is fine)."""
    rng = random.Random(1414)
    bases = [(b"/v1/completions", http_body("hello there", "fast", 2)),
             (b"/v1/chat/completions", json.dumps({"model": "fast", "max_tokens": 2,
              "messages": [{"role": "user", "content": "hi"}]}).encode())]  # fmt: skip
    out = []
    for i in range(n):
        path, body = bases[i % 2]
        b = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append((f"mutation #{i}", path.decode(), bytes(b)))
    return out


def _grpc_mutations(n: int) -> list[tuple[str, bytes]]:
    rng = random.Random(4141)
    base = bytearray(gen_request("hello there", "fast", 2))
    out = []
    for i in range(n):
        b = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        out.append((f"mutation #{i}", bytes(b)))
    return out


def _named(o: Outcome, field: str) -> bool:
    """The refusal names `field` (or an element of it: "stop[0]" names "stop")."""
    named = o.field == field or o.field.startswith((field + "[", field + "."))
    return named and "Traceback" not in o.detail


async def bad_input(c: Clients, mutations: int) -> list[Row]:
    rows = []
    bad_g = []
    g = grpc_corpus()
    res = await asyncio.gather(*(c.grpc_call(b, 60) for _, b, _, _ in g))
    for (name, _, code, field), o in zip(g, res):
        if o.code != code or not _named(o, field):
            bad_g.append(f"{name}: {o.code} {o.detail[:80]!r}")
    gm = await asyncio.gather(*(c.grpc_call(b, 60) for _, b in _grpc_mutations(mutations)))
    g5 = [o for o in gm if o.code in ("INTERNAL", "UNKNOWN")]
    rows.append(Row(f"bad input: {len(g)} cases + {mutations} mutations", "grpc",
                    "INVALID_ARGUMENT naming the field; never INTERNAL / UNKNOWN",
                    f"{len(g) - len(bad_g)}/{len(g)} as expected; mutations: "
                    f"{dict(Counter(o.code for o in gm))}"
                    + (f"; wrong: {bad_g[:6]}" if bad_g else ""), not bad_g and not g5))  # fmt: skip
    h = http_corpus()
    res = await asyncio.gather(*(c.http_call(p, b, 60) for _, p, b, _, _ in h))
    bad_h = []
    for (name, _, _, code, field), o in zip(h, res):
        if o.code != code or not _named(o, field):
            bad_h.append(f"{name}: {o.code} {o.field!r} {o.detail[:60]!r}")
    hm = await asyncio.gather(*(c.http_call(p, b, 60) for _, p, b in _mutations(mutations)))
    h5 = [o for o in hm if o.code.startswith("5") or not o.code.isdigit()]
    rows.append(Row(f"bad input: {len(h)} cases + {mutations} mutations", "http",
                    "400 naming the field (param); never 500",
                    f"{len(h) - len(bad_h)}/{len(h)} as expected; mutations: "
                    f"{dict(Counter(o.code for o in hm))}"
                    + (f"; wrong: {bad_h[:6]}" if bad_h else ""), not bad_h and not h5))  # fmt: skip
    return rows


# ---- huge prompt -------------------------------------------------------------------------------


HUGE = "lorem ipsum " * (int(3.9 * 2**20) // 12)  # 3.9 MiB
#: The control window before the huge prompt: the stream's worst gap with nothing sent; and
#: the pause between the gRPC and the HTTP send.
CONTROL_S = APART_S = 0.1


def _send_huge(grpc_addr: str, http_base: str, ready: Any, go: Any, out: Any) -> None:
    """Another client process (as in production): builds both 3.9 MiB bodies and connects
    first, sets `ready`, and on `go` sends the prompt over gRPC, then (APART_S later) over HTTP; sends back the
    window on the monotonic clock all processes share. The client's own encoding is not
    inside the window: it is no stall of the server's."""
    import urllib.error
    import urllib.request

    grpc_body = gen_request(HUGE, "fast", 4)
    http_req = urllib.request.Request(http_base + "/v1/completions", data=http_body(HUGE, "fast", 4),
                                      headers={"content-type": "application/json"})  # fmt: skip
    opts = [("grpc.max_send_message_length", 64 * 2**20)]
    with grpc.insecure_channel(grpc_addr, options=opts) as ch:
        call = ch.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        grpc.channel_ready_future(ch).result(timeout=30)
        ready.set()
        if not go.wait(120):
            return
        sent = time.perf_counter()
        try:
            list(call(grpc_body, timeout=60))
            g_code, g_detail = "OK", ""
        except grpc.RpcError as e:
            g_code, g_detail = e.code().name, e.details() or ""
        g_ms = (time.perf_counter() - sent) * 1e3
    grpc_done = time.perf_counter()
    time.sleep(APART_S)  # a gap that starts in one window does not end in the other
    between = time.perf_counter()
    try:
        with urllib.request.urlopen(http_req, timeout=60) as r:
            h_code = str(r.status)
    except urllib.error.HTTPError as e:
        h_code = str(e.code)
    done = time.perf_counter()
    out.send({"sent": sent, "grpc_done": grpc_done, "between": between, "done": done, "grpc": (g_code, g_detail, g_ms),
              "http": (h_code, (done - between) * 1e3)})  # fmt: skip


async def huge_prompt(c: Clients) -> list[Row]:
    """A 3.9 MiB prompt sent by another client process while a stream runs on the same tier."""
    import multiprocessing

    mp = multiprocessing.get_context("spawn")
    ready, go = mp.Event(), mp.Event()
    result, out = mp.Pipe(duplex=False)
    sender = mp.Process(target=_send_huge, args=(c.served.grpc, c.served.http, ready, go, out))
    sender.start()
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    task: asyncio.Task[None] | None = None
    try:
        if not await loop.run_in_executor(None, ready.wait, 120):
            raise RuntimeError("huge_prompt: the sender process did not get ready in 120 s")

        async def stream() -> None:
            # long enough to outlive the window on any machine (stopped once it has)
            async for _ in c._generate(gen_request("keep going", "fast", 3000), timeout=120):
                arrivals.append(time.perf_counter())

        task = asyncio.create_task(stream())
        deadline = time.monotonic() + 60
        while len(arrivals) < 20:
            if task.done() or time.monotonic() > deadline:
                raise RuntimeError(f"huge_prompt: the stream stopped at {len(arrivals)} tokens")
            await asyncio.sleep(0.01)
        quiet = (time.perf_counter(), 0.0)  # the control: as long a window with no huge prompt
        await asyncio.sleep(CONTROL_S)
        quiet = (quiet[0], time.perf_counter())
        go.set()
        if not await loop.run_in_executor(None, result.poll, 120):
            raise RuntimeError("huge_prompt: no answer from the sender process in 120 s")
        r = result.recv()
        deadline = time.monotonic() + 60  # one token after the window, then the stream is cancelled
        while not task.done() and arrivals[-1] <= r["done"] and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
    finally:
        go.set()
        if task is not None:
            task.cancel()
        sender.join(10)
        if sender.is_alive():
            sender.kill()
            sender.join(10)
    (g_code, g_detail, g_ms), (h_code, h_ms) = r["grpc"], r["http"]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    step = pct(gaps[:19], 0.5)

    def worst_gap(t0: float, t1: float) -> float:
        return max((b - a for a, b in itertools.pairwise(arrivals) if b >= t0 and a <= t1),
                   default=0.0)  # fmt: skip

    g_worst, h_worst = worst_gap(r["sent"], r["grpc_done"]), worst_gap(r["between"], r["done"])
    q_worst = worst_gap(*quiet)
    ok = (
        g_code == "INVALID_ARGUMENT"
        and h_code == "400"
        and arrivals[-1] > r["done"]
        and max(g_worst, h_worst) <= 2 * step
    )  # one step late; the stream outlived the window
    return [Row("3.9 MiB prompt during a stream", "both",
                "refused at once; the stream's next token delayed by at most one step",
                f"gRPC {g_code} in {g_ms:.0f} ms ({g_detail[:60]!r}), HTTP {h_code} in "
                f"{h_ms:.0f} ms; step {step * 1e3:.1f} ms, worst gap meanwhile "
                f"{g_worst * 1e3:.1f} ms (gRPC) / {h_worst * 1e3:.1f} ms (HTTP), sent by "
                f"another process; worst gap in the {CONTROL_S * 1e3:.0f} ms before, with no "
                f"huge prompt: {q_worst * 1e3:.1f} ms; the stream ran "
                f"{(arrivals[-1] - r['done']) * 1e3:.0f} ms past the window", ok)]  # fmt: skip


# ---- cancel storm ------------------------------------------------------------------------------


async def cancel_storm(c: Clients, n: int) -> list[Row]:
    """n streams, half over each protocol, each cancelled by its client after a random time (before
    or after its first answer). The HTTP clients use connections of their own: a keep-alive
    connection left from an earlier scenario may have been closed by the server meanwhile, and a
    request sent on it fails in the client (ServerDisconnectedError) without reaching moeray."""
    before = await c.outcomes()
    rng = random.Random(7)

    async def one_grpc() -> str:
        """How the client left: "answered" (after a message), "unanswered", or an error's name.
        (grpc.aio tells no "sent" apart from "answered": wait_for_connection waits for the
        server's initial metadata.)"""
        call = c._generate(gen_request("cancel me", "fast", 200), timeout=60)
        how = "unanswered"
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(rng.uniform(0.0, 1.0)):
                try:
                    async for _ in call:
                        how = "answered"
                except grpc.aio.AioRpcError as e:
                    how = e.code().name
        call.cancel()
        return how

    async def one_http(session: aiohttp.ClientSession) -> str:
        how = "unanswered"
        sent: dict[str, bool] = {}  # set by the trace once the request's headers are written
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(rng.uniform(0.05, 1.0)):
                try:
                    async with session.post(
                        c.served.http + "/v1/completions",
                        data=http_body("cancel me", "fast", 200, stream=True),
                        headers={"content-type": "application/json"},
                        trace_request_ctx=sent,
                    ) as r:
                        how = "answered"
                        async for _ in r.content:
                            pass
                except aiohttp.ClientError as e:
                    how = type(e).__name__
        return how if how != "unanswered" or sent else "never sent"

    async def headers_sent(_: Any, ctx: Any, __: Any) -> None:
        ctx.trace_request_ctx["sent"] = True

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(headers_sent)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     trace_configs=[trace]) as session:  # fmt: skip
        hows = await asyncio.gather(*(one_grpc() if i % 2 else one_http(session)
                                      for i in range(n)))  # fmt: skip
    by = {"grpc": Counter(h for i, h in enumerate(hows) if i % 2),
          "http": Counter(h for i, h in enumerate(hows) if not i % 2)}  # fmt: skip
    freed = await c.kv_freed("fast")
    await asyncio.sleep(1.0)

    def delta(after: Counter[tuple[str, str, str]], protocol: str = "", outcome: str = "",
              tiers: tuple[str, ...] = ("fast", "")) -> int:  # fmt: skip
        """Outcomes counted since `before`; tier "": a client that left before its request was
        read (and routed)."""
        return sum(after[k] - before.get(k, 0) for k in after if k[0] in tiers
                   and protocol in ("", k[1]) and outcome in ("", k[2]))  # fmt: skip

    after = await c.outcomes()
    counted = delta(after)
    per = "; ".join(f"{p} {delta(after, p)}/{sum(how.values())} ({_left(how)})"
                    for p, how in by.items())  # fmt: skip
    unsent = sum(how["never sent"] for how in by.values())
    late = ""
    if counted != n - unsent:  # counted later (generators finalized), or never
        await asyncio.sleep(10.0)
        late = f"; {delta(await c.outcomes())}/{n} after 10 s more"
    ok = freed and counted == n - unsent
    return [Row(f"cancel storm ({n} streams)", "both",
                "every KV block freed; every request sent counted",
                f"KV {'freed' if freed else 'NOT freed'}; {counted}/{n} counted within 1 s "
                f"({delta(after, outcome='cancelled')} cancelled, "
                f"{delta(after, tiers=('',))} of them before routing): {per}{late}", ok)]  # fmt: skip


def _left(how: Counter[str]) -> str:
    """How a protocol's storm clients left: before any answer, and the requests that never
    left the client (HTTP: timed out before aiohttp wrote the headers, the bench's own event
    loop being late) or failed in it."""
    other = [f", {v} {k}" for k, v in how.items() if k not in ("answered", "unanswered")]
    return f"{how['unanswered']} left before any answer" + "".join(other)


# ---- faults ------------------------------------------------------------------------------------


async def redis_kill(c: Clients, served: Served) -> list[Row]:
    body = gen_request("through a redis outage", "fast", 64)
    firsts = [asyncio.Event() for _ in range(20)]
    tasks = [asyncio.create_task(c.grpc_call(body, 120, None, f)) for f in firsts]
    await asyncio.gather(*(f.wait() for f in firsts))
    served.redis.stop()
    results = await asyncio.gather(*tasks)
    during = await c.grpc_call(gen_request("redis is down", "fast", 4), 60)
    served.redis.restart()
    await asyncio.sleep(2.0)
    after = await c.grpc_call(gen_request("redis is back", "fast", 4), 60)
    done = sum(1 for r in results if r.code == "OK" and r.messages >= 1)
    ok = done == 20 and during.code == "OK" and after.code == "OK"
    return [Row("redis killed during 20 streams", "grpc",
                "20/20 complete; serving continues", f"{done}/20 complete; new request while "
                f"down: {during.code}; after restart: {after.code}", ok)]  # fmt: skip


async def engine_kill(c: Clients, served: Served) -> list[Row]:
    pids = served.replica_pids("engine-reasoning")
    if not pids:
        return [Row("engine replica killed", "grpc", "-", "no engine replica process found", False)]
    body = gen_request("an engine dies", "reasoning", 4000)
    firsts = [asyncio.Event() for _ in range(8)]  # one per seat of the tier
    tasks = [asyncio.create_task(c.grpc_call(body, 120, None, f)) for f in firsts]
    await asyncio.gather(*(f.wait() for f in firsts))
    killed = time.perf_counter()
    for pid in pids[:1]:
        os.kill(pid, signal.SIGKILL)
    results = await asyncio.gather(*tasks)
    unhealthy_s = None
    while time.perf_counter() - killed < 10:
        if await c.health() == 503:
            unhealthy_s = time.perf_counter() - killed
            break
        await asyncio.sleep(0.05)
    fresh = await c.grpc_call(gen_request("right after", "reasoning", 2), 30)
    recovered_s = None
    while time.perf_counter() - killed < 180:
        o = await c.grpc_call(gen_request("are you back", "reasoning", 2), 30)
        if o.code == "OK":
            recovered_s = time.perf_counter() - killed
            break
        await asyncio.sleep(0.5)
    codes = Counter(r.code for r in results)
    details = sorted({r.detail[:90] for r in results if r.code != "OK"})
    ok = (set(codes) <= {"UNAVAILABLE", "OK"} and unhealthy_s is not None and unhealthy_s <= 1.0
          and recovered_s is not None)  # fmt: skip
    return [Row("engine replica killed during 8 streams", "grpc",
                "in flight: UNAVAILABLE; health 503 within 1 s; tier recovers",
                f"{dict(codes)} {details}; new request at once: {fresh.code}; health "
                f"503 after {_s(unhealthy_s)}; serving again after {_s(recovered_s)}", ok)]  # fmt: skip


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f} s"


# ---- shard faults (the sharded stack) ------------------------------------------------------------


@dataclass
class Streams:
    """One round of concurrent gRPC streams of the sharded tier, and what the fault did."""

    outcomes: list[tuple[str, list[int]]]  # per prompt: (status, every token id streamed)
    in_flight: int = 0  # streams not yet finished when the fault struck
    fault: str = ""  # what the fault did
    stall_s: float = 0.0  # longest pause of any stream after the fault


def sharded_prompts(n: int) -> list[str]:
    return [f"chaos stream {i}: the expert that serves this token may go away" for i in range(n)]


async def sharded_streams(c: Clients, prompts: list[str], max_tokens: int,
                          fault: Callable[[], Awaitable[str]] | None = None) -> Streams:  # fmt: skip
    """Every prompt streamed at once (greedy, ignore_eos); with `fault`, it is awaited once every
    stream has its first tokens (the prefill is behind them all) and before any has finished."""
    got: list[list[int]] = [[] for _ in prompts]
    stamps: list[list[float]] = [[] for _ in prompts]

    async def one(i: int) -> tuple[str, list[int]]:
        call = c._generate(gen_request(prompts[i], SHARDED_TIER, max_tokens), timeout=300)
        try:
            async for m in call:
                got[i].extend(m.token_ids)
                stamps[i].append(time.perf_counter())
            return "OK", got[i]
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name} {(e.details() or '')[:80]!r}", got[i]

    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    out = Streams([])
    if fault is not None:
        deadline = time.monotonic() + 300
        while not all(got) and not any(t.done() for t in tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        out.in_flight = sum(1 for t in tasks if not t.done())
        struck = time.perf_counter()
        out.fault = await fault()
    out.outcomes = list(await asyncio.gather(*tasks))
    if fault is not None:
        gaps = [
            b - max(a, struck) for ts in stamps for a, b in itertools.pairwise(ts) if b > struck
        ]
        out.stall_s = max(gaps, default=0.0)
    return out


def compare(name: str, expected: str, reference: Streams, run: Streams, max_tokens: int) -> Row:
    """The fault run against the reference run of the same prompts on the same stack."""
    n = len(run.outcomes)
    complete = sum(1 for code, toks in run.outcomes if code == "OK" and len(toks) == max_tokens)
    ref_ok = sum(1 for code, toks in reference.outcomes
                 if code == "OK" and len(toks) == max_tokens)  # fmt: skip
    differ = sum(1 for (_, a), (_, b) in zip(run.outcomes, reference.outcomes) if a != b)
    errors = Counter(code for code, _ in run.outcomes if code != "OK")
    observed = (f"{complete}/{n} complete, {differ} differ from the reference run "
                f"({ref_ok}/{n} complete, no fault); {run.in_flight} in flight when {run.fault}; "
                f"longest stall after it {run.stall_s:.2f} s"
                + (f"; errors {dict(errors)}" if errors else ""))  # fmt: skip
    ok = complete == n and ref_ok == n and differ == 0 and run.in_flight == n
    return Row(name, "grpc", expected, observed, ok)


async def shard_kill(c: Clients, served: ShardedServed, reference: Streams, prompts: list[str],
                     max_tokens: int) -> list[Row]:  # fmt: skip
    where = await asyncio.to_thread(served.shard_where)
    rid = min(where)
    _, pid = where[rid]

    async def kill() -> str:
        os.kill(pid, signal.SIGKILL)
        return f"shard {rid} (pid {pid}) was SIGKILLed"

    run = await sharded_streams(c, prompts, max_tokens, kill)
    # the tier's controller replaced it: every shard of the directory answers again
    replaced = await asyncio.to_thread(_wait_for, lambda: _answers(served, exclude_pid=pid), 120)
    row = compare(
        f"shard killed during {len(prompts)} streams",
        f"{len(prompts)}/{len(prompts)} complete, tokens identical to a reference run",
        reference,
        run,
        max_tokens,
    )
    row.observed += f"; shard replaced: {'yes' if replaced else 'NO (120 s)'}"
    row.ok = row.ok and replaced
    return [row]


async def node_removal(c: Clients, served: ShardedServed, reference: Streams, prompts: list[str],
                       max_tokens: int) -> list[Row]:  # fmt: skip
    where = await asyncio.to_thread(served.shard_where)
    busy = await asyncio.to_thread(served.moeray_actor_nodes)
    holders = {node for node, _ in where.values()}
    doomed = next((w for w in served.worker_nodes
                   if w.node_id in holders and w.node_id not in busy), None)  # fmt: skip
    name = f"worker node removed during {len(prompts)} streams"
    if doomed is None:
        return [Row(name, "grpc", "-", f"no worker node holds shards only (shards on {holders}, "
                    f"Serve replicas on {busy})", False)]  # fmt: skip
    lost = sorted(rid for rid, (node, _) in where.items() if node == doomed.node_id)

    async def remove() -> str:
        await asyncio.to_thread(served.cluster.remove_node, doomed)
        return f"the node holding shards {lost} was removed"

    run = await sharded_streams(c, prompts, max_tokens, remove)
    replaced = await asyncio.to_thread(_wait_for, lambda: _answers(served, gone=doomed.node_id),
                                       120)  # fmt: skip
    row = compare(name, f"{len(prompts)}/{len(prompts)} complete, tokens identical to a "
                  "reference run", reference, run, max_tokens)  # fmt: skip
    row.observed += f"; shards back on the other workers: {'yes' if replaced else 'NO (120 s)'}"
    row.ok = row.ok and replaced
    return [row]


def _answers(served: ShardedServed, exclude_pid: int = 0, gone: str = "") -> bool:
    """Every shard of the controller's directory answers, none is `exclude_pid`, none is on
    node `gone`, and there are `served.shards` of them."""
    try:
        where = served.shard_where()
    except Exception:  # a shard not (yet) there, or dead: ask again
        return False
    return len(where) == served.shards and all(
        pid != exclude_pid and node != gone for node, pid in where.values()
    )


def _wait_for(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.5)
    return False


async def run_sharded(served: ShardedServed, args: argparse.Namespace,
                      names: list[str]) -> list[Row]:  # fmt: skip
    """The reference run (no fault), then each fault scenario on the same stack."""
    c = Clients(served)
    prompts = sharded_prompts(args.streams)
    rows: list[Row] = []
    try:
        reference = await sharded_streams(c, prompts, args.sharded_tokens)
        steps = {"shard_kill": shard_kill, "node_removal": node_removal}
        for name in names:
            step = functools.partial(steps[name], c, served, reference, prompts,
                                     args.sharded_tokens)  # fmt: skip
            rows += await _timed(name, step)
    finally:
        await c.close()
    return rows


async def _timed(name: str, step: Callable[[], Awaitable[list[Row]]]) -> list[Row]:
    start = time.perf_counter()
    try:
        got = await step()
    except Exception as e:  # one scenario's failure is a row, not the end of the run
        got = [Row(name, "-", "-", f"scenario failed: {type(e).__name__}: {e}", False)]
    print(f"# {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return got


# ---- main --------------------------------------------------------------------------------------

SCENARIOS = ["bad_input", "huge_prompt", "overload", "queue_wait", "cancel_storm", "redis_kill",
             "engine_kill", "shard_kill", "node_removal"]  # fmt: skip


#: Scenarios on the sharded stack (a local multi-node Ray cluster); the others share one
#: `moeray serve` on a local Ray instance.
SHARDED = ("shard_kill", "node_removal")


async def run(served: Served, args: argparse.Namespace, names: list[str]) -> list[Row]:
    c = Clients(served)
    steps: dict[str, Callable[[], Awaitable[list[Row]]]] = {
        "bad_input": lambda: bad_input(c, args.mutations),
        "huge_prompt": lambda: huge_prompt(c),
        "overload": lambda: overload(c, args.limit, args.factor, args.refusals),
        "queue_wait": lambda: queue_wait(c, args.queue_wait_s),
        "cancel_storm": lambda: cancel_storm(c, args.cancels),
        "redis_kill": lambda: redis_kill(c, served),
        "engine_kill": lambda: engine_kill(c, served),
    }
    rows: list[Row] = []
    try:
        for name in names:
            rows += await _timed(name, steps[name])
    finally:
        await c.close()
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | protocol | expected | observed | ok |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r.scenario} | {r.protocol} | {r.expected} | {r.observed} | "
              f"{'yes' if r.ok else 'NO'} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--limit", type=int, default=256, help="router.max_inflight_per_tier")
    p.add_argument("--factor", type=int, default=10, help="overload: requests / limit")
    p.add_argument(
        "--refusals", type=int, default=2000, help="overload: calls kept in flight after the burst"
    )
    p.add_argument("--queue-wait-s", type=float, default=2.0, help="router.max_queue_wait_s")
    p.add_argument("--mutations", type=int, default=60, help="random mutations per protocol")
    p.add_argument("--cancels", type=int, default=100, help="streams in the cancel storm")
    p.add_argument("--streams", type=int, default=100, help="shard_kill, node_removal: streams")
    p.add_argument(
        "--sharded-tokens",
        type=int,
        default=64,
        help="shard_kill, node_removal: max_tokens of each stream",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="shard_kill, node_removal: worker raylets with expert slots (>= 2)",
    )
    p.add_argument("--shards", type=int, default=2, help="shard_kill, node_removal: shard actors")
    p.add_argument("--workdir", type=Path, default=None, help="checkpoints and logs (temp dir)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per row")
    args = p.parse_args()
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        p.error(f"--scenarios: unknown {sorted(unknown)}; choose from {SCENARIOS}")
    if args.workers < 2:
        p.error(f"--workers must be at least 2 (one is removed), got {args.workers}")
    if args.shards < 1 or args.streams < 1 or not 1 <= args.sharded_tokens <= 200:
        p.error("--shards and --streams must be >= 1, --sharded-tokens in [1, 200]")
    load = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        root = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        root.mkdir(parents=True, exist_ok=True)
        names = args.scenarios.split(",")
        rows: list[Row] = []
        plain = [n for n in names if n not in SHARDED]
        if plain:
            served = Served(root, args.limit, args.queue_wait_s)
            try:
                served.start()
                rows += asyncio.run(run(served, args, plain))
            finally:
                served.close()
        sharded = [n for n in names if n in SHARDED]
        if sharded:
            cluster = ShardedServed(root, args.workers, args.shards, args.streams + 28)
            try:
                cluster.start()
                rows += asyncio.run(run_sharded(cluster, args, sharded))
            except Exception as e:  # e.g. the cluster did not start: a row per scenario
                rows += [Row(n, "-", "-", f"scenario failed: {type(e).__name__}: {e}", False)
                         for n in sharded]  # fmt: skip
            finally:
                cluster.close()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {_cpu_model()}; "
          f"{datetime.date.today()}; load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; limit "
          f"{args.limit}, factor {args.factor}")  # fmt: skip
    print(table(rows))
    if args.json:
        for r in rows:
            print(json.dumps(r.__dict__))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
