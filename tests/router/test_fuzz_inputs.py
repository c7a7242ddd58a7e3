"""Bad input on a live front door: every refusal names its field, nothing gets 500 / INTERNAL /
UNKNOWN, and every request is counted in moeray_requests_total.

One served stack for the module (one tiny demo tier, a private redis-server, free ports).
Hand-written cases check the exact code and field on both protocols (raw gRPC bodies, so that
invalid UTF-8 and garbage protobuf reach the server as sent); hypothesis then draws requests
over the whole schema (right and wrong types, out-of-range numbers, unknown and unsupported
fields, random bytes) and checks the invariants.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moeray.cluster.app import LocalStack
from moeray.cluster.config import MoerayConfig
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.v1 import inference_pb2 as pb

from tests.scrape import metric_sum

FAST = {"max_model_len": 64, "max_tokens_limit": 8, "num_kv_blocks": 32, "block_size": 16}
MAX_BYTES = 8192


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    ckpt: Path = build_demo_checkpoint(tmp_path_factory.mktemp("fuzz") / "fast", preset="tiny")
    config = MoerayConfig(
        tiers=[{"name": "fast", "model": str(ckpt), "engine": FAST}],
        router={"fast_tier": "fast", "reasoning_tier": "fast", "max_message_bytes": MAX_BYTES},
        serve={"grpc_port": free_port(), "http_port": free_port()},
    )
    st_ = LocalStack(config, ray_address="local")  # never join a ray start of this machine
    try:
        yield st_.start()
    finally:
        st_.close()


@pytest.fixture(scope="module")
def generate(stack: LocalStack) -> Iterator[Any]:
    """Generate with a raw request body: returns (code name, details)."""
    with grpc.insecure_channel(stack.endpoints()["grpc"]) as ch:
        call = ch.unary_stream("/moeray.v1.Inference/Generate", request_serializer=None,
                               response_deserializer=pb.GenerateResponse.FromString)  # fmt: skip

        def send(body: bytes) -> tuple[str, str]:
            try:
                for _ in call(body, timeout=60):
                    pass
                return "OK", ""
            except grpc.RpcError as e:
                return e.code().name, e.details() or ""

        yield send


def _post(stack: LocalStack, path: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    url = stack.endpoints()["http"].removesuffix("/v1") + path
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {}, dict(r.headers.items())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers.items())


def _requests_total(stack: LocalStack) -> float:
    return metric_sum(stack, "moeray_requests_total")


def _ld(field: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([field << 3 | 2, len(payload)]) + payload


S = pb.SamplingParams
BAD_GRPC = [
    (_ld(2, b"caf\xc3\x28"), "prompt"),  # invalid UTF-8 in the prompt string
    (_ld(2, b"ab\xed\xa0\x80"), "prompt"),  # a UTF-16 surrogate, encoded
    (_ld(1, b"\xff") + _ld(2, b"hi"), "request_id"),
    (_ld(2, b"hi") + _ld(6, b"\xc0\xaf"), "tier"),
    (_ld(3, _ld(1, _ld(1, b"user") + _ld(2, b"\xff"))), "messages[0].content"),
    (_ld(2, b"hi") + _ld(7, _ld(6, b"\xff")), "sampling.stop[0]"),
    (b"\x12\x7fhello", "request"),  # a length beyond the end
    (b"\x17hello", "request"),  # wire type 7
    (b"\x08" + b"\xff" * 11, "request"),  # a varint that never ends
    (pb.GenerateRequest(prompt_bytes=b"caf\xc3 \xff").SerializeToString(), "prompt"),
    (pb.GenerateRequest(prompt="").SerializeToString(), "prompt"),
    (pb.GenerateRequest(prompt="hi", tier="huge").SerializeToString(), "tier"),
    (pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=9)).SerializeToString(),
     "sampling.max_tokens"),
    (pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=2, top_p=float("nan"))).SerializeToString(),
     "sampling.top_p"),
    (pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=2, stop=[""])).SerializeToString(), "sampling.stop"),
    (pb.GenerateRequest(prompt="hi", sampling=S(max_tokens=2, min_tokens=3)).SerializeToString(),
     "sampling.min_tokens"),
    (pb.GenerateRequest(prompt="x" * (MAX_BYTES + 1)).SerializeToString(), "request"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[10**6])).SerializeToString(),
     "prompt_token_ids"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "field"), BAD_GRPC)
def test_grpc_bad_input_names_field(generate: Any, body: bytes, field: str) -> None:
    code, details = generate(body)
    assert code == "INVALID_ARGUMENT", details
    assert details.split(" ")[0] == field and "Traceback" not in details


def _j(**kw: Any) -> bytes:
    return json.dumps({"prompt": "hi", **kw}).encode()


def _chat(**kw: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


C, CH = "/v1/completions", "/v1/chat/completions"
BAD_HTTP = [
    (C, b'{"prompt": "hi", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body"),
    (C, b"[" * 100_000 + b"]" * 100_000, "body"),
    (C, b"{oops", "body"),
    (C, b'{"prompt": "\xff"}', "body"),
    (C, _j(max_tokens=True), "max_tokens"),
    (C, _j(max_tokens="5"), "max_tokens"),
    (C, _j(seed=2**64), "seed"),
    (C, _j(seed=10**30), "seed"),
    (C, _j(seed=True), "seed"),
    (C, _j(temperature=True), "temperature"),
    (C, _j(stream=1), "stream"),
    (C, _j(n=0), "n"),
    (C, _j(n=10**6), "n"),
    (C, _j(n=True), "n"),
    (CH, _chat(echo=True), "echo"),
    (C, _j(echo=1), "echo"),
    (C, _j(best_of=2), "best_of"),
    (C, _j(logprobs=21), "logprobs"),
    (C, _j(logprobs=True), "logprobs"),
    (C, _j(suffix="x"), "suffix"),
    (C, _j(min_tokens=-1), "min_tokens"),
    (C, _j(min_tokens=True), "min_tokens"),
    (C, _j(logit_bias={"1": 500}), "logit_bias"),
    (C, _j(logit_bias={"-1": 5}), "logit_bias"),
    (C, _j(frequency_penalty=2.5), "frequency_penalty"),
    (C, _j(presence_penalty="1"), "presence_penalty"),
    (C, _j(repetition_penalty=0), "repetition_penalty"),
    (C, _j(colour="blue"), "colour"),
    (C, _j(prompt=[True]), "prompt"),
    (CH, _chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),
    (CH, _chat(tools=[5], tool_choice="required"), "tools[0]"),
    (CH, _chat(tools=[{"type": "function", "function": {"name": "f", "parameters": 3}}],
               tool_choice="required"), "tools[0].function.parameters"),
    (CH, _chat(messages=[{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]),
     "messages[0].tool_calls[0].function.arguments"),
    (CH, _chat(response_format={"type": "xml"}), "response_format"),
    (CH, _chat(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "retrieval"}]}]), "messages[1].tool_calls[0]"),
    (CH, _chat(messages=[{"role": "tool", "content": "42", "tool_call_id": 5}]),
     "messages[0].tool_call_id"),
    (CH, _chat(messages=[{"role": "user", "content": "hi", "colour": "blue"}]),
     "messages[0].colour"),
    (CH, _chat(messages=[{"role": "user", "content": "hi", "name": 5}]), "messages[0].name"),
    (CH, _chat(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}),
     "response_format"),
    (C, _j(response_format="json"), "response_format"),
    (CH, _chat(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (CH, _chat(top_logprobs=3), "top_logprobs"),
    (CH, _chat(logprobs=1), "logprobs"),
    (CH, _chat(max_completion_tokens=0), "max_completion_tokens"),
    (CH, _chat(messages=[{"content": "hi"}]), "messages[0].role"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "field"), BAD_HTTP)
def test_http_bad_input_names_field(stack: LocalStack, path: str, body: bytes, field: str) -> None:
    status, err, _ = _post(stack, path, body)
    assert status == 400, err
    assert err["error"]["param"] == field and field in err["error"]["message"]


def test_neutral_values_of_unsupported_fields_pass(stack: LocalStack) -> None:
    """What OpenAI clients send by default is no refusal."""
    body = _chat(model="fast", max_tokens=2, logprobs=False, tools=[], n=1, user="u",
                 presence_penalty=0.0, response_format={"type": "text"})  # fmt: skip
    status, err, _ = _post(stack, CH, body)
    assert status == 200, err
    named = [{"role": "system", "content": "be brief", "name": "rules"},
             {"role": "user", "content": "hi", "name": "bob", "tool_calls": None,
              "refusal": None}]  # fmt: skip
    status, err, _ = _post(stack, CH, _chat(model="fast", max_tokens=2, messages=named))
    assert status == 200, err


def test_every_refusal_is_counted(stack: LocalStack, generate: Any) -> None:
    before = _requests_total(stack)
    for body, _ in BAD_GRPC[:6]:
        generate(body)
    for path, body, _ in BAD_HTTP[:6]:
        _post(stack, path, body)
    assert _requests_total(stack) - before == 12


# ---- hypothesis over the request schema ------------------------------------------------------

_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=3),
    st.lists(st.text(max_size=4), max_size=3), st.dictionaries(st.text(max_size=4),
                                                               st.integers(), max_size=2),
)  # fmt: skip
_KEYS = ["model", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p",
         "top_k", "seed", "stop", "stream", "n", "ignore_eos", "stream_options", "logprobs",
         "echo", "best_of", "tools", "response_format", "suffix", "user", "zzz",
         "min_tokens", "tool_choice", "parallel_tool_calls", "skip_special_tokens"]  # fmt: skip
_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot", 5]),
                           "content": st.one_of(st.text(max_size=8), st.integers(), st.none())}),
    max_size=2,
)  # fmt: skip
_SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])  # fmt: skip


@_SETTINGS
@given(body=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6),
       chat=st.booleans(), messages=_MESSAGES)  # fmt: skip
def test_http_fuzz_never_500(
    stack: LocalStack, body: dict[str, Any], chat: bool, messages: list[Any]
) -> None:
    body = {**body, "max_tokens": body.get("max_tokens", 2)}
    if chat:
        body.pop("prompt", None)
        body["messages"] = messages
    status, err, _ = _post(stack, CH if chat else C, json.dumps(body).encode())
    assert status in (200, 400), err
    if status == 400:
        param = err["error"]["param"]
        assert param and param in err["error"]["message"]
        assert param.split("[")[0].split(".")[0] in {*body, "body", "prompt", "messages"}


_INTS = st.integers(min_value=-(2**31), max_value=2**31 - 1)
_PROTO = st.builds(
    pb.GenerateRequest,
    request_id=st.text(max_size=140), tier=st.sampled_from(["", "auto", "fast", "nope", "fast "]),
    prompt=st.text(max_size=20),
    sampling=st.builds(pb.SamplingParams, max_tokens=_INTS, temperature=st.floats(width=32),
                       top_p=st.floats(width=32), top_k=_INTS,
                       seed=st.integers(min_value=-(2**63), max_value=2**63 - 1),
                       stop=st.lists(st.text(max_size=300), max_size=20)),
)  # fmt: skip
_FIELDS = {"request", "input", "prompt", "request_id", "tier", "sampling", "messages"}


@_SETTINGS
@given(msg=_PROTO, junk=st.binary(max_size=40), raw=st.booleans())
def test_grpc_fuzz_never_internal(generate: Any, msg: pb.GenerateRequest, junk: bytes,
                                  raw: bool) -> None:  # fmt: skip
    body = junk if raw else msg.SerializeToString()
    code, details = generate(body)
    assert code in ("OK", "INVALID_ARGUMENT"), details
    if code == "INVALID_ARGUMENT":
        assert details.split(" ")[0].split("[")[0].split(".")[0] in _FIELDS, details


_CALL = st.builds(pb.ToolCall, id=st.text(max_size=4), name=st.text(max_size=4),
                  arguments=st.sampled_from(["", "{", "{}", '{"a": 1}', "[1]", "nan"]))  # fmt: skip
_CHAT_PROTO = st.builds(
    pb.GenerateRequest,
    tier=st.sampled_from(["", "fast"]),
    messages=st.builds(pb.ChatMessages, messages=st.lists(st.builds(
        pb.ChatMessage, role=st.sampled_from(["user", "assistant", "tool", "robot"]),
        content=st.text(max_size=8), tool_calls=st.lists(_CALL, max_size=2),
        tool_call_id=st.text(max_size=4)), max_size=3)),
    tools=st.lists(st.builds(pb.Tool, name=st.sampled_from(["f", "g", "a b", "", "f"]),
                             description=st.text(max_size=8),
                             parameters=st.sampled_from(["", "{", '{"type": "object"}', "[]", "3",
                                                         '{"type": "nonsense"}'])), max_size=3),
    tool_choice=st.one_of(st.builds(pb.ToolChoice, mode=st.sampled_from(
        ["auto", "none", "required", "", "always"])), st.builds(pb.ToolChoice, function=st.text(
            max_size=2))),
    parallel_tool_calls=st.booleans(),
    sampling=st.builds(pb.SamplingParams, max_tokens=st.integers(min_value=1, max_value=8)),
)  # fmt: skip


@_SETTINGS
@given(msg=_CHAT_PROTO)
def test_grpc_chat_with_tools_fuzz_never_internal(generate: Any, msg: pb.GenerateRequest) -> None:
    """Chats with tools, tool_choice and tool turns, valid or not: served or refused naming a
    field of the request, never INTERNAL or UNKNOWN."""
    code, details = generate(msg.SerializeToString())
    assert code in ("OK", "INVALID_ARGUMENT"), details
    if code == "INVALID_ARGUMENT":
        head = details.split(" ")[0].split("[")[0].split(".")[0]
        assert head in _FIELDS | {"tools", "tool_choice"}, details
