"""OpenAI responses from engine outputs, for router/http_app.py: a request's choices started
and merged (`start_choices`, `Choices`), then one JSON body (`complete_response`) or server-sent
events (`sse_events`), with the tier's reasoning and tool-call parsers applied (reasoning.py,
tools.py), logprobs in OpenAI's two shapes, completions' echo, usage and the route headers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any, Literal

from fastapi.responses import JSONResponse
from moeray.router.chat_stream import ChatStream, forced_call, parsed_finish
from moeray.router.chat_stream import finish_of as _finish
from moeray.router.messages import GenerateCall, RouteDecision
from moeray.router.reasoning import split as split_reasoning
from moeray.router.service import EngineUnavailable, InferenceService, Overloaded
from moeray.router.tools import REQUIRED, parse_calls
from moeray.workers.io_struct import RequestOutput, TokenLogprob

log = logging.getLogger(__name__)

#: Non-streamed responses: the engine's own time for the request (ms), for per-request overhead.
ENGINE_TIME_HEADER = "x-moeray-engine-time-ms"


def route_headers(d: RouteDecision, request_id: str) -> dict[str, str]:
    return {
        "x-moeray-tier": d.tier,
        "x-moeray-route-score": f"{d.score:.4f}",
        "x-moeray-route-fallback": str(d.fallback).lower(),
        "x-request-id": request_id,
    }


def _choice(
    kind: Literal["chat", "text"],
    text: str | None,
    finish: str | None,
    chunk: bool,
    index: int = 0,
    logprobs: dict | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    reasoning: str | None = None,
) -> dict:
    """One choice of a response (chunk: of an SSE event). reasoning: the thinking a tier's
    reasoning_parser split off (router/reasoning.py), as vLLM's reasoning_content."""
    if kind == "text":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    key = "delta" if chunk else "message"
    body: dict[str, Any] = {"content": text} if chunk else {"role": "assistant", "content": text}
    if reasoning is not None:
        body["reasoning_content"] = reasoning
    if tool_calls is not None:
        body["tool_calls"] = [{"index": j, **c} for j, c in enumerate(tool_calls)] if chunk \
            else tool_calls  # fmt: skip
    return {"index": index, key: body, "logprobs": logprobs, "finish_reason": finish}


def _logprobs_json(
    kind: Literal["chat", "text"],
    entries: list[TokenLogprob] | None,
    offset: int,
    unscored: int = 0,
) -> dict | None:
    """OpenAI's logprobs object for these tokens (None when the request asked for none):
    completions' {tokens, token_logprobs, top_logprobs, text_offset} (offset: characters of
    the choice's text before the first of them; the first `unscored` tokens, an echoed
    prompt's first, have null logprob and top_logprobs), chat's {content: [{token, logprob,
    bytes, top_logprobs}]}."""
    if entries is None:
        return None
    if kind == "chat":

        def one(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [{**one(e.text, e.logprob), "top_logprobs": [one(t.text, t.logprob)
                                                               for t in e.top]}
                   for e in entries]  # fmt: skip
        return {"content": content, "refusal": None}
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": [e.text for e in entries],
            "token_logprobs": [None if j < unscored else e.logprob
                               for j, e in enumerate(entries)],
            "top_logprobs": [None if j < unscored else {t.text: t.logprob for t in e.top}
                             for j, e in enumerate(entries)],
            "text_offset": offsets}  # fmt: skip


#: How a completion shows its prompt: not at all, before the completion (echo), or alone (echo
#: with max_tokens 0: the one token the engine computed is not shown or counted).
Echo = Literal["", "prompt", "only"]


def _echoed(
    echo: Echo, out: RequestOutput, text: str, entries: list[TokenLogprob] | None
) -> tuple[str, list[TokenLogprob] | None]:
    """A choice's first text and logprobs with its prompt's (out: its first output) before
    them, or alone for "only"."""
    prompt_entries: list[TokenLogprob] | None = None
    if entries is not None:  # the engine filled the first entry for echo (engine_service.py)
        prompt_entries = [e for e in out.prompt_logprobs or () if e is not None]
    if echo == "only":
        return out.prompt or "", prompt_entries
    return (out.prompt or "") + text, None if entries is None else [
        *(prompt_entries or ()),
        *entries,
    ]


def _usage(lasts: list[RequestOutput], echo: Echo = "") -> dict[str, int]:
    """Usage of a request's choices: the prompt once, every choice's completion tokens."""
    prompt = lasts[0].usage.prompt_tokens
    completion = 0 if echo == "only" else sum(out.usage.completion_tokens for out in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}  # fmt: skip


#: One choice once started: its route decision and first output, and the rest of its stream.
Started = tuple[
    tuple[RouteDecision, RequestOutput], AsyncGenerator[tuple[RouteDecision, RequestOutput], None]
]


async def start_choices(service: InferenceService, call: GenerateCall, n: int) -> list[Started]:
    """The request's n choices, each an engine request with its first output. With n > 1 every
    choice runs on one tier (an auto request is routed once) with a request id and a seed of
    its own; if any is refused, the others are ended and the refusal raised."""
    if n == 1:
        stream = service.generate(call, "http")  # counts its own outcomes from here on
        return [(await anext(stream), stream)]
    decision = service.route(call.input, "http")  # one decision for all the choices
    calls = [_choice_call(call, i) for i in range(n)]
    streams = [service.generate(c, "http", decision=decision) for c in calls]
    firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    errors = [f for f in firsts if isinstance(f, BaseException)]
    if errors:
        for s in streams:
            await s.aclose()
        raise errors[0]
    return list(zip(firsts, streams))  # type: ignore[arg-type]


def _choice_call(call: GenerateCall, index: int) -> GenerateCall:
    """Choice `index` of a request: its own request id and seed (seed + index, kept within the
    seed's 64-bit range), so that seeded choices differ and are reproducible."""
    if index == 0:
        return call
    seed = call.sampling.seed
    if seed is not None:
        seed = seed + index if seed + index < 2**64 else seed - index
    sampling = dataclasses.replace(call.sampling, seed=seed)
    return dataclasses.replace(call, request_id=f"{call.request_id}-{index}", sampling=sampling)


class Choices:
    """The remaining outputs of a request's choices as they come, tagged with the choice's
    index; the first error of any choice is raised. aclose() ends every choice (engine calls
    cancelled, KV freed, outcomes counted), whether or not iteration has begun."""

    def __init__(self, streams: list[AsyncGenerator[tuple[RouteDecision, RequestOutput], None]]):
        self.streams = streams
        self._outputs = self._one() if len(streams) == 1 else self._merged()

    def __aiter__(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        return self._outputs

    async def aclose(self) -> None:
        await self._outputs.aclose()
        for s in self.streams:
            await s.aclose()

    async def _one(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """No task, no queue: the common case stays at its consumer's pace."""
        async for _, out in self.streams[0]:
            yield 0, out

    async def _merged(self) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

        async def pump(
            i: int, stream: AsyncGenerator[tuple[RouteDecision, RequestOutput], None]
        ) -> None:
            try:
                async for _, out in stream:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, None))
            except Exception as e:
                queue.put_nowait((i, e))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            running = len(tasks)
            while running:
                i, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield i, item
        finally:  # the tasks end before their streams are closed (a running one cannot be)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _envelope(
    kind: Literal["chat", "text"], rid: str, created: int, tier: str, chunk: bool
) -> dict:
    obj = {"chat": "chat.completion", "text": "text_completion"}[kind]
    if chunk and kind == "chat":
        obj += ".chunk"
    return {"id": rid, "object": obj, "created": created, "model": tier}


async def sse_events(
    kind: Literal["chat", "text"],
    started: list[Started],
    rest: Choices,
    include_usage: bool,
    echo: Echo = "",
    tool: str = "",
    reasoning: str = "",
    calls_parser: str = "",
) -> AsyncGenerator[str, None]:
    """Server-sent events: one chunk per engine delta (its choice's index; an echoed prompt
    rides on each choice's first), then usage (if asked), then [DONE]. tool: a forced tool
    mode; reasoning, calls_parser: the tier's parsers in use (router/reasoning.py, tools.py)."""
    decision, out = started[0][0]
    env = _envelope(kind, out.request_id, int(time.time()), decision.tier, chunk=True)
    lasts = [first[1] for first, _ in started]
    if kind == "chat":  # OpenAI opens each choice of a chat stream with the assistant role
        for i in range(len(started)):
            yield _event({**env, "choices": [{"index": i, "delta": {"role": "assistant",
                          "content": ""}, "logprobs": None, "finish_reason": None}]})  # fmt: skip
    offsets = [0] * len(started)  # characters of each choice's text streamed so far

    chats = [ChatStream(reasoning, calls_parser, tool) for _ in started]
    parsed = bool(reasoning or calls_parser or tool == REQUIRED)  # else text as it comes

    def chunk(i: int, out: RequestOutput, first: bool = False) -> str | None:
        if tool == REQUIRED:  # the calls are sent whole once complete, as one delta
            d = chats[i].feed(out)
            if not out.finished:
                return None
            text = None if d.calls else d.content
            return _event({**env, "choices": [_choice(kind, text, d.finish, True, i, None,
                                                      d.calls or None)]})  # fmt: skip
        if parsed:  # the tier's parsers send thinking, answer and calls apart
            d = chats[i].feed(out)
            if not (d.reasoning or d.content or d.calls or out.finished or out.delta_logprobs):
                return None
            parts = {"reasoning_content": d.reasoning, "content": d.content}
            delta: dict[str, Any] = {k: v for k, v in parts.items() if v}
            if d.calls:
                delta["tool_calls"] = [{"index": d.first_call + j, **call}
                                       for j, call in enumerate(d.calls)]  # fmt: skip
            lp = _logprobs_json(kind, out.delta_logprobs, 0)
            return _event({**env, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                               "finish_reason": d.finish}]})  # fmt: skip
        if tool and tool != REQUIRED:  # one named call: its arguments stream as they come
            head: dict[str, Any] = {"index": 0, "function": {"arguments": out.delta_text}}
            if first:
                head.update(id=f"call_{uuid.uuid4().hex[:24]}", type="function")
                head["function"]["name"] = tool
            args = {"tool_calls": [head]} if first or out.delta_text else {}
            return _event({**env, "choices": [{"index": i, "delta": args, "logprobs": None,
                                               "finish_reason": _finish(out)}]})  # fmt: skip
        text, entries = out.delta_text, out.delta_logprobs
        if echo and first:
            text, entries = _echoed(echo, out, text, entries)
        lp = _logprobs_json(kind, entries, offsets[i], int(bool(echo) and first))
        offsets[i] += len(text)
        finish = "length" if echo == "only" and out.finished else _finish(out)
        return _event({**env, "choices": [_choice(kind, text, finish, True, i, lp)]})

    try:
        for i, out in enumerate(lasts):
            if (event := chunk(i, out, first=True)) is not None:
                yield event
        async for i, out in rest:
            lasts[i] = out
            if (event := chunk(i, out)) is not None:
                yield event
    except (Overloaded, EngineUnavailable) as e:  # the stream has begun: report it in-band
        yield _event({"error": {"message": str(e), "type": "server_error", "param": None,
                                "code": "unavailable"}})  # fmt: skip
    except Exception as e:
        log.exception("stream %s failed", out.request_id)
        yield _event({"error": {"message": f"internal error: {type(e).__name__}",
                                "type": "server_error", "param": None, "code": "internal"}})  # fmt: skip
    finally:  # the client went away mid-stream: end the request now (cancel, KV freed, counted)
        await rest.aclose()
    if include_usage:
        yield _event({**env, "choices": [], "usage": _usage(lasts, echo)})
    yield "data: [DONE]\n\n"


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def complete_response(
    kind: Literal["chat", "text"],
    started: list[Started],
    rest: Choices,
    echo: Echo = "",
    tool: str = "",
    reasoning: str = "",
    calls_parser: str = "",
) -> JSONResponse:
    decision = started[0][0][0]
    lasts = [first[1] for first, _ in started]
    parts = [[out.delta_text] for out in lasts]
    logprobs = [None if out.delta_logprobs is None else list(out.delta_logprobs)
                for out in lasts]  # fmt: skip
    try:
        async for i, out in rest:
            parts[i].append(out.delta_text)
            got = logprobs[i]  # None: the request asked for no logprobs
            if got is not None and out.delta_logprobs:
                got.extend(out.delta_logprobs)
            lasts[i] = out
    finally:
        await rest.aclose()
    rid = lasts[0].request_id
    body = _envelope(kind, rid, int(time.time()), decision.tier, chunk=False)
    choices = []
    for i, (p, out, lp) in enumerate(zip(parts, lasts, logprobs)):
        text = "".join(p)
        if echo:
            text, lp = _echoed(echo, out, text, lp)
        finish = "length" if echo == "only" else _finish(out)
        calls, thought = None, None
        content: str | None = text
        if tool:
            calls, finish = forced_call(tool, out, text)
            content = None if calls is not None else text
        else:
            if reasoning:
                thought, content = split_reasoning(reasoning, text)
            if calls_parser:
                content, calls = parse_calls(calls_parser, content or "")
                finish = parsed_finish(out, calls is not None)
        choices.append(_choice(kind, content, finish, False, i,
                               _logprobs_json(kind, lp, 0, int(bool(echo))), calls,
                               thought))  # fmt: skip
    body.update(choices=choices, usage=_usage(lasts, echo))
    headers = route_headers(decision, rid)
    headers[ENGINE_TIME_HEADER] = f"{max(out.engine_time_s for out in lasts) * 1e3:.3f}"
    return JSONResponse(body, headers=headers)
