"""router/tools.py's tool-call parser (tool_choice auto), whole and streamed, and the chat
responses built from it (router/openai_responses.py), streamed and not.

Every output is also fed to ToolCallStream cut at every position and in single characters: the
content and calls sent must add up to what `parse_calls` gives the whole output, so a tag cut by
a delta boundary is never sent as text. The served path (a tier with tool_call_parser hermes,
the official client): tests/router/test_serving.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest
from moeray.cluster.config import MoerayConfig
from moeray.router import convert
from moeray.router.chat_stream import ChatStream
from moeray.router.convert import RequestError
from moeray.router.ingress import _chat_fields
from moeray.router.messages import RouteDecision
from moeray.router.openai_responses import Choices, complete_response, sse_events
from moeray.router.tools import (
    TOOL_CALL_PARSERS,
    ToolCallStream,
    forced_tools,
    parse_calls,
    tool_calls,
)
from moeray.v1 import inference_pb2 as pb
from moeray.workers.io_struct import FinishReason, RequestOutput, Usage
from pydantic import ValidationError

WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}
CLOCK = {"name": "now", "arguments": {}}


def _block(call: dict[str, Any]) -> str:
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


BAD = "<tool_call>not json</tool_call>"
NO_NAME = '<tool_call>{"arguments": {}}</tool_call>'
LIST_ARGS = '<tool_call>{"name": "f", "arguments": [1]}'
NAN_ARGS = '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>'
HERMES = [  # output, (content, [(name, arguments)] or None)
    ("It is sunny.", ("It is sunny.", None)),
    (_block(WEATHER), (None, [WEATHER])),
    ("Let me look.\n" + _block(WEATHER), ("Let me look.\n", [WEATHER])),
    (_block(WEATHER) + "\n" + _block(CLOCK), (None, [WEATHER, CLOCK])),
    (_block(WEATHER) + "\nignored after the calls", (None, [WEATHER])),  # as vLLM
    # a call left open when the output ends: parsed from what there is
    (f"<tool_call>{json.dumps(CLOCK)}", (None, [CLOCK])),
    # a block that is no call stays text, tags and all (vLLM would make all of it text)
    (BAD + _block(CLOCK), (BAD, [CLOCK])),
    (NO_NAME, (NO_NAME, None)),
    (LIST_ARGS, (LIST_ARGS, None)),
    ("a <tool_cal b", ("a <tool_cal b", None)),
    ("ends with <tool_c", ("ends with <tool_c", None)),
    (NAN_ARGS, (NAN_ARGS, None)),  # NaN: no JSON form
    ("", (None, None)),
]
PY_CALLS = '[get_weather(city="Paris", unit="°C"), now()]'
PYTHONIC = [
    (PY_CALLS, (None, [WEATHER, CLOCK])),
    ("\n " + PY_CALLS + "\n", (None, [WEATHER, CLOCK])),
    ("<|python_start|>[now()]<|python_end|>", (None, [CLOCK])),  # Llama 4's tags kept
    (
        "[f(a=[1, {'b': None}], c=True, d=-2.5)]",
        (None, [{"name": "f", "arguments": {"a": [1, {"b": None}], "c": True, "d": -2.5}}]),
    ),
    ("It is sunny [1].", ("It is sunny [1].", None)),
    ("[1, 2]", ("[1, 2]", None)),  # a list, but not of calls
    ("[]", ("[]", None)),
    ("[f(1)]", ("[f(1)]", None)),  # positional arguments: no call
    ("[f(a=x)]", ("[f(a=x)]", None)),  # not a literal
    ("[a.b(c=1)]", ("[a.b(c=1)]", None)),
    ("[f(**k)]", ("[f(**k)]", None)),
    ("[f(a={1, 2})]", ("[f(a={1, 2})]", None)),  # a set: no JSON form
    ("[f(a=1e999)]", ("[f(a=1e999)]", None)),  # infinity: no JSON form
    ("[now(), unfinished(", ("[now(), unfinished(", None)),  # cut by max_tokens: text
    ("<|python", ("<|python", None)),
    ("", (None, None)),
]
V3_CALLS = "[TOOL_CALLS] " + json.dumps([WEATHER, CLOCK], ensure_ascii=False)
V11_CALLS = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "°C"}[TOOL_CALLS]now[ARGS]{}'
MISTRAL = [  # [TOOL_CALLS] is a control token: in the text with skip_special_tokens off
    ("It is sunny.", ("It is sunny.", None)),
    (V3_CALLS, (None, [WEATHER, CLOCK])),  # v3 tokenizers (Mixtral 8x22B Instruct)
    ("Let me look. " + V3_CALLS, ("Let me look. ", [WEATHER, CLOCK])),
    (V11_CALLS, (None, [WEATHER, CLOCK])),  # v11 and later
    ('[TOOL_CALLS][{"name": "now"}]', (None, [CLOCK])),  # no arguments: {}
    ("[TOOL_CALLS] [", ("[TOOL_CALLS] [", None)),  # cut by max_tokens: text
    ("[TOOL_CALLS] [1]", ("[TOOL_CALLS] [1]", None)),  # a list, but not of calls
    ('[TOOL_CALLS] [{"name": "f", "arguments": [1]}]',
     ('[TOOL_CALLS] [{"name": "f", "arguments": [1]}]', None)),
    ("[TOOL_CALLS]a b[ARGS]{}", ("[TOOL_CALLS]a b[ARGS]{}", None)),  # no tool name
    ("[TOOL_CALLS]f{}", ("[TOOL_CALLS]f{}", None)),  # no [ARGS]
    ("[TOOL_CALLS]f[ARGS]{x", ("[TOOL_CALLS]f[ARGS]{x", None)),
    ("a [TOOL_CAL b", ("a [TOOL_CAL b", None)),
    ("ends with [TOOL_", ("ends with [TOOL_", None)),
    ("", (None, None)),
]  # fmt: skip
BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
V3_WEATHER = (
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris", "unit": "°C"}\n```<｜tool▁call▁end｜>'
)  # DeepSeek-V3, R1
V31_CLOCK = "<｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜>"  # DeepSeek-V3.1
DS_BAD = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{x\n```<｜tool▁call▁end｜>"
DEEPSEEK = [
    ("It is sunny.", ("It is sunny.", None)),
    (BEGIN + V3_WEATHER + V31_CLOCK + END, (None, [WEATHER, CLOCK])),
    ("Let me look." + BEGIN + V3_WEATHER + END, ("Let me look.", [WEATHER])),
    (BEGIN + DS_BAD + V31_CLOCK + END, (DS_BAD, [CLOCK])),  # no call: text, as hermes
    (BEGIN + "<｜tool▁call▁begin｜>a b<｜tool▁sep｜>{}<｜tool▁call▁end｜>",
     ("<｜tool▁call▁begin｜>a b<｜tool▁sep｜>{}<｜tool▁call▁end｜>", None)),
    (BEGIN + V31_CLOCK[:-len("<｜tool▁call▁end｜>")], (None, [CLOCK])),  # left open: parsed
    ("ends with <｜tool▁ca", ("ends with <｜tool▁ca", None)),
    ("", (None, None)),
]  # fmt: skip
CASES = ([("hermes", *c) for c in HERMES] + [("pythonic", *c) for c in PYTHONIC]
         + [("mistral", *c) for c in MISTRAL] + [("deepseek_v3", *c) for c in DEEPSEEK])  # fmt: skip


def _named(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Calls in the test's form: name and parsed arguments (ids are fresh each time)."""
    if calls is None:
        return None
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    return [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
            for c in calls]  # fmt: skip


@pytest.mark.parametrize(("parser", "text", "expected"), CASES)
def test_parse_calls(parser: str, text: str, expected: tuple[str | None, list | None]) -> None:
    content, calls = parse_calls(parser, text)
    assert (content, _named(calls)) == expected


def _streamed(parser: str, pieces: list[str]) -> tuple[str, list[dict[str, Any]]]:
    stream = ToolCallStream(parser)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        c, got = stream.feed(piece, final=i == len(pieces) - 1)
        content, calls = content + c, calls + got
    assert stream.calls == len(calls)
    return content, calls


@pytest.mark.parametrize(("parser", "text", "expected"), CASES)
def test_stream_adds_up_to_parse(parser: str, text: str, expected: tuple) -> None:
    want = (expected[0] or "", expected[1] or [])
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    cuts += [[text[:i], text[i:j], text[j:]] for i in range(0, len(text), 3)
             for j in range(i, len(text), 5)]  # fmt: skip
    cuts.append(list(text))
    for pieces in cuts:
        content, calls = _streamed(parser, pieces)
        assert (content, _named(calls) or []) == want, pieces


def test_a_tag_is_held_back_until_it_is_decided() -> None:
    stream = ToolCallStream("hermes")
    assert stream.feed("Sure.<tool_") == ("Sure.", [])  # "<tool_" may open a call
    assert stream.feed('call>{"name": "now"') == ("", [])  # inside the call: nothing yet
    content, calls = stream.feed(', "arguments": {}}</tool_call>')
    assert content == "" and _named(calls) == [CLOCK]
    stream = ToolCallStream("hermes")
    assert stream.feed("a <b>") == ("a <b>", [])


def test_pythonic_text_flows_and_a_list_is_held_to_the_end() -> None:
    stream = ToolCallStream("pythonic")
    assert stream.feed("  ") == ("", [])  # undecided
    assert stream.feed(" Paris") == ("   Paris", [])
    assert stream.feed(" is [big].") == (" is [big].", [])  # text, whatever follows
    stream = ToolCallStream("pythonic")
    assert stream.feed("[now(") == ("", [])
    assert stream.feed(")]") == ("", [])  # the list may go on: held
    content, calls = stream.feed("", final=True)
    assert content == "" and _named(calls) == [CLOCK]


def test_auto_needs_a_parser_on_every_tier_the_request_may_land_on() -> None:
    tools = [{"type": "function", "function": {"name": "now"}}]
    for choice in (None, "auto"):  # OpenAI's default with tools is auto
        assert forced_tools(tools, choice, True, []) == (tuple(tools), None, "")
        with pytest.raises(RequestError) as e:
            forced_tools(tools, choice, True, ["reasoning"])
        assert e.value.field == "tool_choice" and "'reasoning'" in e.value.message
    assert forced_tools(None, None, True, ["reasoning"]) == (None, None, "")  # no tools: text
    with pytest.raises(ValueError, match="tool_call_parser"):
        ToolCallStream("llama3_json")


# ---- the chat response built from them ------------------------------------------------------

DECISION = RouteDecision(tier="fast", score=0.0, reason="named")


def _outputs(pieces: list[str], finish: FinishReason) -> list[RequestOutput]:
    usage = Usage(prompt_tokens=5, completion_tokens=len(pieces))
    return [RequestOutput("chatcmpl-1", [1, 2, 3, 4, 5], delta_text=p, usage=usage,
                          finish_reason=finish if i == len(pieces) - 1 else None)
            for i, p in enumerate(pieces)]  # fmt: skip


def _started(outs: list[RequestOutput]) -> tuple[list, Choices]:
    async def rest() -> AsyncGenerator[tuple[RouteDecision, RequestOutput], None]:
        for out in outs[1:]:
            yield DECISION, out

    stream = rest()
    return [((DECISION, outs[0]), stream)], Choices([stream])


OUTPUT = ["Checking.", "<tool", "_call>\n", '{"name": "get_weather", "arguments": ',
          '{"city": "Paris", "unit": "°C"}}\n</tool_call>', "\n", "<tool_call>",
          json.dumps(CLOCK), "</tool_call>"]  # fmt: skip


@pytest.mark.parametrize(("finish", "reason"), [(FinishReason.STOP, "tool_calls"),
                                                (FinishReason.LENGTH, "length")])  # fmt: skip
def test_chat_response_carries_the_calls(finish: FinishReason, reason: str) -> None:
    started, rest = _started(_outputs(OUTPUT, finish))
    response = asyncio.run(complete_response("chat", started, rest, calls_parser="hermes"))
    (choice,) = json.loads(response.body)["choices"]
    assert choice["finish_reason"] == reason
    assert choice["message"]["content"] == "Checking."
    assert _named(choice["message"]["tool_calls"]) == [WEATHER, CLOCK]


def test_chat_stream_carries_the_calls_as_they_close() -> None:
    started, rest = _started(_outputs(OUTPUT, FinishReason.STOP))

    async def events() -> list[dict[str, Any]]:
        got = [e async for e in sse_events("chat", started, rest, False, calls_parser="hermes")]
        assert got[-1] == "data: [DONE]\n\n"
        return [json.loads(e.removeprefix("data: ")) for e in got[:-1]]

    chunks = [ev["choices"][0] for ev in asyncio.run(events())]
    deltas = [c["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1]
    assert _named(calls) == [WEATHER, CLOCK]
    # a chunk for each delta with something to send: the role, "Checking.", then each call
    # when the delta that closes its tag comes (the deltas in between held it back)
    assert [list(d) for d in deltas] == [["role", "content"], ["content"], ["tool_calls"],
                                         ["tool_calls"]]  # fmt: skip
    assert chunks[-1]["finish_reason"] == "tool_calls"
    assert all(c["finish_reason"] is None for c in chunks[:-1])


def test_grpc_messages_carry_the_same_calls() -> None:
    """The gRPC front door's GenerateResponses for the outputs above (router/ingress.py): each
    holds its delta's tokens, text only the answer, and each call whole in the message whose
    delta closes it; the last one's finish_reason is TOOL_CALLS, as the SSE chunks' tool_calls."""
    outs = _outputs(OUTPUT, FinishReason.STOP)
    chat = ChatStream(calls_parser="hermes")
    msgs = []
    for out in outs:
        msg = convert.output_to_proto(out, "fast")
        _chat_fields(msg, chat.feed(out))
        msgs.append(msg)
    assert "".join(m.text for m in msgs) == "Checking."
    calls = [(i, c) for i, m in enumerate(msgs) for c in m.tool_calls]
    assert [i for i, _ in calls] == [4, 8]  # the deltas that close the tags
    assert [{"name": c.name, "arguments": json.loads(c.arguments)} for _, c in calls] == [
        WEATHER, CLOCK]  # fmt: skip
    assert all(c.id.startswith("call_") for _, c in calls)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    # thinking apart (Qwen3), and a forced call held whole to the end ("stop" for a named one)
    chat = ChatStream(reasoning="qwen3")
    msgs = []
    for out in _outputs(["<think>hm", "</think>ok"], FinishReason.STOP):
        msgs.append(convert.output_to_proto(out, "r"))
        _chat_fields(msgs[-1], chat.feed(out))
    assert [(m.reasoning_text, m.text) for m in msgs] == [("hm", ""), ("", "ok")]
    chat = ChatStream(tool="get_weather")
    pieces = ['{"city": ', '"Paris"}']
    msgs = []
    for out in _outputs(pieces, FinishReason.STOP):
        msgs.append(convert.output_to_proto(out, "fast"))
        _chat_fields(msgs[-1], chat.feed(out))
    assert [m.text for m in msgs] == ["", ""] and not msgs[0].tool_calls
    (call,) = msgs[-1].tool_calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP


def test_thinking_is_split_off_before_the_calls() -> None:
    """A tier with both parsers (Qwen3): the thinking goes to reasoning_content, and a call
    inside it is no call; the answer after </think> is parsed for calls."""
    pieces = ["<think>maybe <tool_call>", json.dumps(CLOCK), "</tool_call>?</th", "ink>Sure.",
              *OUTPUT[3:5]]  # fmt: skip
    pieces[-2] = "<tool_call>" + pieces[-2]
    started, rest = _started(_outputs(pieces, FinishReason.STOP))
    response = asyncio.run(complete_response("chat", started, rest, reasoning="qwen3",
                                     calls_parser="hermes"))  # fmt: skip
    (choice,) = json.loads(response.body)["choices"]
    thinking = f"maybe <tool_call>{json.dumps(CLOCK)}</tool_call>?"
    assert choice["message"]["reasoning_content"] == thinking
    assert choice["message"]["content"] == "Sure."
    assert _named(choice["message"]["tool_calls"]) == [WEATHER]
    assert choice["finish_reason"] == "tool_calls"
    started, rest = _started(_outputs(pieces, FinishReason.STOP))

    async def events() -> list[dict[str, Any]]:
        got = [e async for e in sse_events("chat", started, rest, False, reasoning="qwen3",
                                     calls_parser="hermes")]  # fmt: skip
        return [json.loads(e.removeprefix("data: ")) for e in got[:-1]]

    deltas = [ev["choices"][0]["delta"] for ev in asyncio.run(events())]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == thinking
    assert "".join(d.get("content") or "" for d in deltas) == "Sure."
    assert _named([c for d in deltas for c in d.get("tool_calls", [])]) == [WEATHER]


def test_a_function_named_like_a_tool_choice_is_forced_by_its_name() -> None:
    """tool_choice naming a function called "required" (or "auto", "none") forces that one call,
    not the mode of the same name."""
    params = {"type": "object", "properties": {"x": {"type": "integer"}}}
    for name in ("required", "auto", "none"):
        tools = [{"type": "function", "function": {"name": name, "parameters": params}}]
        choice = {"type": "function", "function": {"name": name}}
        _, schema, mode = forced_tools(tools, choice, True, ["reasoning"])
        assert json.loads(schema or "") == params
        calls = tool_calls(mode, '{"x": 1}')
        assert _named(calls) == [{"name": name, "arguments": {"x": 1}}]
    _, schema, mode = forced_tools(tools, "required", True, [])
    assert json.loads(schema or "")["type"] == "array"
    assert _named(tool_calls(mode, '[{"name": "none", "parameters": {"x": 2}}]')) == [
        {"name": "none", "arguments": {"x": 2}}]  # fmt: skip


def test_a_tiers_parser_is_checked_by_the_config() -> None:
    def tier(parser: str) -> MoerayConfig:
        return MoerayConfig.model_validate(
            {"tiers": [{"name": "fast", "model": "/m", "tool_call_parser": parser}]}
        )

    assert {tier(p).tiers[0].tool_call_parser for p in TOOL_CALL_PARSERS} == {
        "hermes", "pythonic", "mistral", "deepseek_v3"}  # fmt: skip
    with pytest.raises(ValidationError) as err:
        tier("llama3_json")
    assert err.value.errors()[0]["loc"] == ("tiers", 0, "tool_call_parser")
