"""OpenAI function tools on chat requests (the HTTP chat endpoint, and gRPC Generate with
messages: router/ingress.py).

tool_choice "required" or a named function holds the output to the calls' JSON with structured
output (workers/guided.py), as vLLM does for those choices; the output is then returned as
tool_calls. "auto" (OpenAI's default when tools are given) lets the model answer or call: the
calls are told from text by a parser for the model's own tool-call format, the tier's
`tool_call_parser` (vLLM's --tool-call-parser); without one, "auto" is refused. The tools reach
the chat template either way, and an assistant turn's calls and the tool turns that answer them
are rendered as the template expects (arguments as an object, as vLLM passes them).

Parsers (ToolCallStream, one streamed delta at a time; `parse_calls` for a whole output):

- hermes (Qwen2.5, Qwen3, Qwen3-MoE, Hermes): each call is a JSON object {"name", "arguments"}
  between <tool_call> and </tool_call>. As vLLM's hermes parser: the text before the first call
  is the content, text between and after calls is dropped, a call left open when the output
  ends is parsed from what there is. Unlike it, a block that is no call (not such an object) is
  returned as content, tags and all, instead of turning the whole output into content: a stream
  cannot take back calls it has sent, and the two forms must agree.
- pythonic (Llama 3.2, Llama 4 Scout / Maverick; vLLM's pythonic and llama4_pythonic): the
  whole output is a Python list of calls with keyword arguments of literal values,
  `[get_weather(city="Paris"), now()]` (Llama 4's <|python_start|> and <|python_end|> around it
  are dropped). An output that starts with "[" (or that tag) is held until it ends, then
  returned as the calls if it is such a list, else as content; any other output is content as
  it comes.
- mistral (Mixtral 8x22B Instruct and Mistral's other tool-calling models; vLLM's mistral):
  the calls follow the control token [TOOL_CALLS], as a JSON list of {"name", "arguments"}
  (v3 tokenizers) or as `name[ARGS]{...}` after each [TOOL_CALLS] (v11 and later). The text
  before it is content as it comes; from it on, the output is held until it ends, then
  returned as the calls if it is either form, else as content. Control tokens reach the text
  only with skip_special_tokens off, which the front doors set for every request the tier's
  parser reads (tools with tool_choice auto), as vLLM does.
- deepseek_v3 (DeepSeek-V3, R1, V3.1; vLLM's deepseek_v3 and deepseek_v31): calls between
  <｜tool▁calls▁begin｜> and <｜tool▁calls▁end｜>, each between <｜tool▁call▁begin｜> and
  <｜tool▁call▁end｜> as `function<｜tool▁sep｜>NAME` and its arguments fenced as ```json
  (V3, R1) or `NAME<｜tool▁sep｜>{...}` (V3.1). As hermes: content until the calls open, each
  call sent whole when its closing tag comes, a block that is no call left as text.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from moeray.cluster.config import MoerayConfig
from moeray.router.convert import RequestError, RequestLimits, template_tool_call
from moeray.router.reasoning import held_back

#: A tool's name, as OpenAI allows it.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: What "parameters" means when a function has none.
NO_PARAMETERS = {"type": "object", "properties": {}}
#: The forced mode of tool_choice "required"; the other forced mode is the function's name,
#: which TOOL_NAME keeps from ever being this.
REQUIRED = "(required)"
#: tool_call_parser values (TierConfig), and hermes' tags.
TOOL_CALL_PARSERS = ("hermes", "pythonic", "mistral", "deepseek_v3")
CALL_START, CALL_END = "<tool_call>", "</tool_call>"
#: Mistral's control tokens around calls (in the text only with skip_special_tokens off).
MISTRAL_CALLS, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"
#: DeepSeek-V3's (and R1's, V3.1's) special tokens around calls (<｜tool▁calls▁end｜> after the
#: last call is text outside the calls: dropped, as hermes drops text after its calls).
DS_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = (
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
)
#: Llama 4's tags around a pythonic list, when the detokenizer keeps special tokens.
PYTHON_START, PYTHON_END = "<|python_start|>", "<|python_end|>"


def message_tool_calls(i: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """messages[i].tool_calls (OpenAI: arguments as JSON text) -> the form chat templates take
    (arguments as an object); RequestError naming the field otherwise."""
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(fn, dict):
            raise RequestError(where, "must be {type: function, function: {name, arguments}}")
        out.append(template_tool_call(f"{where}.function", str(call.get("id", "")),
                                      fn.get("name"), fn.get("arguments", "{}")))  # fmt: skip
    return out


def forced_tools(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel: bool,
    unparsed: list[str],
) -> tuple[tuple[dict[str, Any], ...] | None, str | None, str]:
    """(the tools for the chat template, the JSON Schema the output must follow or None, the
    mode: "" for text or "auto", REQUIRED, or the name of the function to call); RequestError
    naming the field for bad tools or a choice moeray cannot honour. unparsed: the tiers the
    request may land on that have no tool_call_parser ("auto" needs none of them).

    "required" is vLLM's form: a JSON array of {"name": <one of the tools>, "parameters": its
    schema}, at least one item, at most one without parallel tool calls."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise RequestError("tool_choice", "needs tools")
        return None, None, ""
    params: dict[str, dict[str, Any]] = {}
    for j, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type") != "function" or not isinstance(fn, dict):
            raise RequestError(f"tools[{j}]", "must be {type: function, function: {name, ...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in params:
            raise RequestError(f"tools[{j}].function.name",
                               "must be a unique name of 1-64 letters, digits, _ or -")  # fmt: skip
        schema = fn.get("parameters", NO_PARAMETERS)
        if not isinstance(schema, dict):
            raise RequestError(f"tools[{j}].function.parameters", "must be a JSON Schema object")
        params[name] = schema
    choice = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return tuple(tools), None, ""
    if choice == "auto":
        if unparsed:
            raise RequestError("tool_choice", "auto needs the tier's tool_call_parser, which "
                               f"tier {unparsed[0]!r} does not set; use \"required\" or name "
                               "a function")  # fmt: skip
        return tuple(tools), None, ""
    if choice == "required":
        calls = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "parameters"],
                  "properties": {"name": {"const": n}, "parameters": p}}
                 for n, p in params.items()]  # fmt: skip
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            array["maxItems"] = 1
        return tuple(tools), json.dumps(array), REQUIRED
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or name not in params:
        raise RequestError("tool_choice", "must be none, auto, required or "
                           "{type: function, function: {name}} naming one of the tools")  # fmt: skip
    return tuple(tools), json.dumps(params[name]), name


def unparsed_tiers(config: MoerayConfig, limits: RequestLimits, tier: str) -> list[str]:
    """The tiers a request for `tier` may land on that set no tool_call_parser (forced_tools'
    `unparsed`: tool_choice "auto" needs none of them)."""
    parsers = {t.name: t.tool_call_parser for t in config.tiers}
    return [t for t in limits.candidate_tiers(tier) if not parsers.get(t)]


def tool_calls(mode: str, text: str) -> list[dict[str, Any]] | None:
    """The calls in a forced call's output (OpenAI's shape, arguments as JSON text, a fresh id
    each); None when the output is no complete call (it hit max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    pairs = [(v["name"], v["parameters"]) for v in value] if mode == REQUIRED else [(mode, value)]
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
            for n, a in pairs]  # fmt: skip


def _call(name: str, args: dict[str, Any]) -> dict[str, Any] | None:
    """A call in OpenAI's shape (arguments as JSON text, a fresh id); None when the arguments
    have no JSON form (NaN or infinity, a set or bytes from a pythonic literal)."""
    try:
        text = json.dumps(args, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": text}}  # fmt: skip


def _hermes_call(block: str) -> dict[str, Any] | None:
    """The call in the JSON between hermes' tags; None if it is none."""
    try:
        value = json.loads(block)
    except ValueError:
        return None
    return _hermes_like(value)


def _hermes_like(item: Any) -> dict[str, Any] | None:
    """{"name": ..., "arguments": {...}} as a call; None if it is none."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    args = item.get("arguments", {})
    return _call(item["name"], args) if isinstance(args, dict) else None


def _mistral_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls after Mistral's [TOOL_CALLS]: a JSON list of {"name", "arguments"} (v3
    tokenizers: Mixtral 8x22B Instruct, Mistral 7B Instruct v0.3) or, per call,
    `[TOOL_CALLS]name[ARGS]{...}` (v11 and later: Mistral Small 3.1+); None if it is neither."""
    calls: list[dict[str, Any]] = []
    for part in text.split(MISTRAL_CALLS)[1:]:
        part = part.strip()
        if part.startswith("["):
            try:
                items = json.loads(part)
            except ValueError:
                return None
            found = [_hermes_like(i) for i in items] if isinstance(items, list) else [None]
        else:
            name, sep, args = part.partition(MISTRAL_ARGS)
            try:
                value = json.loads(args) if sep and TOOL_NAME.fullmatch(name) else None
            except ValueError:
                return None
            found = [_call(name, value) if isinstance(value, dict) else None]
        if not found or None in found:
            return None
        calls.extend(c for c in found if c is not None)
    return calls or None


def _deepseek_call(block: str) -> dict[str, Any] | None:
    """One DeepSeek call: `function<sep>NAME` + a ```json fenced object (V3, R1) or
    `NAME<sep>{...}` (V3.1); None if it is neither."""
    left, sep, right = block.partition(DS_SEP)
    left, right = left.strip(), right.strip()
    if not sep:
        return None
    if left == "function" and not right.startswith("{"):  # V3: the name, then the fenced JSON
        name, _, fenced = right.partition("\n")
        body = fenced.strip().removeprefix("```json").removeprefix("```").removesuffix("```")
    else:
        name, body = left, right
    try:
        args = json.loads(body)
    except ValueError:
        return None
    name = name.strip()
    return _call(name, args) if TOOL_NAME.fullmatch(name) and isinstance(args, dict) else None


def _pythonic_calls(text: str) -> list[dict[str, Any]] | None:
    """The calls of a Python list of calls with literal keyword arguments; None if it is none."""
    try:
        text = text.strip().removeprefix(PYTHON_START).removesuffix(PYTHON_END)
        tree = ast.parse(text.strip(), mode="eval").body
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or node.args or not isinstance(node.func, ast.Name):
                return None
            args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
            if None in args:  # **kwargs
                return None
            call = _call(node.func.id, args)  # type: ignore[arg-type]
            if call is None:
                return None
            calls.append(call)
        return calls
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        return None


#: The tag-delimited formats: (the tag that opens the calls, a call's opening and closing tags,
#: the parser of what is between them).
TAGGED: dict[str, tuple[str, str, str, Callable[[str], dict[str, Any] | None]]] = {
    "hermes": (CALL_START, CALL_START, CALL_END, _hermes_call),
    "deepseek_v3": (DS_CALLS_BEGIN, DS_CALL_BEGIN, DS_CALL_END, _deepseek_call),
}


class ToolCallStream:
    """Tells one streamed output's content from its calls (the module's parsers), a delta at a
    time, holding back text that may be the start of a tag; `calls` counts the calls sent."""

    def __init__(self, parser: str) -> None:
        if parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {TOOL_CALL_PARSERS}, got {parser!r}")
        self.parser = parser
        self.pending = ""  # received, not yet sent
        self.inside = False  # hermes: within a call's tags; pythonic: within a list
        self.opened = False  # a call has begun (pythonic: the output's start is decided)
        self.calls = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """(content, calls) to send for this delta; final=True flushes what is held."""
        self.pending += delta
        step = {"pythonic": self._pythonic, "mistral": self._mistral}.get(self.parser, self._tagged)
        content, calls = step(final)
        self.calls += len(calls)
        return content, calls

    def _pythonic(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        if not self.opened:
            head = self.pending.lstrip()
            if not final and (not head or (PYTHON_START.startswith(head) and head != PYTHON_START)):
                return "", []  # only whitespace, or maybe Llama 4's tag, yet: undecided
            self.opened = True
            self.inside = head.startswith("[") or head.startswith(PYTHON_START)
        if self.inside and not final:
            return "", []  # a list of calls, or text that starts like one: held to the end
        text, self.pending = self.pending, ""
        calls = _pythonic_calls(text) if self.inside else None
        return ("", calls) if calls else (text, [])

    def _mistral(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content = ""
        if not self.inside:
            start = self.pending.find(MISTRAL_CALLS)
            if start < 0:
                keep = 0 if final else held_back(self.pending, MISTRAL_CALLS)
                content = self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return content, []
            content, self.pending = self.pending[:start], self.pending[start:]
            self.inside = True
        if not final:
            return content, []  # the calls are held to the end of the output
        text, self.pending = self.pending, ""
        calls = _mistral_calls(text)
        return (content, calls) if calls else (content + text, [])

    def _tagged(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """hermes and deepseek_v3: content until the calls open, then each call between its
        tags (a block that is no call stays text, tags and all); text between calls is dropped."""
        section, start_tag, end_tag, parse = TAGGED[self.parser]
        content, calls = "", []
        while True:
            if self.inside:
                end = self.pending.find(end_tag)
                if end < 0 and not final:
                    break
                block = self.pending if end < 0 else self.pending[:end]
                self.pending = "" if end < 0 else self.pending[end + len(end_tag) :]
                self.inside = False
                call = parse(block)
                if call is None:
                    content += start_tag + block + (end_tag if end >= 0 else "")
                else:
                    calls.append(call)
                continue
            tag = start_tag if self.opened else section
            at = self.pending.find(tag)
            if at < 0:
                keep = 0 if final else held_back(self.pending, tag)
                if not self.opened:
                    content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                break
            if not self.opened:
                content += self.pending[:at]
                self.opened = True
                if tag != start_tag:  # a section's opening tag (deepseek_v3) is consumed
                    self.pending = self.pending[at + len(tag) :]
                    continue
            self.pending = self.pending[at + len(start_tag) :]
            self.inside = True
        return content, calls


def parse_calls(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, calls) of a whole output; None where there is none. The same as streaming it."""
    content, calls = ToolCallStream(parser).feed(text, final=True)
    return content or None, calls or None
