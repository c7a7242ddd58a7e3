"""The tokenizer (and the demo tokenizer it is tested with) against transformers' AutoTokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from moeray.cluster.demo_tokenizer import MIN_VOCAB_SIZE, write_tokenizer
from moeray.workers.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and\ttabs\nnew lines",
    "Le café est très bon. 你好，世界。🙂🚀",
    "<|im_start|>user\nhi<|im_end|>",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? ✨"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, 512)
    return d


def test_demo_tokenizer_is_deterministic_fast_and_bounded(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_tokenizer(tmp_path / "a", 400)
    assert time.perf_counter() - start < 2.0
    write_tokenizer(tmp_path / "b", 400)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert Tokenizer.from_pretrained(tmp_path / "a").vocab_size <= 400
    with pytest.raises(ValueError, match="vocab_size"):
        write_tokenizer(tmp_path / "c", MIN_VOCAB_SIZE - 1)


def test_encode_decode_and_specials_match_transformers(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    tok = Tokenizer.from_pretrained(tok_dir)
    assert tok.eos_token_ids == [hf.eos_token_id]
    assert tok.bos_token_id == hf.bos_token_id
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert tok.encode("<|im_end|>") == [2]  # specials stay single tokens


def test_chat_template_renders_like_transformers(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    tok = Tokenizer.from_pretrained(tok_dir)
    for gen in (True, False):
        want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == want
    # tools offered, and a turn holding a call (arguments as an object) and the tool's answer
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
             {"type": "function", "function": {"name": "now"}}]  # fmt: skip
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}  # fmt: skip
    chat = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]  # fmt: skip
    want = hf.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(chat, tools=tools) == want
    assert "Tools: get_weather now" in want
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>' in want


def test_a_template_with_whitespace_control_and_raise_exception(
    tok_dir: Path, tmp_path: Path
) -> None:
    """trim_blocks/lstrip_blocks and raise_exception behave as in transformers."""
    from transformers import AutoTokenizer

    d = tmp_path / "custom"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{{ bos_token }}\n{% for m in messages %}\n"
        "  {% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('system must come first') }}{% endif %}\n"
        "[{{ m['role'] | upper }}] {{ m['content'] | trim }}\n{% endfor %}\n"
        "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
    )
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = AutoTokenizer.from_pretrained(d)
    tok = Tokenizer.from_pretrained(d)
    want = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(MESSAGES) == want
    with pytest.raises(ValueError, match="system must come first"):
        tok.apply_chat_template([*MESSAGES, {"role": "system", "content": "x"}])


def test_missing_and_corrupt_files_are_named(tmp_path: Path, tok_dir: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is missing"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json is corrupt"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_pretrained(tmp_path)
