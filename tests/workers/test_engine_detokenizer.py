"""Streaming detokenization: never broken UTF-8, equal to a one-shot decode, stop strings cut."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from moeray.cluster.demo_tokenizer import write_tokenizer
from moeray.workers.detokenizer import IncrementalDetokenizer
from moeray.workers.tokenizer import Tokenizer

TEXT = "Le café 🙂 est très bon. 你好，世界。 ✨ done → ok"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d: Path = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, 320)  # few merges: multi-byte characters span several tokens
    return Tokenizer.from_pretrained(d)


def test_multibyte_characters_split_across_tokens_are_never_broken(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    split = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert split, "the test needs tokens that hold part of a character"
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"), stop=[])
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT == detok.text


def test_stop_string_across_token_boundaries_is_cut_and_never_streamed(tok: Tokenizer) -> None:
    ids = tok.encode(TEXT)
    stop = "très bon"
    detok = IncrementalDetokenizer(tok, [], stop=[stop, "never"])
    streamed = ""
    for i in ids:
        detok.add(i)
        streamed += detok.text[len(streamed) : detok.stream_len(finished=False)]
        assert stop not in streamed
        # no streamed suffix could still grow into the stop string
        assert not any(streamed.endswith(stop[:n]) for n in range(1, len(stop)))
        if detok.stopped:
            break
    assert detok.stopped
    assert detok.text == TEXT[: TEXT.index(stop)]
    assert detok.text.startswith(streamed)


def test_invalid_bytes_are_released_after_a_few_tokens(tok: Tokenizer) -> None:
    """A lone continuation byte never completes: it must not hold the stream back forever."""
    byte_80 = tok.encode("é")[-1]  # the second byte of é, alone it is invalid UTF-8
    detok = IncrementalDetokenizer(tok, [], stop=[])
    pieces = [detok.add(byte_80) for _ in range(8)] + [detok.add(i) for i in tok.encode("ok")]
    detok.flush()
    assert "ok" in "".join(pieces)
    assert detok.text == tok.decode([byte_80] * 8 + tok.encode("ok"))


def test_special_tokens_kept_when_asked(tiny_checkpoint: Callable[..., Path]) -> None:
    """skip_special_tokens=False (vLLM's; what tool-call parsers reading a control token need)
    keeps them in the text, as transformers' tokenizer decodes the same ids; by default they
    are left out. logit_bias makes the model write <|im_start|> (special, not a stop token)."""
    from moeray.workers import LLM, SamplingParams
    from transformers import AutoTokenizer

    path = tiny_checkpoint("mixtral")
    llm = LLM(model=path)
    bias = {1: 100.0}  # <|im_start|>
    kept, skipped = llm.generate(["Hello", "Hello"], [
        SamplingParams(max_tokens=3, temperature=0, logit_bias=bias, skip_special_tokens=False),
        SamplingParams(max_tokens=3, temperature=0, logit_bias=bias)])  # fmt: skip
    oracle = AutoTokenizer.from_pretrained(path)
    assert kept.token_ids == skipped.token_ids == [1, 1, 1]
    assert (
        kept.text == oracle.decode(kept.token_ids, skip_special_tokens=False) == "<|im_start|>" * 3
    )
    assert skipped.text == oracle.decode(kept.token_ids, skip_special_tokens=True) == ""
