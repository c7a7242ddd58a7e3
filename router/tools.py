"""OpenAI function tools on the chat endpoint, forced calls only: tool_choice "required" or a
named function holds the output to the calls' JSON with structured output (workers/guided.py),
as vLLM does for those choices; the output is then returned as tool_calls.

"auto" is refused: telling a call from text in free output needs a parser for the model's own
tool-call format (vLLM's --tool-call-parser hermes / mistral / llama3_json ...). The tools
reach the chat template either way, and an assistant turn's calls and the tool turns that answer
them are rendered as the template expects (arguments as an object, as vLLM passes them).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from moeray.router.convert import RequestError

#: A tool's name, as OpenAI allows it.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: What "parameters" means when a function has none.
NO_PARAMETERS = {"type": "object", "properties": {}}


def message_tool_calls(i: int, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """messages[i].tool_calls (OpenAI: arguments as JSON text) -> the form chat templates take
    (arguments as an object); RequestError naming the field otherwise."""
    out = []
    for j, call in enumerate(calls):
        where = f"messages[{i}].tool_calls[{j}]"
        fn = call.get("function")
        if call.get("type", "function") != "function" or not isinstance(fn, dict):
            raise RequestError(where, "must be {type: function, function: {name, arguments}}")
        name, args = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not name:
            raise RequestError(f"{where}.function.name", "must be a non-empty string")
        try:
            parsed = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise RequestError(f"{where}.function.arguments", "must be JSON text") from None
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": name, "arguments": parsed}})  # fmt: skip
    return out


def forced_tools(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, parallel: bool
) -> tuple[tuple[dict[str, Any], ...] | None, str | None, str]:
    """(the tools for the chat template, the JSON Schema the output must follow or None, the
    mode: "" for text, "required", or the name of the function to call); RequestError naming
    the field for bad tools or a choice moeray cannot honour.

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
        raise RequestError("tool_choice", "auto needs a tool-call parser for the model, which "
                           "moeray does not have; use \"required\" or name a function")  # fmt: skip
    if choice == "required":
        calls = [{"type": "object", "additionalProperties": False,
                  "required": ["name", "parameters"],
                  "properties": {"name": {"const": n}, "parameters": p}}
                 for n, p in params.items()]  # fmt: skip
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not parallel:
            array["maxItems"] = 1
        return tuple(tools), json.dumps(array), "required"
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or name not in params:
        raise RequestError("tool_choice", "must be none, auto, required or "
                           "{type: function, function: {name}} naming one of the tools")  # fmt: skip
    return tuple(tools), json.dumps(params[name]), name


def tool_calls(mode: str, text: str) -> list[dict[str, Any]] | None:
    """The calls in a forced call's output (OpenAI's shape, arguments as JSON text, a fresh id
    each); None when the output is no complete call (it hit max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    pairs = [(v["name"], v["parameters"]) for v in value] if mode == "required" else [(mode, value)]
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
            for n, a in pairs]  # fmt: skip
