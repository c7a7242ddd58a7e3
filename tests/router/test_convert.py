"""Protobuf <-> dataclass conversion and request validation: every refusal names its field."""

from __future__ import annotations

from typing import Any

import pytest
from moeray.cluster.config import MoerayConfig
from moeray.router.convert import (
    RequestError,
    RequestLimits,
    Undecodable,
    build_route_input,
    check_prompt_size,
    finish_reason_from_proto,
    finish_reason_to_proto,
    generate_call_from_proto,
    output_to_proto,
    request_decoder,
    route_decision_from_proto,
    route_decision_to_proto,
    route_input_from_proto,
    route_input_to_proto,
    tiers_to_proto,
)
from moeray.router.messages import ChatMessage, RouteDecision, RouteInput
from moeray.v1 import inference_pb2 as pb
from moeray.workers.io_struct import (
    FinishReason,
    GenerateRequest,
    RequestOutput,
    SamplingParams,
    Usage,
)

CFG = MoerayConfig.model_validate(
    {
        "tiers": [
            {"name": "fast", "model": "/ckpt/small", "engine": {"max_tokens_limit": 256}},
            {
                "name": "reasoning",
                "model": "/ckpt/big",
                "engine": {"max_tokens_limit": 1024, "max_model_len": 64},
            },
            {"name": "code", "model": "/ckpt/code", "description": "coding model"},
        ],
        "router": {"max_message_bytes": 4096},
    }
)
LIMITS = RequestLimits.from_config(CFG)


def gen(**kw: Any) -> pb.GenerateRequest:
    sampling = kw.pop("sampling", {})
    return pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), **kw)


def test_defaults_and_generated_request_id() -> None:
    call = generate_call_from_proto(gen(prompt="hello"), LIMITS)
    assert call.input == RouteInput(prompt="hello", tier="")
    assert call.sampling == SamplingParams()
    assert len(call.request_id) == 32
    assert generate_call_from_proto(gen(prompt="x"), LIMITS).request_id != call.request_id
    assert generate_call_from_proto(gen(prompt="x", request_id="r1"), LIMITS).request_id == "r1"


def test_sampling_fields_map_one_to_one() -> None:
    s = {"max_tokens": 7, "temperature": 0.0, "top_p": 0.5, "top_k": 3, "seed": -5,
         "stop": ["\n\n"], "stop_token_ids": [2], "ignore_eos": True}  # fmt: skip
    call = generate_call_from_proto(gen(prompt="x", tier="fast", sampling=s), LIMITS)
    assert call.sampling == SamplingParams(**s)
    assert call.sampling.greedy  # an explicit 0.0 is kept, not taken for "absent"


def test_each_input_form() -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
    assert generate_call_from_proto(gen(messages=chat), LIMITS).input.messages == (
        ChatMessage("user", "hi"),
    )
    ids = generate_call_from_proto(gen(prompt_token_ids=pb.TokenIds(ids=[5, 6])), LIMITS)
    assert ids.input.prompt_token_ids == (5, 6)
    sampling = SamplingParams(max_tokens=3)
    assert ids.input.engine_request("r", sampling) == GenerateRequest(
        "r", sampling, prompt_token_ids=[5, 6]
    )
    raw = generate_call_from_proto(gen(prompt_bytes="héllo".encode()), LIMITS)
    assert raw.input.prompt == "héllo"
    for inp in (
        RouteInput(prompt="p", tier="code"),
        ids.input,
        RouteInput(messages=(ChatMessage("user", "q"),)),
    ):
        assert route_input_from_proto(route_input_to_proto(inp), LIMITS) == inp


BAD: list[tuple[pb.GenerateRequest, str]] = [
    (gen(), "input"),
    (gen(prompt=""), "prompt"),
    (gen(prompt="   \n"), "prompt"),
    (gen(prompt_bytes=b"ok \xff\xfe bad"), "prompt"),
    (gen(messages=pb.ChatMessages()), "messages"),
    (
        gen(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard", content="x")])),
        "messages[0].role",
    ),
    (
        gen(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=" ")])),
        "messages",
    ),
    (gen(prompt_token_ids=pb.TokenIds()), "prompt_token_ids"),
    (gen(prompt_token_ids=pb.TokenIds(ids=list(range(64))), tier="reasoning"), "prompt_token_ids"),
    (gen(prompt="x" * 5000), "request"),
    (gen(prompt="x", tier="turbo"), "tier"),
    (gen(prompt="x", request_id="r" * 129), "request_id"),
    (gen(prompt="x", sampling={"max_tokens": 0}), "sampling.max_tokens"),
    (gen(prompt="x", sampling={"max_tokens": -3}), "sampling.max_tokens"),
    (gen(prompt="x", tier="fast", sampling={"max_tokens": 257}), "sampling.max_tokens"),
    (gen(prompt="x", sampling={"max_tokens": 300}), "sampling.max_tokens"),  # auto: min of both
    (gen(prompt="x", sampling={"temperature": -0.1}), "sampling.temperature"),
    (gen(prompt="x", sampling={"temperature": float("nan")}), "sampling.temperature"),
    (gen(prompt="x", sampling={"temperature": float("inf")}), "sampling.temperature"),
    (gen(prompt="x", sampling={"top_p": 0.0}), "sampling.top_p"),
    (gen(prompt="x", sampling={"top_p": 1.5}), "sampling.top_p"),
    (gen(prompt="x", sampling={"top_k": -2}), "sampling.top_k"),
    (gen(prompt="x", sampling={"stop": [""]}), "sampling.stop"),
    (gen(prompt="x", sampling={"stop": ["s"] * 17}), "sampling.stop"),
]


@pytest.mark.parametrize(("msg", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_invalid_requests_name_the_field(msg: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(RequestError) as e:
        generate_call_from_proto(msg, LIMITS)
    assert e.value.field == field
    assert str(e.value).startswith(field + " ")
    assert isinstance(e.value, ValueError)


def test_limits_per_tier() -> None:
    assert generate_call_from_proto(
        gen(prompt="x", tier="reasoning", sampling={"max_tokens": 1024}), LIMITS
    )
    assert generate_call_from_proto(
        gen(prompt="x", tier="code", sampling={"max_tokens": 4096}), LIMITS
    )
    # role names resolve to the configured tiers, and so do their limits
    assert LIMITS.tokens_limit("fast") == 256 and LIMITS.tokens_limit("") == 256
    ok_ids = generate_call_from_proto(
        gen(prompt_token_ids=pb.TokenIds(ids=[1] * 63), tier="reasoning"), LIMITS
    )
    assert len(ok_ids.input.prompt_token_ids or ()) == 63


def test_route_request_validates_too() -> None:
    with pytest.raises(RequestError, match=r"^tier 'nope'"):
        route_input_from_proto(pb.RouteRequest(prompt="x", tier="nope"), LIMITS)
    with pytest.raises(RequestError) as e:
        route_input_from_proto(pb.RouteRequest(), LIMITS)
    assert e.value.field == "input"


def test_build_route_input_for_the_http_path() -> None:
    with pytest.raises(RequestError) as e:
        build_route_input(LIMITS, prompt="a", messages=[ChatMessage("user", "b")])
    assert e.value.field == "input"
    inp = build_route_input(LIMITS, messages=[ChatMessage("system", "s"), ChatMessage("user", "u")])
    assert inp.engine_request("r", SamplingParams()).messages == [
        ChatMessage("system", "s"),
        ChatMessage("user", "u"),
    ]
    assert inp.text() == "u"  # the system turn is not what the user asks


def test_a_prompt_no_tier_takes_is_refused_from_its_wire_header() -> None:
    limit = 100_000
    decode = request_decoder(pb.GenerateRequest, lambda: limit)
    # A `prompt` of bad UTF-8, which parsing would report: its length is read first.
    number = pb.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number
    size = _varint(limit + 1)
    bad = _varint(number << 3 | 2) + size + b"\xff" * (limit + 1)
    raw = pb.GenerateRequest(prompt_bytes=b"z" * (limit + 1), tier="fast").SerializeToString()
    for body, field in ((bad, "prompt"), (raw, "prompt_bytes")):
        got = decode(body)
        assert isinstance(got, Undecodable)
        assert got.error.field == field
        assert str(got.error) == (f"{field} is over {limit} bytes of UTF-8; no text that long "
                                  "fits the context of any tier")  # fmt: skip
    # At the limit, or while no limit is known, the body is parsed as always.
    at_limit = pb.GenerateRequest(prompt="y" * limit, tier="fast")
    assert decode(at_limit.SerializeToString()) == at_limit
    unknown = request_decoder(pb.GenerateRequest, lambda: 0)
    assert str(unknown(bad).error) == "prompt is not valid UTF-8"
    assert unknown(raw) == pb.GenerateRequest.FromString(raw)
    # Other fields may be long: only the prompt's length counts.
    many = pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["s" * 80_000] * 2))
    assert decode(many.SerializeToString()) == many


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def test_check_prompt_size_matches_the_engines_rule() -> None:
    check_prompt_size(RouteInput(prompt="é" * 50), 100, "tier 'fast'")  # 100 bytes: taken
    with pytest.raises(RequestError) as e:
        check_prompt_size(RouteInput(prompt="é" * 50 + "!"), 100, "tier 'fast'")
    assert (e.value.field, str(e.value)) == (
        "prompt",
        "prompt is over 100 bytes of UTF-8; no text that long fits the context of tier 'fast'",
    )
    chat = (ChatMessage("system", "s" * 60), ChatMessage("user", "u" * 41))
    with pytest.raises(RequestError) as e:
        check_prompt_size(RouteInput(messages=chat), 100, "any tier")
    assert e.value.field == "messages"
    check_prompt_size(RouteInput(messages=chat[1:]), 100, "any tier")
    check_prompt_size(RouteInput(prompt_token_ids=tuple(range(500))), 100, "any tier")


def test_output_and_decision_to_proto() -> None:
    d = RouteDecision("reasoning", 0.875, "score 0.88 >= threshold 0.50 (proof)", fallback=False)
    assert route_decision_from_proto(route_decision_to_proto(d)) == d
    out = RequestOutput(
        request_id="r1", prompt_token_ids=[1, 2], token_ids=[5, 6, 7], text="abc",
        delta_token_ids=[7], delta_text="c", finish_reason=FinishReason.LENGTH,
        usage=Usage(prompt_tokens=2, completion_tokens=3),
    )  # fmt: skip
    first = output_to_proto(out, "reasoning", d)
    assert (first.request_id, first.tier, first.text, list(first.token_ids)) == (
        "r1",
        "reasoning",
        "c",
        [7],
    )
    assert first.finish_reason == pb.FINISH_REASON_LENGTH
    assert (first.usage.prompt_tokens, first.usage.completion_tokens) == (2, 3)
    assert first.HasField("route") and first.route.tier == "reasoning"
    later = output_to_proto(RequestOutput("r1", [1, 2], delta_text="d"), "reasoning")
    assert not later.HasField("route") and later.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    for reason in (None, *FinishReason):
        assert finish_reason_from_proto(finish_reason_to_proto(reason)) is reason


def test_tiers_to_proto() -> None:
    resp = tiers_to_proto(CFG)
    assert [(t.name, t.role) for t in resp.tiers] == [
        ("fast", "fast"),
        ("reasoning", "reasoning"),
        ("code", ""),
    ]
    assert resp.tiers[1].max_model_len == 64 and resp.tiers[0].max_tokens_limit == 256
    assert (resp.fast_tier, resp.reasoning_tier, resp.policy) == ("fast", "reasoning", "features")
