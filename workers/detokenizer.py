"""Incremental detokenization of one request's output, with stop strings.

Decoding token by token breaks characters whose UTF-8 bytes span several byte-level tokens, and
tokenizers whose decoders look at neighbours (SentencePiece's leading space). So, as vLLM does, we
decode a short window twice, `tokens[prefix:read]` and `tokens[prefix:]`, and take the difference
as the new text; while the window's text ends in U+FFFD (an incomplete character) nothing is
emitted and the bytes wait for the next token. Stop strings are searched in the text around the
new piece, so they match across token boundaries, and the text is cut before them. While a stop
string might still be completing, `stream_len()` holds its possible beginning back from streamed
deltas, so a client never sees part of a stop string.
"""

from __future__ import annotations

from moeray.workers.tokenizer import Tokenizer

# Tokens of the prompt decoded with the first outputs, so the first piece gets its leading space.
_PROMPT_CONTEXT = 4
# An incomplete character is at most 4 bytes: past that, a U+FFFD is a real invalid byte.
_MAX_HELD_TOKENS = 6


class IncrementalDetokenizer:
    __slots__ = ("_find_stop", "_ids", "_prefix", "_read", "_skip", "_stop", "_tok", "stopped",
                 "text")  # fmt: skip

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        context = prompt_ids[-_PROMPT_CONTEXT:]
        self._ids: list[int] = list(context)
        self._prefix = 0
        self._read = len(context)
        self._stop = stop
        self._find_stop = True  # as the last add() said: whether new text may end a stop string
        self.text = ""
        self.stopped = False  # a stop string was found; text ends before it

    def add(self, token_id: int, find_stop: bool = True) -> str:
        """Appends one output token; returns the text it completed ("" while bytes are held).
        find_stop=False: its text may not end a stop string (the request's min_tokens)."""
        self._find_stop = find_stop
        self._ids.append(token_id)
        decode, skip = self._tok.decode, self._skip
        prefix_text = decode(self._ids[self._prefix : self._read], skip)
        full_text = decode(self._ids[self._prefix :], skip)
        held = len(self._ids) - self._read
        if full_text.endswith("\ufffd") and held < _MAX_HELD_TOKENS:
            return ""
        new = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        if new:
            self._append(new)
        return new

    def flush(self) -> None:
        """At the end of the request: emits whatever bytes were held back."""
        if self.stopped or self._read == len(self._ids):
            return
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._read = len(self._ids)
        self._append(full_text[len(prefix_text) :])

    def _append(self, new: str) -> None:
        start = len(self.text)
        self.text += new
        if not self._find_stop:
            return
        for s in self._stop:
            # A stop string ending in the new piece starts at most len(s) - 1 chars before it.
            idx = self.text.find(s, max(0, start - len(s) + 1))
            if idx != -1:
                self.text = self.text[:idx]
                self.stopped = True
                return

    def stream_len(self, finished: bool) -> int:
        """Chars of text safe to stream: all when finished, else minus a possible stop prefix."""
        if finished or not self._stop:
            return len(self.text)
        held = 0
        text = self.text
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:n]):
                    held = n
                    break
        return len(text) - held
