"""Faults on a live front door: an engine replica that is unreachable before a request started is
skipped (the request runs on another); one killed mid-stream ends its streams with UNAVAILABLE
and a sentence saying so, health turns NOT_SERVING / 503 within about a second, new requests get
UNAVAILABLE (never INTERNAL), and the tier serves again once Serve has restarted the replica.

One served stack for the module (one tiny demo tier, a private redis-server, free ports). The
engine replica is killed with SIGKILL, found through Ray's public state API.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moeray.cluster.app import LocalStack
from moeray.cluster.config import MoerayConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.cluster.state import ClusterState
from moeray.cluster.state_messages import EngineEndpoint
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc

ENGINE = {"max_model_len": 2048, "max_tokens_limit": 2000, "num_kv_blocks": 300}
LONG = pb.SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True)
SHORT = pb.SamplingParams(max_tokens=2, temperature=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    ckpt: Path = build_demo_checkpoint(tmp_path_factory.mktemp("faults") / "m", preset="tiny")
    config = MoerayConfig(
        tiers=[{"name": "fast", "model": str(ckpt), "engine": ENGINE}],
        router={"fast_tier": "fast", "reasoning_tier": "fast"},
        serve={"grpc_port": free_port(), "http_port": free_port()},
    )
    st = LocalStack(config, ray_address="local")  # never join a ray start of this machine
    try:
        yield st.start()
    finally:
        st.close()


@pytest.fixture(scope="module")
def channel(stack: LocalStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.endpoints()["grpc"]) as ch:
        yield ch


def _short(stub: pb_grpc.InferenceStub) -> str:
    try:
        list(
            stub.Generate(pb.GenerateRequest(prompt="hi", tier="fast", sampling=SHORT), timeout=60)
        )
        return "OK"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


def _replica_pids(title: str) -> list[int]:
    """Pids of this test's processes (descendants: the Ray it started) whose title has `title`
    (Ray titles a replica's process "ray::ServeReplica:<app>:<deployment>")."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        children.setdefault(int(text[text.rfind(")") + 2 :].split()[1]), []).append(
            int(stat.parent.name)
        )
    found, todo = [], [os.getpid()]
    while todo:
        for pid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if title in cmdline:
                found.append(pid)
    return found


def _http_health(stack: LocalStack) -> tuple[int, str | None]:
    """(status, Retry-After) of GET /health."""
    url = stack.endpoints()["http"].removesuffix("/v1") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, None
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("retry-after")


def test_unreachable_replica_is_skipped_before_the_request_starts(
    stack: LocalStack, channel: grpc.Channel
) -> None:
    state = ClusterState(stack.config.state.redis_url or "", stack.config.state.cluster)
    dead = EngineEndpoint("fast", "dead-replica", f"127.0.0.1:{free_port()}", "token")
    try:
        state.register_engine(dead, ttl_s=60)
        time.sleep(2.5)  # the router reads endpoints every second
        stub = pb_grpc.InferenceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # picked before any call failed
            results = list(pool.map(lambda _: _short(stub), range(6)))
        assert results == ["OK"] * 6
    finally:
        state.remove_engine("fast", "dead-replica")
        state.close()


def test_engine_killed_mid_stream_then_the_tier_recovers(
    stack: LocalStack, channel: grpc.Channel
) -> None:
    stub = pb_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    assert _short(stub) == "OK"
    calls = [stub.Generate(pb.GenerateRequest(prompt="go", tier="fast", sampling=LONG))
             for _ in range(4)]  # fmt: skip
    for c in calls:
        next(c)
    (pid,) = _replica_pids("ServeReplica:moeray:engine-fast")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for c in calls:
        with pytest.raises(grpc.RpcError) as info:
            list(c)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "was lost" in (info.value.details() or "")
    while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status != (
        health_pb2.HealthCheckResponse.NOT_SERVING
    ):
        assert time.monotonic() - killed < 5.0, "health still SERVING"
        time.sleep(0.05)
    assert _http_health(stack)[0] == 503
    fresh = _short(stub)
    assert fresh == "OK" or fresh.startswith("UNAVAILABLE"), fresh  # never INTERNAL
    deadline = time.monotonic() + 180
    while _short(stub) != "OK":  # Serve restarts the replica; it registers anew
        assert time.monotonic() < deadline, "the tier did not recover"
        time.sleep(0.5)
    assert _http_health(stack)[0] == 200
