"""The Python client of moeray's gRPC front door (service moeray.v1.Inference).

    with MoerayClient("localhost:50051") as c:
        for delta in c.generate("Prove that sqrt(2) is irrational.", max_tokens=64):
            print(delta.text, end="")
        print(c.route("hi there").tier)

`generate` streams `GenerateDelta`s (text and token-id deltas; the route decision arrives with
the first, finish_reason and usage with the last). `generate_text` collects a whole answer.
gRPC failures become `MoerayError`s carrying the status code and the server's sentence:
`InvalidRequest` (INVALID_ARGUMENT), `Overloaded` (RESOURCE_EXHAUSTED), `Unavailable`
(UNAVAILABLE / DEADLINE_EXCEEDED). Closing a `generate` iterator early cancels the RPC, which
makes the server stop generating and free the request's KV blocks. `AsyncMoerayClient` is the
same for asyncio (grpc.aio): `async for delta in c.generate(...)`, awaitable calls.
"""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from moeray.router.convert import (
    finish_reason_from_proto,
    route_decision_from_proto,
    token_logprob_from_proto,
)
from moeray.router.messages import ChatMessage, RouteDecision
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc
from moeray.workers.io_struct import FinishReason, TokenLogprob, Usage


class MoerayError(RuntimeError):
    """A failed call: `code` is the grpc.StatusCode, `details` the server's sentence."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidRequest(MoerayError, ValueError):
    """The server refused the request (INVALID_ARGUMENT); details name the field."""


class Overloaded(MoerayError):
    """The server is at capacity (RESOURCE_EXHAUSTED); retry later."""


class Unavailable(MoerayError):
    """The server could not be reached in time (UNAVAILABLE or DEADLINE_EXCEEDED)."""


_ERRORS: dict[grpc.StatusCode, type[MoerayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
}


def _as_error(err: grpc.RpcError) -> MoerayError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    return _ERRORS.get(code, MoerayError)(code, details)


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: arguments is a JSON object as text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class GenerateDelta:
    """One streamed message: new text and token ids since the previous one. A chat with tools
    also gets the calls completed (each whole); a chat on a tier with a reasoning_parser, its
    new thinking (text then holds only the answer)."""

    request_id: str
    tier: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: Usage
    route: RouteDecision | None  # first message only
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token (if asked)
    #: First message only (if asked): one per prompt token after the first.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_text: str = ""


@dataclass
class GenerateResult:
    """A whole answer collected from the stream."""

    request_id: str = ""
    tier: str = ""
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    route: RouteDecision | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_text: str = ""

    def add(self, d: GenerateDelta) -> None:
        """Joins one more delta of the stream."""
        self.request_id, self.tier = d.request_id, d.tier
        self.text += d.text
        self.token_ids.extend(d.token_ids)
        self.usage = d.usage
        self.route = self.route or d.route
        self.finish_reason = d.finish_reason or self.finish_reason
        self.logprobs.extend(d.logprobs)
        self.prompt_logprobs.extend(d.prompt_logprobs)
        self.tool_calls.extend(d.tool_calls)
        self.reasoning_text += d.reasoning_text


def _delta(msg: pb.GenerateResponse) -> GenerateDelta:
    return GenerateDelta(
        request_id=msg.request_id,
        tier=msg.tier,
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=finish_reason_from_proto(msg.finish_reason),
        usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens),
        route=route_decision_from_proto(msg.route) if msg.HasField("route") else None,
        logprobs=[token_logprob_from_proto(e) for e in msg.logprobs],
        prompt_logprobs=[token_logprob_from_proto(e) for e in msg.prompt_logprobs],
        tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in msg.tool_calls],
        reasoning_text=msg.reasoning_text,
    )


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _route_request(
    prompt: str | None,
    messages: Sequence[ChatMessage | dict[str, Any]] | None,
    prompt_token_ids: Sequence[int] | None,
    tier: str,
) -> pb.RouteRequest:
    req = pb.RouteRequest(tier=tier)
    _request_input(req, prompt, messages, prompt_token_ids)
    return req


def _request_input(
    msg: pb.GenerateRequest | pb.RouteRequest,
    prompt: str | None,
    messages: Sequence[ChatMessage | dict[str, Any]] | None,
    prompt_token_ids: Sequence[int] | None,
) -> None:
    """Fills the `input` oneof; ValueError when not exactly one form is given. A message may be
    an OpenAI-style dict with tool_calls ({id, type, function: {name, arguments}}) and
    tool_call_id."""
    if sum(x is not None for x in (prompt, messages, prompt_token_ids)) != 1:
        raise ValueError("input: exactly one of prompt, messages or prompt_token_ids must be given")
    if prompt is not None:
        msg.prompt = prompt
    elif messages is not None:
        for m in messages:
            if isinstance(m, ChatMessage):
                msg.messages.messages.add(role=m.role, content=m.content)
                continue
            turn = msg.messages.messages.add(role=m["role"], content=m.get("content") or "",
                                             tool_call_id=m.get("tool_call_id") or "")  # fmt: skip
            for c in m.get("tool_calls") or ():
                fn = c["function"]
                args = fn.get("arguments", "{}")
                turn.tool_calls.add(id=c.get("id", ""), name=fn["name"],
                                    arguments=args if isinstance(args, str) else json.dumps(args))  # fmt: skip
    else:
        msg.prompt_token_ids.ids.extend(prompt_token_ids or ())


S = TypeVar("S", Iterator["GenerateDelta"], AsyncIterator["GenerateDelta"])


class _Generate(abc.ABC, Generic[S]):
    """Generate's request, built the same way by both clients (`_stream` sends it)."""

    @abc.abstractmethod
    def _stream(self, req: pb.GenerateRequest) -> S: ...

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | dict[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        tier: str = "",
        request_id: str = "",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        min_tokens: int | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        json_schema: str | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: dict[int, float] | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
        skip_special_tokens: bool | None = None,
    ) -> S:
        """Streams deltas. Breaking out of the loop (or closing it) cancels the generation.
        logprobs=k: each delta carries its tokens' log-probabilities and k likeliest tokens;
        prompt_logprobs=k: the first carries the prompt tokens' (all but the first);
        json_schema: the text of a JSON Schema the output must follow (structured output).
        tools (chat only): OpenAI's function tools, {type: function, function: {name,
        description, parameters}} (or the function dict alone); tool_choice: "auto", "none",
        "required" or {type: function, function: {name}}."""
        req = pb.GenerateRequest(request_id=request_id, tier=tier)
        _request_input(req, prompt, messages, prompt_token_ids)
        for t in tools or ():
            fn = t.get("function", t)
            params = fn.get("parameters")
            req.tools.add(name=fn["name"], description=fn.get("description", ""),
                          parameters="" if params is None else json.dumps(params))  # fmt: skip
        if isinstance(tool_choice, str):
            req.tool_choice.mode = tool_choice
        elif tool_choice is not None:
            req.tool_choice.function = tool_choice["function"]["name"]
        if parallel_tool_calls is not None:
            req.parallel_tool_calls = parallel_tool_calls
        s = req.sampling
        s.stop.extend(stop)
        s.ignore_eos = ignore_eos
        s.logit_bias.update(logit_bias or {})
        # optional fields: set only what the caller gave, absence means the server's default
        optional = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                    "top_k": top_k, "seed": seed, "logprobs": logprobs, "min_tokens": min_tokens,
                    "prompt_logprobs": prompt_logprobs, "json_schema": json_schema,
                    "repetition_penalty": repetition_penalty,
                    "presence_penalty": presence_penalty,
                    "frequency_penalty": frequency_penalty,
                    "skip_special_tokens": skip_special_tokens}  # fmt: skip
        for name, value in optional.items():
            if value is not None:
                setattr(s, name, value)
        return self._stream(req)


class MoerayClient(_Generate[Iterator[GenerateDelta]]):
    """A blocking client over one gRPC channel. Thread-safe (gRPC channels are)."""

    def __init__(
        self,
        target: str,
        timeout: float | None = None,
        channel: grpc.Channel | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        """target: "host:port". timeout: per-call deadline in seconds (None = no deadline)."""
        opts = _channel_options(max_message_bytes)
        self._channel = channel or grpc.insecure_channel(target, options=opts)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> MoerayClient:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _as_error(e) from None

    def _stream(self, req: pb.GenerateRequest) -> Iterator[GenerateDelta]:
        call = self._stub.Generate(req, timeout=self.timeout)
        try:
            for msg in call:
                yield _delta(msg)
        except grpc.RpcError as e:
            raise _as_error(e) from None
        finally:
            call.cancel()  # no-op when the stream ended; stops the server when we broke out

    def generate_text(self, prompt: str | None = None, **kwargs: Any) -> GenerateResult:
        """Runs generate to the end and joins the deltas."""
        out = GenerateResult()
        for d in self.generate(prompt, **kwargs):
            out.add(d)
        return out

    def route(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | dict[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        tier: str = "",
    ) -> RouteDecision:
        """The router's dry-run decision for this input."""
        return route_decision_from_proto(
            self.route_features(
                prompt, messages=messages, prompt_token_ids=prompt_token_ids, tier=tier
            ).route
        )

    def route_features(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | dict[str, str]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        tier: str = "",
    ) -> pb.RouteResponse:
        """The whole Route answer: the decision and the policy's feature values."""
        req = _route_request(prompt, messages, prompt_token_ids, tier)
        return self._unary(self._stub.Route, req)

    def list_tiers(self) -> pb.ListTiersResponse:
        return self._unary(self._stub.ListTiers, pb.ListTiersRequest())

    def cluster_status(self, tier: str = "") -> pb.GetClusterStatusResponse:
        return self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(tier=tier))

    def abort(self, request_id: str) -> bool:
        """Stops a running generation; False when the server knew no such request."""
        if not request_id:
            raise ValueError("request_id must not be empty")
        return bool(self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id)).found)


class AsyncMoerayClient(_Generate[AsyncIterator[GenerateDelta]]):
    """The same client for asyncio (grpc.aio), on the event loop it is first used from.

        async with AsyncMoerayClient("localhost:50051") as c:
            async for delta in c.generate("hi", max_tokens=16):
                print(delta.text, end="")

    `generate` takes what MoerayClient.generate takes and returns an async iterator; leaving
    it early (break, or `aclose()` for a prompt stop) cancels the RPC and frees the request's
    KV blocks on the server.
    """

    def __init__(
        self, target: str, timeout: float | None = None, max_message_bytes: int = 4 * 1024 * 1024
    ) -> None:
        """target: "host:port". timeout: per-call deadline in seconds (None = no deadline)."""
        self._channel = grpc.aio.insecure_channel(
            target, options=_channel_options(max_message_bytes)
        )
        self._stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncMoerayClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _as_error(e) from None

    async def _stream(self, req: pb.GenerateRequest) -> AsyncIterator[GenerateDelta]:
        call = self._stub.Generate(req, timeout=self.timeout)
        try:
            async for msg in call:
                yield _delta(msg)
        except grpc.RpcError as e:
            raise _as_error(e) from None
        finally:
            call.cancel()  # no-op when the stream ended; stops the server when we left early

    async def generate_text(self, prompt: str | None = None, **kwargs: Any) -> GenerateResult:
        """Runs generate to the end and joins the deltas."""
        out = GenerateResult()
        async for d in self.generate(prompt, **kwargs):
            out.add(d)
        return out

    async def route(
        self,
        prompt: str | None = None,
        *,
        messages: Sequence[ChatMessage | dict[str, Any]] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        tier: str = "",
    ) -> RouteDecision:
        """The router's dry-run decision for this input."""
        req = _route_request(prompt, messages, prompt_token_ids, tier)
        return route_decision_from_proto((await self._unary(self._stub.Route, req)).route)

    async def list_tiers(self) -> pb.ListTiersResponse:
        return await self._unary(self._stub.ListTiers, pb.ListTiersRequest())

    async def cluster_status(self, tier: str = "") -> pb.GetClusterStatusResponse:
        return await self._unary(self._stub.GetClusterStatus, pb.GetClusterStatusRequest(tier=tier))

    async def abort(self, request_id: str) -> bool:
        """Stops a running generation; False when the server knew no such request."""
        if not request_id:
            raise ValueError("request_id must not be empty")
        answer = await self._unary(self._stub.Abort, pb.AbortRequest(request_id=request_id))
        return bool(answer.found)
