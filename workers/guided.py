"""Structured output: a request's output held to a grammar, as the tokens allowed at each step.

A request whose SamplingParams.json_schema is set gets an llguidance matcher over the engine's
tokenizer (`Guides`, one per engine: llguidance builds its token trie from tokenizer.json once,
~30 ms for a 32K vocabulary). Each step the engine sets the logits of the tokens the grammar
does not allow next to -inf (`mask_disallowed`, on the copy the penalties use, so logprobs stay
those of the raw logits), samples, and feeds the token to the matcher (`consume_token`);
when the grammar allows nothing more (the JSON value is closed) the request stops there, without
a step to sample EOS. vLLM's structured outputs work the same way with the same library (its
"guidance" backend) or xgrammar.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from llguidance import LLMatcher, LLTokenizer
from moeray.workers.io_struct import InvalidRequest
from moeray.workers.tokenizer import Tokenizer

if TYPE_CHECKING:  # a TypedDict of llguidance's type stubs only
    from llguidance._lib import JsonCompileOptions

_BITS = torch.arange(32, dtype=torch.int32)  # bit i of each 32-bit word of a token bitmask
MAX_TEMPLATES = 64  # compiled schemas kept per engine
#: JSON as Python's json.dumps writes it (", " and ": ", no other whitespace): with llguidance's
#: default, any whitespace between tokens, a weak model can pad with spaces until max_tokens
#: (vLLM's disable_any_whitespace).
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


def grammar(json_schema: str) -> str:
    """The llguidance grammar of JSON values following the schema (its text)."""
    return LLMatcher.grammar_from_json_schema(json_schema, defaults=JSON_OPTIONS)


class Guides:
    """Matchers for one engine's tokenizer and vocabulary (logit rows of vocab_size).

    A schema's grammar is compiled once (llguidance: ~1 ms for a small schema, 20 ms for 45 KB,
    more for a huge one) into a template matcher, kept for the last MAX_TEMPLATES schemas; each
    request gets a copy. The engine compiles where it checks a request (`process_input`, off
    its step loop in a served engine), so the step loop only copies; this is also where a schema
    llguidance cannot follow is refused (SamplingParams.validate, which the router runs on its
    event loop, checks only its form)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = LLTokenizer(
            tokenizer.to_json(), n_vocab=vocab_size, eos_token=eos_token_ids
        )
        self._templates: OrderedDict[str, LLMatcher] = OrderedDict()

    def matcher(self, json_schema: str) -> LLMatcher:
        """A fresh matcher for output following the JSON Schema (text); InvalidRequest naming
        json_schema when llguidance cannot follow it with this tokenizer."""
        template = self._templates.get(json_schema)
        if template is None:
            template = LLMatcher(self.tokenizer, grammar(json_schema), log_level=0)
            if template.is_error():
                raise InvalidRequest(
                    "json_schema", f"is not a schema moeray can follow: {template.get_error()}"
                )
            self._templates[json_schema] = template
            while len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)
        return template.deep_copy()


def mask_disallowed(row: torch.Tensor, matcher: LLMatcher) -> None:
    """Sets row [V]'s logits of the tokens `matcher` does not allow next to -inf (in place)."""
    words = torch.frombuffer(
        bytearray(matcher.compute_bitmask()), dtype=torch.int32
    )  # [ceil(V/32)]
    allowed = ((words[:, None] >> _BITS) & 1).view(-1)[: row.shape[0]]  # [V] 0/1
    row.masked_fill_(allowed.to(row.device) == 0, float("-inf"))
