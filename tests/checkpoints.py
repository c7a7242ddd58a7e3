"""Tiny, real Hugging Face checkpoints for tests, written by transformers' own save_pretrained.

`make_tiny_checkpoint(dir, arch)` builds a randomly initialised model of the given architecture
with transformers (the oracle the tests compare moeray against), saves it in HF format, and adds
the demo tokenizer (moeray.cluster.demo_tokenizer) so the engine can load the same directory.
The init scale is larger than HF's default (0.02) so logits and router scores are well separated
and greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen3")

_COMMON: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.1,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": None,
    "tie_word_embeddings": False,
}

_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"intermediate_size": 48, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 80,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 40,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],  # layer 1 dense, layers 0 and 2 sparse
        "norm_topk_prob": False,
        "qkv_bias": True,
    },
    "qwen3_moe": {
        "num_hidden_layers": 3,
        "intermediate_size": 80,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 24,  # != hidden / heads, as in real Qwen3 checkpoints
        "decoder_sparse_step": 2,  # layer 1 sparse, layers 0 and 2 dense
        "norm_topk_prob": True,
    },
    "olmoe": {
        "intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "clip_qkv": 0.5,  # small enough to bite with this init
        "norm_topk_prob": False,
    },
    "llama": {
        "intermediate_size": 96,
        "attention_bias": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": True,
    },
    "qwen3": {"intermediate_size": 96, "head_dim": 32},
}


def tiny_config(arch: str, **overrides: Any) -> Any:
    """The transformers config object of the tiny `arch` model."""
    import transformers

    classes = {
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
    }
    if arch not in classes:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    kwargs = {**_COMMON, **_ARCH_DEFAULTS[arch], **overrides}
    return classes[arch](**kwargs)


def write_demo_tokenizer(directory: Path, vocab_size: int) -> None:
    """Adds tokenizer.json/tokenizer_config.json if the demo tokenizer module exists."""
    try:
        module = importlib.import_module("moeray.cluster.demo_tokenizer")
    except ModuleNotFoundError:
        return
    module.write_tokenizer(directory, vocab_size)


def make_tiny_checkpoint(
    directory: str | Path, arch: str, dtype: str = "float32", seed: int = 0, **overrides: Any
) -> Path:
    """Writes a tiny random `arch` checkpoint (transformers save_pretrained) into `directory`."""
    import transformers

    directory = Path(directory)
    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    model.save_pretrained(directory)
    write_demo_tokenizer(directory, config.vocab_size)
    return directory
