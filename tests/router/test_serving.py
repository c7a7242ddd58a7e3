"""The front door end to end: the moeray Serve app on a local Ray instance, over a real gRPC
channel and with the official `openai` client.

The app starts once (two tiny Mixtral-style demo checkpoints in HF format, free ports, a private
redis-server) and is shut down at the end whatever happens. The router replica serves both ports
and reaches the engines over the one internal transport (ZeroMQ). Oracle for the text: the offline
`LLM` on the same checkpoint, greedy. Every refusal is checked for its status code and for the
field it names.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from moeray.cluster.app import LocalStack
from moeray.cluster.config import MoerayConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.router.client import AsyncMoerayClient, MoerayClient
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers import LLM, FinishReason, SamplingParams

from tests.scrape import samples

FAST = {"max_model_len": 256, "max_tokens_limit": 32, "num_kv_blocks": 32, "block_size": 16}
REASONING = {"max_model_len": 4096, "max_tokens_limit": 4000, "num_kv_blocks": 300}
LONG = pb.SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    return {
        "fast": build_demo_checkpoint(root / "fast-ckpt", preset="tiny", seed=0),
        "reasoning": build_demo_checkpoint(root / "reasoning-ckpt", preset="tiny", seed=1),
    }


@pytest.fixture(scope="module")
def stack(checkpoints: dict[str, Path]) -> Iterator[LocalStack]:
    config = MoerayConfig(
        tiers=[
            {
                "name": "fast",
                "model": str(checkpoints["fast"]),
                "engine": FAST,
                "tool_call_parser": "hermes",
            },
            {
                "name": "reasoning",
                "model": str(checkpoints["reasoning"]),
                "engine": REASONING,
                "reasoning_parser": "deepseek_r1",
            },
        ],
        router={"max_inflight_per_tier": 2, "max_message_bytes": 4096},
        serve={"grpc_port": free_port(), "http_port": free_port()},
    )
    st = LocalStack(config, num_cpus=2)
    try:
        yield st.start()
    finally:
        st.close()


@pytest.fixture(scope="module")
def channel(stack: LocalStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.endpoints()["grpc"]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.InferenceStub:
    return pb_grpc.InferenceStub(channel)


@pytest.fixture(scope="module")
def client(stack: LocalStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.endpoints()["http"], api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def fast_llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(checkpoints["fast"]), **FAST)


@pytest.fixture(scope="module")
def reasoning_llm(checkpoints: dict[str, Path]) -> LLM:
    return LLM(str(checkpoints["reasoning"]), **REASONING)


def _greedy(llm: LLM, prompt: Any, max_tokens: int) -> Any:
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0))[0]


def _chat_ids(llm: LLM, messages: list[dict[str, str]]) -> list[int]:
    tok = llm.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


def _http(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request with the standard library: (status, headers, body)."""
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers.items()), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()), e.read()


def _engine_gauges(stack: LocalStack, tier: str) -> dict[str, float]:
    return {
        s.labels["field"]: s.value
        for s in samples(stack)
        if s.name == "moeray_engine" and s.labels["tier"] == tier
    }


def _wait_kv_freed(stack: LocalStack, tier: str, timeout_s: float = 60.0) -> dict[str, float]:
    """Polls the engine gauges until no request runs, waits or holds a KV block."""
    deadline = time.monotonic() + timeout_s
    while True:
        g = _engine_gauges(stack, tier)
        if g["running"] == 0 and g["waiting"] == 0 and g["kv_blocks_free"] == g["kv_blocks_total"]:
            return g
        assert time.monotonic() < deadline, f"KV blocks of tier {tier} not freed: {g}"
        time.sleep(0.2)


# ---- generation ----------------------------------------------------------------------------


def test_grpc_stream_equals_offline_llm(
    stack: LocalStack, stub: pb_grpc.InferenceStub, fast_llm: LLM
) -> None:
    req = pb.GenerateRequest(
        prompt="The capital of France", tier="fast",
        sampling=pb.SamplingParams(max_tokens=12, temperature=0),
    )  # fmt: skip
    start = time.perf_counter()
    call = stub.Generate(req, timeout=60)
    msgs = list(call)
    elapsed_ms = (time.perf_counter() - start) * 1e3
    engine_ms = float(dict(call.trailing_metadata())["moeray-engine-time-ms"])
    assert 0 < engine_ms < elapsed_ms  # the engine's own time, for per-request overhead
    oracle = _greedy(fast_llm, "The capital of France", 12)
    assert "".join(m.text for m in msgs) == oracle.text
    assert [t for m in msgs for t in m.token_ids] == oracle.token_ids
    assert msgs[0].HasField("route") and msgs[0].route.tier == "fast"
    assert not any(m.HasField("route") for m in msgs[1:])
    assert msgs[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert msgs[-1].usage.completion_tokens == len(oracle.token_ids)
    assert all(m.tier == "fast" and m.request_id == msgs[0].request_id for m in msgs)

    async def with_asyncio() -> Any:  # the asyncio client, on the same front door
        async with AsyncMoerayClient(stack.endpoints()["grpc"], timeout=60) as c:
            return await c.generate_text("The capital of France", tier="fast", max_tokens=12,
                                         temperature=0)  # fmt: skip

    res = asyncio.run(with_asyncio())
    assert (res.text, res.token_ids, res.tier) == (oracle.text, oracle.token_ids, "fast")


def test_grpc_auto_routing_and_route_dry_run(stub: pb_grpc.InferenceStub) -> None:
    hard = "Prove step by step that the square root of 2 is irrational, rigorously."
    dry = stub.Route(pb.RouteRequest(prompt=hard), timeout=30)
    assert dry.route.tier == "reasoning" and dry.route.score >= 0.5 and dry.features
    msgs = list(stub.Generate(pb.GenerateRequest(prompt=hard, sampling=pb.SamplingParams(
        max_tokens=3, temperature=0)), timeout=60))  # fmt: skip
    assert msgs[0].route.tier == "reasoning" and msgs[0].tier == "reasoning"
    easy = stub.Route(pb.RouteRequest(prompt="hi, translate 'cat' to French"), timeout=30)
    assert easy.route.tier == "fast"


def test_list_tiers_and_cluster_status(stub: pb_grpc.InferenceStub) -> None:
    tiers = stub.ListTiers(pb.ListTiersRequest(), timeout=30)
    assert [t.name for t in tiers.tiers] == ["fast", "reasoning"]
    assert tiers.fast_tier == "fast" and tiers.tiers[0].max_tokens_limit == 32
    status = stub.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=30)
    assert [t.name for t in status.tiers] == ["fast", "reasoning"]
    assert all(t.replicas and t.replicas[0].kind == "engine" for t in status.tiers)
    assert status.tiers[0].max_inflight == 2


def test_openai_completion_and_chat_equal_offline(client: openai.OpenAI, fast_llm: LLM) -> None:
    done = client.completions.create(
        model="fast", prompt="Once upon a time", max_tokens=10, temperature=0
    )
    assert done.choices[0].text == _greedy(fast_llm, "Once upon a time", 10).text
    assert done.model == "fast" and done.usage is not None and done.usage.completion_tokens > 0
    messages = [{"role": "user", "content": "What is a mixture of experts?"}]
    oracle = _greedy(fast_llm, _chat_ids(fast_llm, messages), 10)
    chunks = list(client.chat.completions.create(
        model="fast-ckpt", messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle.text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(oracle.token_ids)
    unary = client.chat.completions.create(
        model="fast",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
    )
    assert unary.choices[0].message.content == oracle.text


def test_openai_n_choices(stack: LocalStack, client: openai.OpenAI, fast_llm: LLM) -> None:
    """n > 1: one engine request per choice on one tier; greedy choices equal the offline
    engine's, seeded ones are reproducible, usage counts the prompt once."""
    oracle = _greedy(fast_llm, "Once upon a time", 6)
    done = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=6,
                                     temperature=0, n=2)  # fmt: skip
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.text for c in done.choices] == [oracle.text, oracle.text]
    assert done.usage is not None and done.usage.completion_tokens == 2 * len(oracle.token_ids)
    assert done.usage.prompt_tokens == len(oracle.prompt_token_ids)
    seeded = [client.completions.create(model="auto", prompt="Once upon a time", max_tokens=8,
                                        temperature=1.0, seed=7, n=2) for _ in range(2)]  # fmt: skip
    assert [c.text for c in seeded[0].choices] == [c.text for c in seeded[1].choices]
    assert seeded[0].choices[0].text != seeded[0].choices[1].text  # seeds 7 and 8
    messages = [{"role": "user", "content": "What is a mixture of experts?"}]
    chat_oracle = _greedy(fast_llm, _chat_ids(fast_llm, messages), 5)
    chunks = list(client.chat.completions.create(
        model="fast", messages=messages, max_tokens=5, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks
                     if c.choices and c.choices[0].index == i) for i in (0, 1)]  # fmt: skip
    assert texts == [chat_oracle.text, chat_oracle.text]
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 2 * len(chat_oracle.token_ids)
    # A client that leaves mid-stream ends every choice: both seats are free again at once.
    stream = client.completions.create(model="reasoning", prompt="go", max_tokens=3000,
                                       temperature=0, n=2, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    seen = {next(iter(stream)).choices[0].index for _ in range(6)}
    stream.close()
    deadline = time.monotonic() + 3  # well before 3000 tokens would have ended them
    while True:  # the router's limit is 2 in flight per tier
        try:
            again = client.completions.create(model="reasoning", prompt="go", max_tokens=2, n=2)
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "the choices of the closed stream kept their seats"
            time.sleep(0.05)
    assert seen <= {0, 1} and len(again.choices) == 2
    with pytest.raises(openai.BadRequestError) as info:  # each choice takes one of the 2 seats
        client.completions.create(model="fast", prompt="x", max_tokens=2, n=3)
    assert info.value.body["param"] == "n"  # type: ignore[index]
    assert "must be in [1, 2]" in info.value.body["message"]  # type: ignore[index]


def test_logprobs_equal_offline(
    stack: LocalStack, client: openai.OpenAI, stub: pb_grpc.InferenceStub, fast_llm: LLM
) -> None:
    """Completions' logprobs=k and chat's logprobs/top_logprobs carry the engine's own values
    (tests/workers/test_engine.py holds those to transformers), streamed or not."""
    want = fast_llm.generate("Once upon a time",
                             SamplingParams(max_tokens=6, temperature=0, logprobs=2))[0]  # fmt: skip
    assert want.logprobs is not None
    done = client.completions.create(model="fast", prompt="Once upon a time", max_tokens=6,
                                     temperature=0, logprobs=2)  # fmt: skip
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens == [e.text for e in want.logprobs]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in want.logprobs], abs=1e-6)
    assert lp.top_logprobs == [pytest.approx({t.text: t.logprob for t in e.top}, abs=1e-6)
                               for e in want.logprobs]  # fmt: skip
    assert lp.text_offset is not None and lp.text_offset[0] == 0
    messages = [{"role": "user", "content": "What is a mixture of experts?"}]
    chat_want = fast_llm.generate(_chat_ids(fast_llm, messages),
                                  SamplingParams(max_tokens=4, temperature=0, logprobs=3))[0]  # fmt: skip
    assert chat_want.logprobs is not None
    chunks = list(client.chat.completions.create(
        model="fast", messages=messages, max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=3, stream=True,
    ))  # fmt: skip
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content or []]  # fmt: skip
    assert [c.token for c in streamed] == [e.text for e in chat_want.logprobs]
    assert [c.logprob for c in streamed] == pytest.approx([e.logprob for e in chat_want.logprobs])
    assert [[t.token for t in c.top_logprobs] for c in streamed] == [
        [t.text for t in e.top] for e in chat_want.logprobs]  # fmt: skip
    # gRPC: the same values on the stream's messages (float32 on the wire).
    sampling = pb.SamplingParams(max_tokens=6, temperature=0, logprobs=2)
    got = [e for r in stub.Generate(pb.GenerateRequest(prompt="Once upon a time", tier="fast",
                                                       sampling=sampling)) for e in r.logprobs]  # fmt: skip
    assert [e.token_id for e in got] == [e.token_id for e in want.logprobs]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-5)
    assert [[t.text for t in e.top] for e in got] == [[t.text for t in e.top]
                                                     for e in want.logprobs]  # fmt: skip
    with MoerayClient(stack.endpoints()["grpc"]) as mc:  # the Python client carries them too
        res = mc.generate_text("Once upon a time", tier="fast", max_tokens=6, temperature=0,
                               logprobs=2)  # fmt: skip
    assert [e.token_id for e in res.logprobs] == [e.token_id for e in want.logprobs]
    assert [len(e.top) for e in res.logprobs] == [2] * len(want.logprobs)
    with pytest.raises(grpc.RpcError) as rpc:
        list(stub.Generate(pb.GenerateRequest(prompt="x", tier="fast",
                                              sampling=pb.SamplingParams(logprobs=21))))  # fmt: skip
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (rpc.value.details() or "").startswith("sampling.logprobs must be")
    plain = client.chat.completions.create(model="fast", messages=messages, max_tokens=4,
                                           temperature=0)  # fmt: skip
    assert plain.choices[0].logprobs is None
    for bad, field in (({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fast", prompt="x", max_tokens=2, extra_body=bad)
        assert info.value.body["param"] == field  # type: ignore[index]
    for bad, field in (({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                       ({"top_logprobs": 2}, "top_logprobs")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="fast", messages=messages, max_tokens=2,
                                           extra_body=bad)  # fmt: skip
        assert info.value.body["param"] == field  # type: ignore[index]


def test_penalties_equal_offline(
    client: openai.OpenAI, stub: pb_grpc.InferenceStub, fast_llm: LLM
) -> None:
    """presence / frequency / repetition penalties reach the engine over both protocols
    (tests/workers/test_engine.py holds the engine to transformers)."""
    kw = {"presence_penalty": 1.5, "frequency_penalty": 2.0, "repetition_penalty": 4.0}
    prompt = "the the the the the"
    want = fast_llm.generate(prompt,
                             SamplingParams(max_tokens=24, temperature=0, **kw))[0]  # fmt: skip
    plain = _greedy(fast_llm, prompt, 24)
    assert want.token_ids != plain.token_ids  # the penalties matter here
    done = client.completions.create(
        model="fast", prompt=prompt, max_tokens=24, temperature=0,
        presence_penalty=1.5, frequency_penalty=2.0, extra_body={"repetition_penalty": 4.0},
    )  # fmt: skip
    assert done.choices[0].text == want.text
    sampling = pb.SamplingParams(max_tokens=24, temperature=0, **kw)
    got = [t for r in stub.Generate(pb.GenerateRequest(prompt=prompt, tier="fast",
                                                       sampling=sampling)) for t in r.token_ids]  # fmt: skip
    assert got == want.token_ids
    # logit_bias: +100 makes one token every greedy choice, over both protocols.
    forced = client.completions.create(model="fast", prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={"77": 100})  # fmt: skip
    assert forced.choices[0].text == fast_llm.tokenizer.decode([77] * 4)
    sampling = pb.SamplingParams(max_tokens=4, temperature=0, logit_bias={77: 100.0})
    got = [t for r in stub.Generate(pb.GenerateRequest(prompt=prompt, tier="fast",
                                                       sampling=sampling)) for t in r.token_ids]  # fmt: skip
    assert got == [77] * 4
    for bad in ({"presence_penalty": 2.5}, {"logit_bias": {"x": 1}}, {"logit_bias": {"7": 101}},
                {"logit_bias": {str(10**7): 1}}):  # the last one refused by the engine  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fast", prompt="x", max_tokens=2, extra_body=bad)
        assert info.value.body["param"] == next(iter(bad))  # type: ignore[index]


def test_min_tokens_equal_offline(
    client: openai.OpenAI, stub: pb_grpc.InferenceStub, fast_llm: LLM
) -> None:
    """min_tokens reaches the engine over both protocols (tests/workers/test_engine.py holds
    the engine to transformers): a stop string that would end the text at once does not
    within the first min_tokens tokens."""
    prompt = "the the the the the"
    plain = _greedy(fast_llm, prompt, 8)
    stop = fast_llm.tokenizer.decode(plain.token_ids[:1])
    assert stop and plain.text.startswith(stop)
    want = fast_llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0, stop=[stop],
                                                    min_tokens=4))[0]  # fmt: skip
    assert len(want.token_ids) >= 4 and want.token_ids[:4] == plain.token_ids[:4]
    done = client.completions.create(model="fast", prompt=prompt, max_tokens=8, temperature=0,
                                     stop=[stop], extra_body={"min_tokens": 4})  # fmt: skip
    assert done.choices[0].text == want.text and done.usage.completion_tokens == len(want.token_ids)
    sampling = pb.SamplingParams(max_tokens=8, temperature=0, stop=[stop], min_tokens=4)
    got = [t for r in stub.Generate(pb.GenerateRequest(prompt=prompt, tier="fast",
                                                       sampling=sampling)) for t in r.token_ids]  # fmt: skip
    assert got == want.token_ids
    # stop_token_ids (vLLM's extension over HTTP; a gRPC field) with min_tokens
    held = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=plain.token_ids[:1],
                          min_tokens=2)  # fmt: skip
    want = fast_llm.generate(prompt, held)[0]
    assert len(want.token_ids) >= 2 and want.token_ids[0] != plain.token_ids[0]
    done = client.completions.create(model="fast", prompt=prompt, max_tokens=8, temperature=0,
                                     extra_body={"min_tokens": 2,
                                                 "stop_token_ids": plain.token_ids[:1]})  # fmt: skip
    assert done.choices[0].text == want.text
    assert done.usage.completion_tokens == len(want.token_ids)
    for bad, field in (({"stop_token_ids": [-1]}, "stop_token_ids"),
                       ({"stop_token_ids": [1, "a"]}, "stop_token_ids[1]"),
                       ({"min_tokens": 2.5}, "min_tokens")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fast", prompt="x", max_tokens=2, extra_body=bad)
        assert info.value.body["param"] == field  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fast", prompt="x", max_tokens=2,
                                  extra_body={"min_tokens": 3})  # fmt: skip
    assert info.value.body["param"] == "min_tokens"  # type: ignore[index]
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="x", tier="fast", sampling=pb.SamplingParams(
            max_tokens=2, min_tokens=-1))))  # fmt: skip
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.min_tokens ")


def test_completions_echo_and_prompt_logprobs_equal_offline(
    stack: LocalStack, client: openai.OpenAI, stub: pb_grpc.InferenceStub, fast_llm: LLM
) -> None:
    """echo: the prompt before the completion and its tokens' logprobs before theirs (the
    first null), as the offline engine's prompt_logprobs; with max_tokens 0 the prompt alone
    (lm-eval's loglikelihood request); streamed, and for a prompt of token ids. gRPC's
    sampling.prompt_logprobs: the same values on the first message."""
    prompt = "the quick brown fox"
    want = fast_llm.generate(prompt, SamplingParams(max_tokens=4, temperature=0, logprobs=2,
                                                    prompt_logprobs=2))[0]  # fmt: skip
    assert want.prompt_logprobs is not None and want.logprobs is not None
    P = len(want.prompt_token_ids)
    scored = want.prompt_logprobs[1:]
    done = client.completions.create(model="fast", prompt=prompt, max_tokens=4, temperature=0,
                                     echo=True, logprobs=2)  # fmt: skip
    c = done.choices[0]
    assert c.text == prompt + want.text and c.logprobs is not None
    lp = c.logprobs
    first = fast_llm.tokenizer.decode(want.prompt_token_ids[:1])
    assert lp.tokens == [first] + [e.text for e in scored] + [e.text for e in want.logprobs]
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(
        [e.logprob for e in scored] + [e.logprob for e in want.logprobs], abs=1e-5
    )
    assert lp.top_logprobs[1] == pytest.approx({t.text: t.logprob for t in scored[0].top}, abs=1e-5)
    assert lp.text_offset is not None and lp.text_offset[P] == len(prompt)
    assert done.usage is not None and done.usage.completion_tokens == len(want.token_ids)
    # max_tokens 0: the prompt alone, scored
    only = client.completions.create(model="fast", prompt=prompt, max_tokens=0, echo=True,
                                     logprobs=0)  # fmt: skip
    c = only.choices[0]
    assert (c.text, c.finish_reason) == (prompt, "length") and c.logprobs is not None
    got = c.logprobs.token_logprobs
    assert got is not None and len(got) == P and got[0] is None
    assert got[1:] == pytest.approx([e.logprob for e in scored], abs=1e-5)
    assert only.usage is not None
    assert (only.usage.prompt_tokens, only.usage.completion_tokens) == (P, 0)
    # token ids in, streamed: the decoded prompt on the first chunk
    chunks = list(client.completions.create(model="fast", prompt=want.prompt_token_ids,
                                            max_tokens=4, temperature=0, echo=True,
                                            stream=True))  # fmt: skip
    decoded = fast_llm.tokenizer.decode(want.prompt_token_ids)
    assert chunks[0].choices[0].text.startswith(decoded)
    assert "".join(ch.choices[0].text for ch in chunks) == decoded + want.text
    sampling = pb.SamplingParams(max_tokens=4, temperature=0, prompt_logprobs=2)
    msgs = list(stub.Generate(pb.GenerateRequest(prompt=prompt, tier="fast", sampling=sampling)))
    assert [e.token_id for e in msgs[0].prompt_logprobs] == [e.token_id for e in scored]
    assert [e.logprob for e in msgs[0].prompt_logprobs] == pytest.approx(
        [e.logprob for e in scored], abs=1e-5)  # fmt: skip
    assert [[t.token_id for t in e.top] for e in msgs[0].prompt_logprobs] == [
        [t.token_id for t in e.top] for e in scored]  # fmt: skip
    assert not any(m.prompt_logprobs for m in msgs[1:])
    with MoerayClient(stack.endpoints()["grpc"]) as mc:
        res = mc.generate_text(prompt, tier="fast", max_tokens=2, prompt_logprobs=0)
    assert [e.token_id for e in res.prompt_logprobs] == [e.token_id for e in scored]
    assert all(not e.top for e in res.prompt_logprobs)
    for bad, field in (({"max_tokens": 0}, "max_tokens"), ({"echo": "yes"}, "echo")):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="fast", prompt="x", **bad)  # type: ignore[call-overload]
        assert info.value.body["param"] == field  # type: ignore[index]


def test_structured_output_equals_offline(
    client: openai.OpenAI, stub: pb_grpc.InferenceStub, fast_llm: LLM
) -> None:
    """response_format json_schema / json_object (HTTP, both endpoints) and sampling.json_schema
    (gRPC) hold the output to the schema, as the offline engine does (tests/workers/test_engine.py
    holds that to a reference loop); a schema llguidance cannot follow is refused by name."""
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 8},
                             "age": {"type": "integer", "minimum": 0, "maximum": 120}}}  # fmt: skip
    messages = [{"role": "user", "content": "Describe a person as JSON."}]
    want = fast_llm.generate(_chat_ids(fast_llm, messages), SamplingParams(
        max_tokens=32, temperature=0, json_schema=json.dumps(schema)))[0]  # fmt: skip
    value = json.loads(want.text)
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    done = client.chat.completions.create(
        model="fast", messages=messages, max_tokens=32, temperature=0,  # type: ignore[arg-type]
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert done.choices[0].message.content == want.text
    assert done.choices[0].finish_reason == "stop"
    anything = client.completions.create(model="fast", prompt="JSON:", max_tokens=32,
                                         temperature=1.0, seed=7,
                                         extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    free = fast_llm.generate("JSON:", SamplingParams(max_tokens=32, temperature=1.0, seed=7,
                                                     json_schema='{"type": "object"}'))[0]  # fmt: skip
    assert anything.choices[0].text == free.text and free.text.startswith("{")
    sampling = pb.SamplingParams(max_tokens=32, temperature=0, json_schema=json.dumps(schema))
    got = [t for r in stub.Generate(pb.GenerateRequest(
        prompt_token_ids=pb.TokenIds(ids=_chat_ids(fast_llm, messages)), tier="fast",
        sampling=sampling)) for t in r.token_ids]  # fmt: skip
    assert got == want.token_ids
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="x", tier="fast", sampling=pb.SamplingParams(
            json_schema='{"type": "nonsense"}'))))  # fmt: skip
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("sampling.json_schema is not a schema")
    for fmt in ({"type": "xml"}, {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="fast", messages=messages, max_tokens=2,  # type: ignore[arg-type]
                                           response_format=fmt)  # type: ignore[arg-type]  # fmt: skip
        assert info.value.body["param"] == "response_format"  # type: ignore[index]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 10}}}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}  # fmt: skip


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
#: A conversation holding a call and its result, as a client sends it (arguments as JSON text)
#: and as the chat template gets it (arguments as an object).
HISTORY = [*ASK,
           {"role": "assistant", "content": None, "tool_calls": [{
               "id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]  # fmt: skip
RENDERED = [*ASK,
            {"role": "assistant", "content": "", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"}]  # fmt: skip


def _required_schema(tools: list[dict]) -> str:
    """tool_choice "required" without parallel tool calls: vLLM's array of one call."""
    anyof = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"const": t["function"]["name"]},
                             "parameters": t["function"]["parameters"]}} for t in tools]  # fmt: skip
    return json.dumps({"type": "array", "minItems": 1, "maxItems": 1, "items": {"anyOf": anyof}})


def _tool_prompt(llm: LLM, messages: list[dict[str, Any]], tools: list[dict]) -> list[int]:
    tok = llm.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    return tok.encode(text, add_special_tokens=False)


def test_forced_tool_calls_equal_offline(
    client: openai.OpenAI, fast_llm: LLM, reasoning_llm: LLM
) -> None:
    """tools with tool_choice naming a function or "required": the chat template shows the
    tools, the output is held to the call's JSON (structured output) and returned as
    tool_calls, as the offline engine computes it; streamed too; tool turns in the history reach
    the template; "auto" where a tier it may land on has no tool_call_parser, and bad tools, are
    refused by name."""
    messages, tools = ASK, [WEATHER, CLOCK]
    ids = _tool_prompt(fast_llm, messages, tools)
    params = WEATHER["function"]["parameters"]
    want = fast_llm.generate(ids, SamplingParams(max_tokens=32, temperature=0,
                                                 json_schema=json.dumps(params)))[0]  # fmt: skip
    done = client.chat.completions.create(
        model="fast", messages=messages, max_tokens=32, temperature=0,  # type: ignore[arg-type]
        tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}},  # type: ignore[arg-type]
    )  # fmt: skip
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == json.loads(want.text)
    assert set(json.loads(call.function.arguments)) == {"city"}
    streamed = list(client.chat.completions.create(
        model="fast", messages=messages, max_tokens=32, temperature=0, tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True))  # type: ignore[arg-type]  # fmt: skip
    parts = [d for ch in streamed if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert len(parts) > 2 and {d.index for d in parts} == {0}  # the arguments as they come
    assert parts[0].function.name == "get_weather" and parts[0].id.startswith("call_")
    assert "".join(d.function.arguments or "" for d in parts) == want.text
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "stop"
    # "required": an array of calls to any of the tools (vLLM's form; one call without
    # parallel_tool_calls), streamed
    reasoning = reasoning_llm  # room for the longer output
    want = reasoning.generate(_tool_prompt(reasoning, messages, tools), SamplingParams(
        max_tokens=200, temperature=0, json_schema=_required_schema(tools)))[0]  # fmt: skip
    assert want.finish_reason is FinishReason.STOP
    chunks = list(client.chat.completions.create(
        model="reasoning", messages=messages, max_tokens=200, temperature=0, tools=tools,  # type: ignore[arg-type]
        tool_choice="required", parallel_tool_calls=False, stream=True))  # fmt: skip
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        (c["name"], c["parameters"]) for c in json.loads(want.text)]  # fmt: skip
    assert [d.index for d in deltas] == list(range(len(deltas)))
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # a conversation holding a call and its result: rendered by the template, arguments as an object
    want = _greedy(fast_llm, _tool_prompt(fast_llm, RENDERED, tools), 8)
    answer = client.chat.completions.create(model="fast", messages=HISTORY, max_tokens=8,  # type: ignore[arg-type]
                                            temperature=0, tools=tools, tool_choice="none")  # type: ignore[arg-type]  # fmt: skip
    assert answer.choices[0].message.content == want.text
    for model in ("reasoning", "auto"):  # no tool_call_parser on reasoning; auto may land there
        for kw in ({"tools": tools}, {"tools": tools, "tool_choice": "auto"}):  # auto: the default
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model=model, messages=messages, max_tokens=2,  # type: ignore[call-overload]
                                               **kw)  # fmt: skip
            assert info.value.body["param"] == "tool_choice"  # type: ignore[index]
            assert "tier 'reasoning' does not set" in info.value.body["message"]  # type: ignore[index]
    for kw, field in (({"tool_choice": "required"}, "tool_choice"),
                      ({"tools": [{"type": "function", "function": {"name": "a b"}}],
                        "tool_choice": "required"}, "tools[0].function.name"),
                      ({"tools": tools, "tool_choice": {"type": "function",
                                                        "function": {"name": "nope"}}},
                       "tool_choice")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="fast", messages=messages, max_tokens=2, **kw)  # type: ignore[call-overload]
        assert info.value.body["param"] == field  # type: ignore[index]


def test_auto_tool_choice_on_a_tier_with_a_tool_call_parser(
    client: openai.OpenAI, fast_llm: LLM
) -> None:
    """tool_choice auto (and no tool_choice: OpenAI's default with tools) on the fast tier, whose
    tool_call_parser is hermes: the tools reach the template and the output is free, as the
    offline engine computes it, streamed and not. The demo model writes no <tool_call>, so its
    output is all content; how calls are told from text and returned (content, tool_calls,
    finish_reason "tool_calls"): tests/router/test_tool_calls.py."""
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    want = _greedy(fast_llm, _tool_prompt(fast_llm, messages, [WEATHER, CLOCK]), 12)
    assert want.text and "<tool_call>" not in want.text
    for kw in ({}, {"tool_choice": "auto"}):
        done = client.chat.completions.create(model="fast", messages=messages, max_tokens=12,  # type: ignore[call-overload]
                                              temperature=0, tools=[WEATHER, CLOCK], **kw)  # fmt: skip
        choice = done.choices[0]
        assert choice.message.content == want.text and not choice.message.tool_calls
        assert choice.finish_reason == want.finish_reason.value
        chunks = list(client.chat.completions.create(model="fast", messages=messages,  # type: ignore[call-overload]
                                                     max_tokens=12, temperature=0, stream=True,
                                                     tools=[WEATHER, CLOCK], **kw))  # fmt: skip
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(d.content or "" for d in deltas) == want.text
        assert not any(d.tool_calls for d in deltas)
        finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
        assert finishes[-1] == want.finish_reason.value


def test_reasoning_parser_sends_thinking_as_reasoning_content(
    client: openai.OpenAI, reasoning_llm: LLM
) -> None:
    """The reasoning tier's reasoning_parser (deepseek_r1: its template opens <think>, so the
    output is thinking until </think>): chat returns the output as reasoning_content and no
    content, streamed and not, as the offline engine computes it; the fast tier (no parser)
    keeps plain content. The splitting itself: tests/router/test_reasoning.py."""
    messages = [{"role": "user", "content": "Think about mixtures of experts."}]
    want = _greedy(reasoning_llm, _chat_ids(reasoning_llm, messages), 12)
    assert want.text and "</think>" not in want.text
    done = client.chat.completions.create(model="reasoning", messages=messages,  # type: ignore[arg-type]
                                          max_tokens=12, temperature=0)  # fmt: skip
    msg = done.choices[0].message
    assert msg.content is None and getattr(msg, "reasoning_content", None) == want.text
    chunks = list(client.chat.completions.create(model="reasoning", messages=messages,  # type: ignore[arg-type]
                                                 max_tokens=12, temperature=0, stream=True))  # fmt: skip
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == want.text
    assert not any(d.content for d in deltas)
    plain = client.chat.completions.create(model="fast", messages=messages,  # type: ignore[arg-type]
                                           max_tokens=4, temperature=0)  # fmt: skip
    assert plain.choices[0].message.content and "reasoning_content" not in (
        plain.choices[0].message.model_extra or {}
    )


def test_grpc_tools_and_reasoning_as_the_chat_api(
    stack: LocalStack, stub: pb_grpc.InferenceStub, fast_llm: LLM, reasoning_llm: LLM
) -> None:
    """moeray.v1 Generate with tools, tool_choice and tool turns (the Python client), and on a
    tier with a reasoning_parser: the same template input, calls and thinking as the OpenAI chat
    API gives (test_forced_tool_calls_equal_offline and the reasoning test above), against the
    offline engine; refusals name the proto's fields."""
    messages, tools = ASK, [WEATHER, CLOCK]
    ids = _tool_prompt(fast_llm, messages, tools)
    params = WEATHER["function"]["parameters"]
    want = fast_llm.generate(ids, SamplingParams(max_tokens=32, temperature=0,
                                                 json_schema=json.dumps(params)))[0]  # fmt: skip
    want_required = reasoning_llm.generate(_tool_prompt(reasoning_llm, messages, tools),
                                           SamplingParams(max_tokens=200, temperature=0,
                                                          json_schema=_required_schema(tools)))[0]  # fmt: skip
    chat = [{"role": "user", "content": "Think about mixtures of experts."}]
    want_thinking = _greedy(reasoning_llm, _chat_ids(reasoning_llm, chat), 12)
    want_after = _greedy(fast_llm, _tool_prompt(fast_llm, RENDERED, tools), 8)
    want_auto = _greedy(fast_llm, ids, 12)
    with MoerayClient(stack.endpoints()["grpc"], timeout=120) as mc:
        named = mc.generate_text(messages=messages, tier="fast", max_tokens=32, temperature=0,
                                 tools=tools, tool_choice={"type": "function",
                                                           "function": {"name": "get_weather"}})  # fmt: skip
        required = list(mc.generate(messages=messages, tier="reasoning", max_tokens=200,
                                    temperature=0, tools=tools, tool_choice="required",
                                    parallel_tool_calls=False))  # fmt: skip
        auto = mc.generate_text(messages=messages, tier="fast", max_tokens=12, temperature=0,
                                tools=tools)  # fmt: skip
        after = mc.generate_text(messages=HISTORY, tier="fast", max_tokens=8, temperature=0,
                                 tools=tools, tool_choice="none")  # fmt: skip
        thinking = mc.generate_text(messages=chat, tier="reasoning", max_tokens=12, temperature=0)
        raw = mc.generate_text("Think about mixtures of experts.", tier="reasoning", max_tokens=4,
                               temperature=0)  # fmt: skip
    (call,) = named.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_") and named.text == ""
    assert json.loads(call.arguments) == json.loads(want.text)
    assert named.finish_reason is FinishReason.STOP and named.token_ids == want.token_ids
    got = [(c.name, json.loads(c.arguments)) for d in required for c in d.tool_calls]
    assert got == [(c["name"], c["parameters"]) for c in json.loads(want_required.text)]
    assert not any(d.tool_calls for d in required[:-1])  # whole, with the last message
    assert required[-1].finish_reason is FinishReason.TOOL_CALLS
    assert (auto.text, auto.tool_calls) == (want_auto.text, [])  # hermes tier; no call written
    assert after.text == want_after.text  # the call and its result reached the template
    assert (thinking.reasoning_text, thinking.text) == (want_thinking.text, "")  # deepseek_r1
    assert raw.reasoning_text == "" and raw.text  # a prompt is no chat: the text as generated
    bad = [
        (dict(tools=[pb.Tool(name="a b")], tool_choice=pb.ToolChoice(mode="required")),
         "tools[0].name"),
        (dict(tools=[pb.Tool(name="f", parameters="{no")]), "tools[0].parameters"),
        (dict(tools=[pb.Tool(name="f")]), "tool_choice"),  # auto: reasoning has no parser
        (dict(tools=[pb.Tool(name="f")], tool_choice=pb.ToolChoice(function="g")), "tool_choice"),
        (dict(tool_choice=pb.ToolChoice(mode="required")), "tool_choice"),
        (dict(tools=[pb.Tool(name="f")], tool_choice=pb.ToolChoice(function="f"),
              sampling=pb.SamplingParams(json_schema='{"type": "object"}')), "tool_choice"),
    ]  # fmt: skip
    user = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    for kw, field in bad:
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(messages=user, tier="auto", **kw), timeout=60))
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT, kw
        assert (err.value.details() or "").startswith(field), (field, err.value.details())
    with pytest.raises(grpc.RpcError) as err:  # tools belong to a chat
        list(stub.Generate(pb.GenerateRequest(prompt="hi", tier="fast", tools=[pb.Tool(name="f")],
                                              tool_choice=pb.ToolChoice(function="f"))))  # fmt: skip
    assert (err.value.details() or "").startswith("tools need a chat")
    turn = pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(name="f", arguments="{x")])
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi"), turn]),
            tier="fast")))  # fmt: skip
    assert (err.value.details() or "").startswith("messages[1].tool_calls[0].arguments")


def test_special_tokens_reach_the_tool_call_parser(
    stack: LocalStack, client: openai.OpenAI
) -> None:
    """Control tokens (Mistral's [TOOL_CALLS]) are text a tool_call_parser must read: a chat
    with tools and tool_choice auto keeps them in the output, over both protocols, as vLLM's
    parsers ask; otherwise they are left out unless the request says skip_special_tokens false
    (vLLM's field). logit_bias makes the demo model write <|im_start|>, a special token."""
    bias, kept = {"1": 100}, "<|im_start|>" * 3
    chat = {"model": "fast", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "logit_bias": bias}  # fmt: skip
    plain = client.chat.completions.create(**chat)  # type: ignore[call-overload]
    assert plain.choices[0].message.content == ""
    called = client.chat.completions.create(**chat, tools=[WEATHER])  # type: ignore[call-overload]
    assert called.choices[0].message.content == kept
    asked = client.completions.create(model="fast", prompt="hi", max_tokens=3, temperature=0,
                                      logit_bias=bias, extra_body={"skip_special_tokens": False})  # fmt: skip
    assert asked.choices[0].text == kept
    with MoerayClient(stack.endpoints()["grpc"], timeout=60) as mc:
        args: dict[str, Any] = {"tier": "fast", "max_tokens": 3, "temperature": 0,
                                "logit_bias": {1: 100.0}}  # fmt: skip
        assert mc.generate_text(messages=chat["messages"], **args).text == ""
        assert mc.generate_text(messages=chat["messages"], tools=[WEATHER], **args).text == kept
        assert mc.generate_text("hi", skip_special_tokens=False, **args).text == kept


def test_http_engine_time_header(stack: LocalStack) -> None:
    body = {"model": "fast", "prompt": "hello", "max_tokens": 3, "temperature": 0}
    start = time.perf_counter()
    status, headers, _ = _http(
        stack.endpoints()["http"] + "/completions", json.dumps(body).encode()
    )
    elapsed_ms = (time.perf_counter() - start) * 1e3
    assert status == 200 and 0 < float(headers["x-moeray-engine-time-ms"]) < elapsed_ms


def test_sse_ends_with_done_and_route_headers(stack: LocalStack) -> None:
    body = {"model": "auto", "prompt": "hello", "max_tokens": 4, "temperature": 0, "stream": True}
    status, headers, raw = _http(
        stack.endpoints()["http"] + "/completions", json.dumps(body).encode()
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-moeray-tier"] in ("fast", "reasoning")
    lines = [line for line in raw.decode().split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_metrics(stack: LocalStack, client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"auto", "fast", "reasoning", "fast-ckpt"} <= ids
    base = stack.endpoints()["http"].removesuffix("/v1")
    assert json.loads(_http(base + "/health")[2]) == {"status": "ok"}
    text = _http(base + "/metrics")[2].decode()
    assert "moeray_requests_total" in text and "moeray_route_decision_seconds" in text


def test_engine_refusal_carries_its_field(stack: LocalStack, client: openai.OpenAI) -> None:
    """Only the engine knows the vocabulary: its refusal reaches both protocols with the field."""
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fast", prompt=[10**6], max_tokens=2)
    assert info.value.response.json()["error"]["param"] == "prompt"
    with grpc.insecure_channel(stack.endpoints()["grpc"]) as ch:
        stub = pb_grpc.InferenceStub(ch)
        ids = pb.TokenIds(ids=[10**6])
        with pytest.raises(grpc.RpcError) as rpc:
            list(stub.Generate(pb.GenerateRequest(prompt_token_ids=ids, tier="fast"), timeout=30))
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc.value.details().split(" ")[0] == "prompt_token_ids"


# ---- bad input -----------------------------------------------------------------------------

BAD_GRPC = [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="word " * 200, tier="fast"), "prompt"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(prompt="hi", tier="fast", sampling=pb.SamplingParams(max_tokens=33)),
     "max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0)), "top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(prompt="hi", tier="huge"), "tier"),
    (pb.GenerateRequest(prompt_bytes=b"caf\xc3 \xff"), "prompt"),
    (pb.GenerateRequest(prompt="x" * 5000), "request"),
    (pb.GenerateRequest(), "input"),
]  # fmt: skip


@pytest.mark.parametrize(("request_msg", "field"), BAD_GRPC)
def test_grpc_invalid_argument_names_field(
    stub: pb_grpc.InferenceStub, request_msg: pb.GenerateRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request_msg, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details() and "Traceback" not in info.value.details()


BAD_HTTP = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "word " * 200, "model": "fast"}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "model": "fast", "max_tokens": 33}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "model": "gpt-9"}, "model"),
    ({"prompt": "x" * 5000}, "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), BAD_HTTP)
def test_http_400_names_field(client: openai.OpenAI, body: dict[str, Any], field: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**{"model": "auto", **body})
    err = info.value.response.json()["error"]
    assert info.value.status_code == 400 and err["param"] == field and field in err["message"]
    assert err["type"] == "invalid_request_error"


def test_http_invalid_utf8_and_empty_chat(stack: LocalStack) -> None:
    url = stack.endpoints()["http"] + "/chat/completions"
    status, _, raw = _http(url, b'{"messages": [{"role": "user", "content": "\xff"}]}')
    assert status == 400 and "UTF-8" in json.loads(raw)["error"]["message"]
    lone = b'{"prompt": "\\ud800"}'  # valid JSON, but the string is no UTF-8 text
    status, _, raw = _http(stack.endpoints()["http"] + "/completions", lone)
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt"
    status, _, raw = _http(url, b'{"messages": []}')
    assert status == 400 and json.loads(raw)["error"]["param"] == "messages"


# ---- health and reflection -----------------------------------------------------------------


def test_grpc_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=30).status == serving
    named = health_pb2.HealthCheckRequest(service="moeray.v1.Inference")
    assert health.Check(named, timeout=30).status == serving
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"moeray.v1.Inference", "grpc.health.v1.Health"} <= services
    assert "Generate" in str(db.FindFileContainingSymbol("moeray.v1.Inference"))


# ---- cancellation, abort, overload ---------------------------------------------------------


def test_client_cancel_frees_kv_blocks(stack: LocalStack, stub: pb_grpc.InferenceStub) -> None:
    call = stub.Generate(pb.GenerateRequest(prompt="go on", tier="reasoning", sampling=LONG))
    next(call), next(call)
    call.cancel()
    gauges = _wait_kv_freed(stack, "reasoning")
    assert gauges["kv_blocks_total"] == 300


def test_deadline_stops_generation(stack: LocalStack, stub: pb_grpc.InferenceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="go", tier="reasoning", sampling=LONG),
                           timeout=1.0))  # fmt: skip
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_kv_freed(stack, "reasoning")


def test_overload_then_abort(
    stack: LocalStack, stub: pb_grpc.InferenceStub, client: openai.OpenAI
) -> None:
    calls = [
        stub.Generate(
            pb.GenerateRequest(request_id=f"long-{i}", prompt="go", tier="reasoning", sampling=LONG)
        )
        for i in range(2)
    ]
    first = [next(c) for c in calls]  # both admitted: the tier is now at its limit of 2
    assert all(m.route.tier == "reasoning" for m in first)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="x", tier="reasoning"), timeout=30))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(openai.RateLimitError) as http_info:
        client.completions.create(model="reasoning", prompt="x", max_tokens=2)
    assert http_info.value.status_code == 429
    for i, c in enumerate(calls):
        assert stub.Abort(pb.AbortRequest(request_id=f"long-{i}"), timeout=30).found
        rest = list(c)
        assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
        assert rest[-1].usage.completion_tokens < 4000
    assert not stub.Abort(pb.AbortRequest(request_id="long-0"), timeout=30).found
    _wait_kv_freed(stack, "reasoning")
