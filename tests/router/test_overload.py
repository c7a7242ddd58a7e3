"""Overload on a live front door: refusals come at once, before any engine work, with
Retry-After; admitted requests that wait too long for a seat are refused and their engine calls
cancelled; a huge prompt is refused without stalling other streams; cancels are counted.

One served stack for the module: tier "fast" (4 seats, the router's limit of 3 in flight) and
tier "slow" (1 seat, so requests queue behind it), router.max_queue_wait_s = 1.5 s. The refusal
latency at 10x the limit is held to that of a request the router refuses before admission, measured
beside it (issue 14's absolute figure, p99 < 50 ms, is bench/chaos.py's); the other timing bounds
are generous and catch the multi-second stalls of the old path, while "before any engine work" is
proven by the engine's own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from moeray.cluster.app import LocalStack
from moeray.cluster.config import MoerayConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.cluster.state import ClusterState, EngineEndpoint
from moeray.router.engine_links import EngineClient
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers.io_struct import EngineStats

from tests.scrape import metric_sum

ENGINE = {"max_model_len": 4096, "max_tokens_limit": 4000, "num_kv_blocks": 1100}
QUEUE_WAIT_S = 1.5
LONG = pb.SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    ckpt: Path = build_demo_checkpoint(tmp_path_factory.mktemp("overload") / "m", preset="tiny")
    config = MoerayConfig(
        tiers=[
            {"name": "fast", "model": str(ckpt), "engine": {**ENGINE, "max_num_seqs": 4}},
            {"name": "slow", "model": str(ckpt), "engine": {**ENGINE, "max_num_seqs": 1}},
        ],
        router={"fast_tier": "fast", "reasoning_tier": "slow", "max_inflight_per_tier": 3,
                "max_queue_wait_s": QUEUE_WAIT_S, "max_message_bytes": 5 * 2**20},
        serve={"grpc_port": free_port(), "http_port": free_port()},
    )  # fmt: skip
    st = LocalStack(config, ray_address="local")  # never join a ray start of this machine
    try:
        yield st.start()
    finally:
        st.close()


@pytest.fixture(scope="module")
def stub(stack: LocalStack) -> Iterator[pb_grpc.InferenceStub]:
    opts = [("grpc.max_send_message_length", 8 * 2**20)]
    with grpc.insecure_channel(stack.endpoints()["grpc"], options=opts) as ch:
        yield pb_grpc.InferenceStub(ch)


def _http(stack: LocalStack, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    url = stack.endpoints()["http"].removesuffix("/v1") + path
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), json.loads(e.read())


def _endpoint(stack: LocalStack, tier: str) -> EngineEndpoint:
    """The tier's one engine replica, as it announced itself in Redis."""
    state = ClusterState(stack.config.state.redis_url or "", stack.config.state.cluster)
    try:
        (ep,) = state.engine_endpoints(tier)
    finally:
        state.close()
    return ep


def _engine_stats(stack: LocalStack, tier: str) -> Any:
    """The tier's engine replica's own EngineStats, over the internal Stats call."""
    ep = _endpoint(stack, tier)

    async def ask() -> EngineStats:
        client = EngineClient(ep.replica_id, ep.address, ep.token)
        try:
            return await client.stats(timeout_s=30)
        finally:
            await client.close()

    return asyncio.run(ask())


def _wait_idle(stack: LocalStack, tier: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        s = _engine_stats(stack, tier)
        if s.running == s.waiting == 0 and s.free_blocks == s.total_blocks:
            return
        assert time.monotonic() < deadline, f"tier {tier} still busy: {s}"
        time.sleep(0.2)


def _hold(stub: pb_grpc.InferenceStub, tier: str, n: int) -> list[Any]:
    """n long streams on `tier`, each past its first message (so it holds a seat)."""
    calls = [stub.Generate(pb.GenerateRequest(prompt="hold", tier=tier, sampling=LONG))
             for _ in range(n)]  # fmt: skip
    for c in calls:
        next(c)
    return calls


def _grpc_refusal(stub: pb_grpc.InferenceStub, tier: str) -> tuple[str, str, float]:
    start = time.perf_counter()
    req = pb.GenerateRequest(prompt="one more", tier=tier, sampling=pb.SamplingParams(max_tokens=1))
    try:
        list(stub.Generate(req, timeout=60))
        return "OK", "", time.perf_counter() - start
    except grpc.RpcError as e:
        return e.code().name, e.details() or "", time.perf_counter() - start


def test_overload_refused_before_engine_work(stack: LocalStack, stub: Any) -> None:
    held = _hold(stub, "fast", 3)
    before = _engine_stats(stack, "fast").prompt_tokens
    with ThreadPoolExecutor(16) as pool:
        grpc_results = list(pool.map(lambda _: _grpc_refusal(stub, "fast"), range(40)))
        body = {"model": "fast", "prompt": "one more", "max_tokens": 1}
        http_results = list(pool.map(lambda _: _http(stack, "/v1/completions", body), range(40)))
    assert {code for code, _, _ in grpc_results} == {"RESOURCE_EXHAUSTED"}
    assert all("limit of 3" in details for _, details, _ in grpc_results)
    assert max(t for _, _, t in grpc_results) < 5.0  # the old path: 15-23 s
    assert {status for status, _, _ in http_results} == {429}
    assert all(h.get("retry-after") == "1" for _, h, _ in http_results)
    assert _engine_stats(stack, "fast").prompt_tokens == before  # no refused prompt reached it
    assert metric_sum(stack, "moeray_requests_total", tier="fast", outcome="overloaded") >= 80
    for c in held:
        c.cancel()
    _wait_idle(stack, "fast")


OVERLOAD_CLIENTS = 27  # with the 3 held streams: 30 requests in flight against a limit of 3, 10x
REFUSALS = 37 * OVERLOAD_CLIENTS  # per trial: with 27 in flight, one stall delays 27 answers at
# once, so the trial needs ~1000 of them for its p99 not to be just its slowest round
TRIALS = 3


async def _refusal_latencies(stack: LocalStack, protocol: str, tier: str) -> list[float]:
    """Seconds from sending to the refusal, for REFUSALS requests on `tier` kept OVERLOAD_CLIENTS
    at a time (asyncio clients: no client thread waits for the GIL while its answer is already
    in). Each answer must be the refusal expected: the limit's on tier "fast", the unknown
    tier's on any other."""
    import aiohttp

    times: list[float] = []
    req = pb.GenerateRequest(prompt="one more", tier=tier, sampling=pb.SamplingParams(max_tokens=1))
    body = json.dumps({"model": tier, "prompt": "one more", "max_tokens": 1}).encode()
    url = stack.endpoints()["http"] + "/completions"
    expected = {"grpc": "RESOURCE_EXHAUSTED", "http": "429"} if tier == "fast" else {
        "grpc": "INVALID_ARGUMENT", "http": "400"}  # fmt: skip
    async with (
        grpc.aio.insecure_channel(stack.endpoints()["grpc"]) as ch,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=OVERLOAD_CLIENTS)) as http,
    ):
        stub = pb_grpc.InferenceStub(ch)

        async def one() -> tuple[str, float]:
            start = time.perf_counter()
            if protocol == "grpc":
                try:
                    async for _ in stub.Generate(req, timeout=30):
                        pass
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
            else:
                async with http.post(url, data=body, headers={"content-type": "application/json"},
                                     timeout=aiohttp.ClientTimeout(total=30)) as r:  # fmt: skip
                    await r.read()
                    code = str(r.status)
            return code, time.perf_counter() - start

        async def client(n: int) -> None:
            for _ in range(n):
                code, took = await one()
                assert code == expected[protocol], code
                times.append(took)

        await asyncio.gather(*(client(1) for _ in range(OVERLOAD_CLIENTS)))  # connections up
        times.clear()
        await asyncio.gather(
            *(client(REFUSALS // OVERLOAD_CLIENTS) for _ in range(OVERLOAD_CLIENTS))
        )
    return sorted(times)


def _measured(stack: LocalStack, protocol: str, tier: str) -> tuple[float, float]:
    """(p50, p99) of one trial's refusals, in seconds."""
    gc.disable()  # the measuring client's own collections are no latency of the server
    try:
        times = asyncio.run(_refusal_latencies(stack, protocol, tier))
    finally:
        gc.enable()
    assert len(times) == REFUSALS
    return times[len(times) // 2], times[int(len(times) * 0.99)]


def test_ten_times_overload_is_refused_as_fast_as_a_bad_request(
    stack: LocalStack, stub: Any
) -> None:
    """At 10x the tier's limit (27 more calls kept in flight beside the 3 streams holding its
    seats), every call is refused, none waits for a seat, and a refusal costs what the cheapest
    answer the router gives costs: a request naming an unknown tier, refused before admission,
    sent the same way in the same trial (the control).

    Issue 14's figure, p99 under 50 ms, is the bench's (`bench/chaos.py --scenarios overload
    --limit 3`, docs/RELIABILITY.md), not this test's: on a 2-core machine that other work
    shares, the absolute latency of ~1000 answers moves with that work (p50 15-21 ms idle, 27-32
    ms in one CI run), while the ratio to the control, measured beside it, does not. A refusal
    that waited for a seat would take max_queue_wait_s (1.5 s); one that did engine work, or
    any work per refusal beyond the control's, shows in the ratio: the refusals' p50 must be
    within twice the control's (1.1-1.65x measured, idle and under a CPU hog), and 1 ms more of
    router work per call adds ~27 ms to it at this concurrency."""
    held = _hold(stub, "fast", 3)
    try:
        for protocol in ("grpc", "http"):
            seen = []
            for _ in range(TRIALS):
                control = _measured(stack, protocol, "no-such-tier")
                refused = _measured(stack, protocol, "fast")
                seen.append(f"refusals p50 {refused[0] * 1e3:.1f} ms, p99 {refused[1] * 1e3:.1f} "
                            f"ms; control p50 {control[0] * 1e3:.1f} ms, p99 "
                            f"{control[1] * 1e3:.1f} ms")  # fmt: skip
                assert refused[1] < QUEUE_WAIT_S / 3, seen  # none waited for a seat
                if refused[0] <= 2 * control[0]:
                    break
            else:
                raise AssertionError(f"{protocol}: refusals slower than the control: {seen}")
    finally:
        for c in held:
            c.cancel()
    _wait_idle(stack, "fast")


def test_a_burst_beyond_grpc_cores_pending_queue_gets_moerays_answers(stack: LocalStack) -> None:
    """2000 calls at once (grpc-core's default pending queue holds 1000 and drops a random share
    of the rest with a bare CANCELLED): every call gets an answer from moeray, a token or
    RESOURCE_EXHAUSTED with its reason, and every refusal is counted."""
    before = metric_sum(stack, "moeray_requests_total", outcome="overloaded", protocol="grpc")
    req = pb.GenerateRequest(prompt="burst", tier="fast", sampling=pb.SamplingParams(max_tokens=1))

    async def burst() -> list[tuple[str, str]]:
        async with grpc.aio.insecure_channel(stack.endpoints()["grpc"]) as ch:
            stub = pb_grpc.InferenceStub(ch)

            async def one() -> tuple[str, str]:
                try:
                    async for _ in stub.Generate(req, timeout=120):
                        pass
                    return "OK", ""
                except grpc.aio.AioRpcError as e:
                    return e.code().name, e.details() or ""

            return await asyncio.gather(*(one() for _ in range(2000)))

    results = asyncio.run(burst())
    codes = {code for code, _ in results}
    assert codes <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    refused = [d for code, d in results if code == "RESOURCE_EXHAUSTED"]
    assert refused and all("limit of 3" in d for d in refused)
    counted = metric_sum(stack, "moeray_requests_total", outcome="overloaded", protocol="grpc")
    assert counted - before == len(refused)
    _wait_idle(stack, "fast")


def test_queue_wait_refuses_and_cancels_the_engine_call(stack: LocalStack, stub: Any) -> None:
    (held,) = _hold(stub, "slow", 1)  # the tier's one seat
    with ThreadPoolExecutor(2) as pool:
        g = pool.submit(_grpc_refusal, stub, "slow")
        h = pool.submit(_http, stack, "/v1/completions",
                        {"model": "slow", "prompt": "waiting", "max_tokens": 1})  # fmt: skip
        code, details, elapsed = g.result()
        status, headers, err = h.result()
    assert code == "RESOURCE_EXHAUSTED" and "max_queue_wait_s" in details
    assert QUEUE_WAIT_S * 0.9 <= elapsed < QUEUE_WAIT_S + 10
    assert status == 429 and headers.get("retry-after") == "1"
    assert "max_queue_wait_s" in err["error"]["message"]
    # Both engine calls were cancelled: the aborts reach the engine between its steps.
    deadline = time.monotonic() + 10
    while _engine_stats(stack, "slow").waiting != 0:
        assert time.monotonic() < deadline, "the refused requests still wait in the engine"
        time.sleep(0.05)
    held.cancel()
    _wait_idle(stack, "slow")


def test_huge_prompt_refused_without_stalling_a_stream(stack: LocalStack, stub: Any) -> None:
    arrivals: list[float] = []
    call = stub.Generate(pb.GenerateRequest(prompt="go", tier="fast", sampling=LONG))

    def read() -> None:
        with contextlib.suppress(grpc.RpcError):  # cancelled at the end
            for _ in call:
                arrivals.append(time.perf_counter())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(arrivals) < 30:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    text = "lorem ipsum " * (int(3.9 * 2**20) // 12)  # 3.9 MiB
    sent = time.perf_counter()
    code, details, elapsed = "", "", 0.0
    try:
        list(stub.Generate(pb.GenerateRequest(prompt=text, tier="fast"), timeout=60))
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    elapsed = time.perf_counter() - sent
    time.sleep(0.3)
    call.cancel()
    reader.join(30)
    # Refused by the router from the message's wire header, with the limit the engine replicas
    # announced (the engine's own refusal names the context in tokens instead).
    limit = _endpoint(stack, "fast").max_prompt_bytes
    assert limit == _endpoint(stack, "slow").max_prompt_bytes > 0
    assert (code, details) == ("INVALID_ARGUMENT", f"prompt is over {limit} bytes of UTF-8; "
                                                   "no text that long fits the context of any tier")  # fmt: skip
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    step = sorted(gaps[:29])[14]
    during = [b - a for a, b in itertools.pairwise(arrivals)
              if b >= sent and a <= sent + elapsed]  # fmt: skip
    # Tokenizing 3.9 MiB stalled every stream 4.6 s; now only the bytes' transfer is left.
    assert max(during, default=0.0) <= 2 * step + 0.5, (step, during)
    assert elapsed < 3.0
    _wait_idle(stack, "fast")


def test_prompts_too_long_for_the_tier_are_refused_by_the_router(
    stack: LocalStack, stub: Any
) -> None:
    limit = _endpoint(stack, "fast").max_prompt_bytes
    invalid = metric_sum(stack, "moeray_requests_total", outcome="invalid")
    text = "é" * (limit // 2) + "!"  # one byte over, in fewer characters than the limit
    expected = f"is over {limit} bytes of UTF-8; no text that long fits the context of tier 'fast'"
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(prompt=text, tier="fast"), timeout=30))
    assert (e.value.code(), e.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "prompt " + expected)  # fmt: skip
    status, _, body = _http(stack, "/v1/completions", {"model": "fast", "prompt": text})
    assert (status, body["error"]["param"]) == (400, "prompt")
    assert body["error"]["message"] == "prompt " + expected
    chat = [{"role": "user", "content": "x" * (limit + 1)}]
    status, _, body = _http(stack, "/v1/chat/completions", {"model": "fast", "messages": chat})
    assert (status, body["error"]["param"]) == (400, "messages")
    assert body["error"]["message"].startswith(f"messages hold over {limit} characters")
    # A body longer than any request holding a prompt any tier takes is refused unparsed.
    big = "x" * (12 * limit + 2**20)
    status, _, body = _http(stack, "/v1/completions", {"model": "fast", "prompt": big})
    assert (status, body["error"]["param"]) == (400, "body")
    assert metric_sum(stack, "moeray_requests_total", outcome="invalid") - invalid == 4


def test_grpc_calls_cancelled_before_their_message_are_counted(stack: LocalStack) -> None:
    """A call whose client leaves before its request message arrives is counted as cancelled
    (tier ""); one that half-closes without a message is refused naming `request`. Raw
    request-streaming calls on Generate's path: the wire of a unary-stream call whose message
    has not been sent yet."""
    labels = {"tier": "", "protocol": "grpc", "outcome": "cancelled"}
    before = metric_sum(stack, "moeray_requests_total", **labels)
    path = "/moeray.v1.Inference/Generate"

    async def calls() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(stack.endpoints()["grpc"]) as ch:
            open_call = ch.stream_stream(path)
            for _ in range(2):
                call = open_call(timeout=30)
                await call.wait_for_connection()  # its headers are sent, no message
                await asyncio.sleep(0.2)  # the server has started the call
                call.cancel()
            call = open_call(timeout=30)
            await call.done_writing()  # half-closed without a message
            try:
                await call.read()
            except grpc.aio.AioRpcError as e:
                return e.code().name, e.details() or ""
            return "OK", ""

    assert asyncio.run(calls()) == (
        "INVALID_ARGUMENT",
        "request is missing: Generate takes one GenerateRequest",
    )
    deadline = time.monotonic() + 20
    while metric_sum(stack, "moeray_requests_total", **labels) - before < 2:
        assert time.monotonic() < deadline, "calls cancelled before their message not counted"
        time.sleep(0.05)
    assert metric_sum(stack, "moeray_requests_total", **labels) - before == 2


def test_client_cancels_are_counted(stack: LocalStack, stub: Any) -> None:
    before = metric_sum(stack, "moeray_requests_total", outcome="cancelled")
    for c in _hold(stub, "fast", 3):
        c.cancel()
    deadline = time.monotonic() + 20  # their seats are free again (the router's limit is 3)
    while metric_sum(stack, "moeray_requests_total", outcome="cancelled") - before < 3:
        assert time.monotonic() < deadline, "gRPC cancels not counted"
        time.sleep(0.05)
    url = stack.endpoints()["http"].removesuffix("/v1") + "/v1/completions"
    for _ in range(2):
        body = json.dumps({"model": "fast", "prompt": "x", "max_tokens": 4000, "stream": True,
                           "ignore_eos": True}).encode()  # fmt: skip
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.readline()  # the first event, then the connection closes
    deadline = time.monotonic() + 20
    while metric_sum(stack, "moeray_requests_total", outcome="cancelled") - before < 5:
        assert time.monotonic() < deadline, "cancels not counted"
        time.sleep(0.2)
    _wait_idle(stack, "fast")
    # a client that leaves while sending its body: cancelled before routing (tier "")
    labels = {"tier": "", "protocol": "http", "outcome": "cancelled"}
    early = metric_sum(stack, "moeray_requests_total", **labels)
    for _ in range(2):
        address = ("127.0.0.1", stack.config.serve.http_port)
        with socket.create_connection(address, timeout=10) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         b"application/json\r\ncontent-length: 200\r\n\r\n{\"model\": ")  # fmt: skip
            time.sleep(0.2)  # the handler is reading the body
    deadline = time.monotonic() + 20
    while metric_sum(stack, "moeray_requests_total", **labels) - early < 2:
        assert time.monotonic() < deadline, "clients that left mid-body not counted"
        time.sleep(0.2)
