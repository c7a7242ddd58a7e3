"""The OpenAI-compatible HTTP API of the front door (FastAPI, served by the router replica's
uvicorn, router/front_door.py).

Endpoints: POST /v1/chat/completions, POST /v1/completions (both streaming as server-sent events
ending in `data: [DONE]`, or one JSON body), GET /v1/models (the tiers, their checkpoint names and
"auto"), GET /health, GET /metrics (Prometheus). `model` is "auto" (the router decides), a tier
name, a role ("fast", "reasoning") or a tier's checkpoint folder name.

JSON is converted to the same dataclasses the gRPC path uses, with the same validation
(router/convert.py: build_route_input, check_sampling). Parsing is strict: a boolean is no
integer (`"max_tokens": true` is refused), a string no number; a body nested deeper than
Python's JSON decoder goes is refused as `body`. OpenAI fields moeray does not implement
(`functions`, `best_of`, `suffix`, chat's `echo`, ...) are refused by name unless they
hold their neutral value, and so are fields OpenAI does not define (OpenAI does the same).
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}} with the field in
`param` and in the message: 400 invalid_request_error, 429 rate_limit_exceeded and 503 (both
with Retry-After), 500 server_error. A stream is opened only after the engine accepted the
request, so refusals always get a status code; every refusal is counted in
moeray_requests_total (tier "" when it was refused before a tier was chosen).
The route decision is returned in the headers x-moeray-tier, x-moeray-route-score and
x-moeray-route-fallback; non-streamed responses also carry x-moeray-engine-time-ms. This module
turns requests into engine calls; router/openai_responses.py turns the outputs into responses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from moeray.router.convert import RequestError, build_route_input, check_sampling
from moeray.router.messages import ChatMessage, GenerateCall, RouteInput
from moeray.router.metrics import CONTENT_TYPE
from moeray.router.openai_responses import (
    Choices,
    Echo,
    complete_response,
    route_headers,
    sse_events,
    start_choices,
)
from moeray.router.service import EngineUnavailable, InferenceService, Overloaded
from moeray.router.tools import (
    forced_tools,
    message_tool_calls,
    unparsed_tiers,
)
from moeray.workers.io_struct import SamplingParams
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)

#: max_tokens when a request gives none: OpenAI's legacy completions default, and a bounded
#: default for chat (OpenAI's is "up to the context", which a CPU demo would take minutes for).
DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 256

#: OpenAI fields moeray does not implement, with the values that ask for nothing (accepted and
#: ignored); any other value is refused naming the field.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,), "web_search_options": (None,),
}  # fmt: skip
#: The most choices (`n`) one request may ask for, as OpenAI's API; each choice is an engine
#: request of its own (and a seat of router.max_inflight_per_tier, which may lower this).
MAX_CHOICES = 128
#: OpenAI fields that change nothing moeray does: accepted and ignored whatever they hold.
IGNORED = frozenset({"user", "metadata", "store", "service_tier"})


class _Params(BaseModel):
    """Fields shared by both endpoints (strict types); other fields: see UNSUPPORTED, IGNORED."""

    model_config = ConfigDict(extra="allow", strict=True)
    model: str = "auto"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension
    min_tokens: int = 0  # vLLM's extension
    stop_token_ids: list[int] | None = None  # vLLM's extension
    skip_special_tokens: bool = True  # vLLM's extension
    #: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema":
    #: {"name": ..., "schema": {...}}}: structured output (workers/guided.py)
    response_format: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's extension
    logit_bias: dict[str, float] | None = None  # token id (as a JSON key) -> bias


class _ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked against MESSAGE_FIELDS, never dropped
    role: str
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # the call a tool turn answers


#: Message fields beyond role, content, tool_calls and tool_call_id, with the values that change
#: nothing (accepted and ignored: `name` labels a participant, which chat templates do not
#: render); any other value would change the conversation if dropped: refused.
MESSAGE_FIELDS: dict[str, tuple[Any, ...]] = {
    "name": (), "refusal": (None,), "function_call": (None,), "audio": (None,),
}  # fmt: skip


class ChatCompletionRequest(_Params):
    messages: list[_ChatMessageIn]
    #: OpenAI's function tools: [{"type": "function", "function": {"name", "description",
    #: "parameters"}}], shown to the model by the chat template; tool_choice "required" or a
    #: named function holds the output to the calls' JSON (structured output), "none" to text.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True  # False: "required" makes exactly one call
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Params):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(...)
    logprobs: int | None = None
    #: The prompt before the completion (and its tokens' logprobs before theirs); with
    #: max_tokens 0, the prompt alone (scoring a text: what lm-eval's loglikelihood asks).
    echo: bool = False

    @property
    def echo_only(self) -> bool:
        return self.echo and 0 in (self.max_tokens, self.max_completion_tokens)


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None, code: str) -> JSONResponse:
    kind = {400: "invalid_request_error", 429: "rate_limit_exceeded"}.get(status, "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"retry-after": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def _invalid(field: str, message: str) -> HttpError:
    return HttpError(400, f"{field} {message}", field, "invalid_value")


def _from_service_error(e: Exception, input_field: str) -> HttpError:
    """RequestError / Overloaded / EngineUnavailable -> HttpError; internal field names ->
    OpenAI's."""
    if isinstance(e, Overloaded):
        return HttpError(429, str(e), None, "overloaded")
    if isinstance(e, EngineUnavailable):
        return HttpError(503, str(e), None, "unavailable")
    assert isinstance(e, RequestError)
    field = {"tier": "model", "input": input_field, "prompt": input_field,
             "prompt_token_ids": input_field, "json_schema": "response_format"}.get(
        e.field, e.field)  # fmt: skip
    return HttpError(400, f"{field} {e.message}", field, "invalid_value")


# ---- JSON -> dataclasses ---------------------------------------------------------------------

#: The most a request body holds besides its prompt text (roles, sampling fields, stop strings),
#: and the most bytes JSON spends on one character of it (a surrogate pair, "\ud83d\ude00"). A
#: tier's limit counts UTF-8 bytes of a prompt and characters of chat messages, never fewer
#: than the characters, so JSON_BYTES_PER_CHAR x the limit bounds either.
BODY_OVERHEAD_BYTES, JSON_BYTES_PER_CHAR = 2**20, 12


def _check_body_size(body: bytes, prompt_limit: int) -> bytes:
    """The body, unless it is longer than any request a tier takes (the longest prompt any tier
    announced, 0 while unknown): then refused unparsed, since decoding and validating megabytes
    of JSON on the router's event loop stalls every stream it forwards. (Refusing on the
    Content-Length header before reading would be sooner, but a client still sending its body
    then gets a connection reset instead of the 400.)"""
    bound = JSON_BYTES_PER_CHAR * prompt_limit + BODY_OVERHEAD_BYTES
    if prompt_limit and len(body) > bound:
        raise _invalid(
            "body", f"is {len(body)} bytes; no tier takes a prompt over {prompt_limit} bytes "
            f"of UTF-8, and no request holding one is over {bound} bytes",
        )  # fmt: skip
    return body


def _parse(body: bytes, model: type[_Params]) -> Any:
    """The request body, validated strictly; HttpError naming the field (or `body`)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _invalid("body", f"is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _invalid("body", f"is not valid JSON: {e.msg} at offset {e.pos}") from None
    except RecursionError:
        raise _invalid("body", "is nested too deeply") from None
    if not isinstance(obj, dict):
        raise _invalid("body", f"must be a JSON object, got {type(obj).__name__}")
    try:
        req = model.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        raise _invalid(_loc(err["loc"]), f"is invalid: {err['msg']}") from None
    except RecursionError:
        raise _invalid("body", "is nested too deeply") from None
    _check_extra(req.model_extra or {})
    return req


def _loc(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location -> "messages[0].role" (union member tags such as 'list[int]'
    left out)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" not in part and part not in ("str", "int", "float", "bool", "dict", "list"):
            out += f".{part}" if out else part
    return out or "body"


def _same(value: Any, neutral: Any) -> bool:
    """value == neutral, with booleans and numbers kept apart (False is no 0)."""
    if neutral is None or value is None:
        return value is neutral
    return bool(value == neutral) and isinstance(value, bool) == isinstance(neutral, bool)


def _check_extra(extra: dict[str, Any]) -> None:
    """Fields beyond _Params: neutral values of UNSUPPORTED ones and IGNORED ones pass."""
    for name, value in extra.items():
        if name in IGNORED:
            continue
        neutral = UNSUPPORTED.get(name)
        if neutral is None:
            raise HttpError(400, f"{name} is not a parameter moeray knows", name,
                            "unknown_parameter")  # fmt: skip
        if not any(_same(value, v) for v in neutral):
            raise HttpError(400, f"{name} is not supported by moeray", name,
                            "unsupported_parameter")  # fmt: skip


def _utf8(field: str, text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid(field, "is not valid UTF-8 (it holds a lone surrogate)") from None
    return text


def _chat_messages(req: ChatCompletionRequest) -> list[ChatMessage]:
    out = []
    for i, m in enumerate(req.messages):
        for name, value in (m.model_extra or {}).items():
            neutral = MESSAGE_FIELDS.get(name)
            if neutral is None:
                raise HttpError(400, f"messages[{i}].{name} is not a message field moeray knows",
                                f"messages[{i}].{name}", "unknown_parameter")  # fmt: skip
            if name == "name" and not isinstance(value, str):
                raise _invalid(f"messages[{i}].name", "must be a string")
            if neutral and not any(_same(value, v) for v in neutral):
                raise HttpError(400, f"messages[{i}].{name} is not supported by moeray",
                                f"messages[{i}].{name}", "unsupported_parameter")  # fmt: skip
        content = m.content
        if isinstance(content, list):  # OpenAI content parts: only text parts are supported
            if any(p.get("type") != "text" for p in content):
                raise _invalid(f"messages[{i}].content", "may only hold text parts")
            content = "".join(str(p.get("text", "")) for p in content)
        try:
            calls = message_tool_calls(i, m.tool_calls) if m.tool_calls else None
        except RequestError as e:
            raise _invalid(e.field, e.message) from None
        out.append(ChatMessage(m.role, _utf8(f"messages[{i}].content", content or ""),
                               tool_calls=calls, tool_call_id=m.tool_call_id))  # fmt: skip
    return out


def _tools(
    service: InferenceService, req: ChatCompletionRequest, tier: str
) -> tuple[tuple[dict[str, Any], ...] | None, str | None, str]:
    """router/tools.py's forced_tools on the request, its errors as HTTP 400s."""
    unparsed = unparsed_tiers(service.config, service.limits, tier) if req.tools else []
    try:
        return forced_tools(req.tools, req.tool_choice, req.parallel_tool_calls, unparsed)
    except RequestError as e:
        raise _invalid(e.field, e.message) from None


def _sampling(req: _Params, service: InferenceService, default_max: int) -> SamplingParams:
    most = min(MAX_CHOICES, service.config.router.max_inflight_per_tier)
    if not 1 <= req.n <= most:
        raise _invalid("n", f"must be in [1, {most}] (each choice takes a seat), got {req.n}")
    max_tokens = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    limit = service.limits.tokens_limit(req.model)
    if max_tokens is None:
        max_tokens = min(default_max, limit) if limit else default_max
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    logprobs_field, logprobs = _logprobs_asked(req)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
        seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos, min_tokens=req.min_tokens,
        logprobs=logprobs,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=_logit_bias(req.logit_bias),
        json_schema=_json_schema(req.response_format),
        skip_special_tokens=req.skip_special_tokens,
    )  # fmt: skip
    try:
        return check_sampling(params, limit, prefix="")
    except RequestError as e:
        given = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        field = {"max_tokens": given, "logprobs": logprobs_field,
                 "json_schema": "response_format"}.get(e.field, e.field)  # fmt: skip
        raise _invalid(field, e.message) from None


def _json_schema(fmt: dict[str, Any] | None) -> str | None:
    """OpenAI's response_format -> the JSON Schema text the engine holds the output to (None
    for plain text); SamplingParams.validate checks that llguidance can follow it."""
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return '{"type": "object"}'
    if kind != "json_schema":
        raise _invalid("response_format", "type must be text, json_object or json_schema")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _invalid("response_format", "json_schema must be an object with a schema")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise _invalid("response_format", "json_schema.schema must be a JSON Schema object")
    return json.dumps(schema)


def _logit_bias(given: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys) with integer keys."""
    out = {}
    for key, bias in (given or {}).items():
        if not key.isdigit():
            raise _invalid("logit_bias", f"keys must be token ids, got {key!r}")
        out[int(key)] = bias
    return out


def _logprobs_asked(req: _Params) -> tuple[str, int | None]:
    """(the field that sets it, how many alternatives per token, None for no logprobs):
    completions' `logprobs: k`; chat's `logprobs: true` with `top_logprobs: k` (default 0)."""
    if isinstance(req, ChatCompletionRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise _invalid("top_logprobs", "needs logprobs set to true")
        return "top_logprobs", (req.top_logprobs or 0) if req.logprobs else None
    return "logprobs", getattr(req, "logprobs", None)


def _model_to_tier(service: InferenceService, model: str) -> str:
    """model may name a tier's checkpoint folder: map it to that tier; else pass it through."""
    for t in service.config.tiers:
        if model == Path(t.model).name and model != t.name:
            return t.name
    return model


def _chat_call(service: InferenceService, req: ChatCompletionRequest) -> tuple[GenerateCall, str]:
    """The engine call of a chat request, and its forced tool mode (router/tools.py)."""
    req.model = _model_to_tier(service, req.model)
    msgs = _chat_messages(req)
    inp = _route_input(service, "messages", messages=msgs, tier=req.model)
    tools, schema, mode = _tools(service, req, inp.tier)
    params = _sampling(req, service, DEFAULT_CHAT_MAX_TOKENS)
    if req.tools and req.tool_choice in (None, "auto"):  # the tier's tool_call_parser reads it:
        params = dataclasses.replace(params, skip_special_tokens=False)  # control tokens kept
    if schema is not None:
        if params.json_schema is not None:
            raise _invalid("tool_choice", "cannot force a tool call and a response_format at once")
        params = dataclasses.replace(params, json_schema=schema)
    call = GenerateCall(f"chatcmpl-{uuid.uuid4().hex}", dataclasses.replace(inp, tools=tools),
                        params)  # fmt: skip
    return call, mode


def _completion_call(service: InferenceService, req: CompletionRequest) -> GenerateCall:
    req.model = _model_to_tier(service, req.model)
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise _invalid("prompt", "must be one prompt (batches are not supported)")
        prompt = prompt[0]
    if isinstance(prompt, str):
        inp = _route_input(service, "prompt", prompt=_utf8("prompt", prompt), tier=req.model)
    else:
        inp = _route_input(service, "prompt", prompt_token_ids=list(prompt), tier=req.model)
    if req.echo_only:  # the engine still computes one token (as vLLM does); it is not shown
        req = req.model_copy(update={"max_tokens": 1, "max_completion_tokens": None})
    params = _sampling(req, service, DEFAULT_COMPLETION_MAX_TOKENS)
    if req.echo and params.logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
    return GenerateCall(f"cmpl-{uuid.uuid4().hex}", inp, params, echo=req.echo)


def _route_input(service: InferenceService, input_field: str, **kwargs: Any) -> RouteInput:
    try:
        return build_route_input(service.limits, **kwargs)
    except RequestError as e:
        raise _from_service_error(e, input_field) from None


# ---- the app ---------------------------------------------------------------------------------


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that closes the request's stream however the response ends: when the
    client goes away, generation stops at once (engine call cancelled, KV freed, outcome
    counted) instead of whenever the garbage collector finalizes the generators."""

    def __init__(self, body: AsyncGenerator[str, None], source: Choices,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(body, **kwargs)
        self._body, self._source = body, source

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()
            await self._source.aclose()


def build_http_app(service: InferenceService) -> FastAPI:
    """The FastAPI app bound to one InferenceService (built on the router replica)."""
    app = FastAPI(title="moeray", docs_url=None, redoc_url=None)
    parsers = {t.name: t.reasoning_parser for t in service.config.tiers}  # tier -> parser
    calls_parsers = {t.name: t.tool_call_parser for t in service.config.tiers}

    async def serve(request: Request, kind: Literal["chat", "text"]) -> Response:
        input_field = "messages" if kind == "chat" else "prompt"
        try:
            body = _check_body_size(await request.body(), service.links.largest_prompt_limit())
            tool = ""  # a chat request's forced tool mode
            if kind == "chat":
                req: _Params = _parse(body, ChatCompletionRequest)
                call, tool = _chat_call(service, req)  # type: ignore[arg-type]
            else:
                req = _parse(body, CompletionRequest)
                call = _completion_call(service, req)  # type: ignore[arg-type]
        except HttpError as e:  # refused before routing: no tier yet
            service.metrics.requests.labels("", "http", "invalid").inc()
            return error_response(e.status, e.message, e.param, e.code)
        except ClientDisconnect:  # the client left while sending its body: nobody to answer
            service.metrics.requests.labels("", "http", "cancelled").inc()
            return Response(status_code=499)  # (never sent; no traceback logged)
        try:
            started = await start_choices(service, call, req.n)
        except (RequestError, Overloaded, EngineUnavailable) as e:
            err = _from_service_error(e, input_field)
            return error_response(err.status, err.message, err.param, err.code)
        rest = Choices([stream for _, stream in started])
        echo: Echo = ""
        if isinstance(req, CompletionRequest) and req.echo:
            echo = "only" if req.echo_only else "prompt"
        tier = started[0][0][0].tier
        parser = "" if kind != "chat" or tool else parsers.get(tier) or ""
        calls_parser = ""  # tool_choice auto: the tier's tool_call_parser tells calls from text
        if (
            isinstance(req, ChatCompletionRequest)
            and req.tools
            and req.tool_choice in (None, "auto")
        ):
            calls_parser = calls_parsers.get(tier) or ""
        if not req.stream:
            try:
                return await complete_response(
                    kind, started, rest, echo, tool, parser, calls_parser
                )
            except (Overloaded, EngineUnavailable) as e:  # lost mid-request: retryable
                err = _from_service_error(e, input_field)
                return error_response(err.status, err.message, err.param, err.code)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        return _ClosingStream(
            sse_events(kind, started, rest, include_usage, echo, tool, parser, calls_parser),
            rest,
            media_type="text/event-stream",
            headers=route_headers(started[0][0][0], call.request_id),
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, "text")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        ids = ["auto"] + [t.name for t in service.config.tiers]
        ids += [Path(t.model).name for t in service.config.tiers if Path(t.model).name not in ids]
        data = [{"id": i, "object": "model", "created": created, "owned_by": "moeray"} for i in ids]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> Response:
        ok = await service.healthy()
        return JSONResponse(
            {"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        await service.refresh_metrics()
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
