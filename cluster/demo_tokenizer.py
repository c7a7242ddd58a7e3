"""A small, deterministic byte-level BPE tokenizer for demo and test checkpoints.

Nothing may download at run time, so demo checkpoints and the tiny test checkpoints get their
tokenizer from here: a byte-level BPE (the GPT-2 / Qwen scheme, so every string encodes and every
byte sequence decodes) trained with the `tokenizers` library on the small corpus below, with the
ChatML special tokens and chat template of Qwen-style models. The files it writes
(tokenizer.json, tokenizer_config.json) are the ones a Hugging Face checkpoint carries, so the
same loading code serves demo and real models, and transformers' AutoTokenizer loads them too.

Token ids: 0 = <|endoftext|> (bos and eos), 1 = <|im_start|>, 2 = <|im_end|>, then the 256
byte tokens, then merges.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # specials + one token per byte

# ChatML, the way Qwen2/Qwen3 checkpoints write it (jinja2, rendered like transformers does), with
# their tool parts made short: the tools offered named in a system turn, an assistant turn's calls
# as hermes' <tool_call> JSON (arguments as the object the front door parses them into).
CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}"
    "{%- for tool in tools %}{{- ' ' + tool['function']['name'] }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{- '<tool_call>' + ({'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson) + '</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Mixed English prose, code, numbers and a little non-ASCII text, so merges cover common words and
# multi-byte characters still exist as byte sequences (useful for UTF-8 streaming tests).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts chosen by a gate, so a large model costs only a small part of its weights per token.
Serving a model means batching requests together: the scheduler admits new requests, prefills
their prompts in chunks, and decodes one token per running sequence in every step.
The key and value cache is paged into fixed-size blocks; a block table maps each sequence to its
blocks, and blocks return to the free pool when a request finishes or is cancelled.
Once upon a time there was a little robot who wanted to learn how to write poems about the sea.
It read every book in the library, from the history of ships to the science of waves and wind.
Question: what is the capital of France? Answer: Paris is the capital of France.
Question: how many legs does a spider have? Answer: a spider has eight legs.
Let us think step by step. First, add the numbers. Then, divide the sum by the count.
1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14159 42 -7 0.5
def add(a, b):
    return a + b

for i in range(10):
    print(i, i * i)

class Engine:
    def step(self):
        batch = self.scheduler.schedule()
        return self.runner.run(batch)
{"role": "user", "content": "hello"} [1, 2, 3] (x + y) * z = w; if (a < b) { return c; }
Hello! How can I help you today? Thank you, that is very helpful. Good morning and good night.
Le café est très bon. Über den Wolken. El niño juega en el jardín. Ça va très bien, merci.
你好，世界。机器学习很有趣。 こんにちは、元気ですか。 안녕하세요. Привет, как дела?
Emoji: 🙂 🚀 ✨ — “quotes” and ‘apostrophes’ … ±×÷ ∑ ∞ → ←
"""


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Trains the byte-level BPE on the embedded corpus; the vocab has at most vocab_size ids."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus changes no merge order but makes pair counts well separated.
    tok.train_from_iterator(_CORPUS.splitlines() * 3, trainer=trainer)
    return tok


def tokenizer_config(vocab_size: int) -> dict[str, object]:
    """The tokenizer_config.json a Qwen-style checkpoint carries (specials, template)."""
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in enumerate(SPECIAL_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer(dir: str | Path, vocab_size: int) -> None:
    """Writes tokenizer.json and tokenizer_config.json into dir (created if missing).

    Deterministic: the same vocab_size always gives byte-identical files.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(vocab_size), indent=2, ensure_ascii=False) + "\n"
    )
