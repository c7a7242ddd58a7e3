"""The tokenizer of a Hugging Face checkpoint, without transformers.

Reads tokenizer.json with the `tokenizers` library and tokenizer_config.json (special tokens, chat
template) as transformers does, and renders the chat template with jinja2 in a sandbox with the
same options and helpers (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `tojson`,
`strftime_now`), so prompts match what transformers' `apply_chat_template` produces.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable; the message names the file."""


def _token_content(value: Any) -> str | None:
    """Special tokens in tokenizer_config.json are strings or serialized AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"tokenizer file {path} must hold a JSON object")
    return data


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


class Tokenizer:
    """encode / decode / apply_chat_template for one checkpoint; ids are plain Python ints."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        config: dict[str, Any],
        chat_template: str | None = None,
        name: str = "tokenizer",
    ) -> None:
        self._tok = backend
        self.config = config
        self.chat_template = chat_template
        self.name = name
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        eos = self._id_of(self.eos_token)
        self.eos_token_ids: list[int] = [] if eos is None else [eos]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Loads tokenizer.json (+ tokenizer_config.json and chat_template.jinja when present)."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"tokenizer file {tok_file} is missing")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust library raises a bare Exception on bad files
            raise TokenizerError(f"tokenizer file {tok_file} is corrupt: {e}") from None
        cfg_file = root / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = root / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(backend, config, template, name=str(root))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows (with added tokens); a model's vocab may be padded larger."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, with the checkpoint's post-processor (e.g. a BOS) when add_special_tokens."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds its token trie from)."""
        return str(self._tok.to_str())

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @cached_property
    def _template(self) -> Any:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self.chat_template is None:
            raise ValueError(f"the tokenizer at {self.name} has no chat_template")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
            x, ensure_ascii=False, indent=indent, **kw
        )
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Renders the conversation as the prompt text the model was trained on."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}] must be an object with 'role' and 'content'")
        specials = {k: _token_content(v) for k, v in self.config.items() if k.endswith("_token")}
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            **{**specials, **kwargs},
        )
