"""The demo checkpoint: a random-init MoE model written in Hugging Face format, without transformers.

`moeray serve` with no checkpoint, the benchmarks and the README demo need a model, and nothing
may download at run time. This writes config.json, model.safetensors and generation_config.json
exactly the way transformers' save_pretrained lays them out (per-expert tensor names, e.g.
Mixtral's `block_sparse_moe.experts.{e}.w1.weight`), so the same loading code serves demo and real
checkpoints, plus the demo tokenizer. transformers is only a dev dependency; a test proves
transformers loads these files and produces the same logits as moeray.

Presets: "tiny" (hidden 64, 2 layers, 4 experts; for tests and laptops) and "bench" (hidden 512,
8 layers, 8 heads / 2 KV heads, 8 experts top-2, expert FFN 1024, vocab 32000).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from moeray.cluster.demo_tokenizer import write_tokenizer
from moeray.workers.hf_config import ModelArgs, parse_config
from safetensors.torch import save_file

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "experts": 4, "top_k": 2,
             "ffn": 128, "vocab": 512},
    "bench": {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 2, "experts": 8, "top_k": 2,
              "ffn": 1024, "vocab": 32000},
}  # fmt: skip
ARCHS = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
EOS_TOKEN_ID = 0  # <|endoftext|> of the demo tokenizer
IM_END_TOKEN_ID = 2  # <|im_end|>: ends an assistant turn
INIT_STD = 0.02  # transformers' default initializer_range


def demo_config(arch: str, preset: str, dtype: str) -> dict[str, Any]:
    """The config.json content of the demo model."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    cfg: dict[str, Any] = {
        "architectures": [ARCHS[arch]],
        "model_type": arch,
        "vocab_size": p["vocab"],
        "hidden_size": p["hidden"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["hidden"] // p["heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": EOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "dtype": dtype,
    }
    moe = {"num_experts_per_tok": p["top_k"]}
    if arch == "mixtral":
        cfg.update(moe, num_local_experts=p["experts"], intermediate_size=p["ffn"])
    elif arch == "olmoe":
        cfg.update(moe, num_experts=p["experts"], intermediate_size=p["ffn"], norm_topk_prob=False)
    elif arch in ("qwen2_moe", "qwen3_moe"):
        cfg.update(moe, num_experts=p["experts"], moe_intermediate_size=p["ffn"],
                   intermediate_size=2 * p["ffn"], norm_topk_prob=arch == "qwen3_moe",
                   decoder_sparse_step=1, mlp_only_layers=[])  # fmt: skip
        if arch == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=p["ffn"], qkv_bias=True)
    else:
        cfg["intermediate_size"] = 2 * p["ffn"]
    return cfg


def _expert_names(args: ModelArgs, layer: int, e: int) -> list[tuple[str, tuple[int, int]]]:
    D, F = args.hidden_size, args.moe_intermediate_size
    if args.family == "mixtral":
        base = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
        return [
            (f"{base}.w1.weight", (F, D)),
            (f"{base}.w3.weight", (F, D)),
            (f"{base}.w2.weight", (D, F)),
        ]
    base = f"model.layers.{layer}.mlp.experts.{e}"
    return [(f"{base}.gate_proj.weight", (F, D)), (f"{base}.up_proj.weight", (F, D)),
            (f"{base}.down_proj.weight", (D, F))]  # fmt: skip


def _mlp_names(prefix: str, dim: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.gate_proj.weight", (width, dim)), (f"{prefix}.up_proj.weight", (width, dim)),
            (f"{prefix}.down_proj.weight", (dim, width))]  # fmt: skip


def _layer_names(args: ModelArgs, i: int) -> list[tuple[str, tuple[int, ...]]]:
    D, H, G, Dh = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
    a = f"model.layers.{i}.self_attn"
    names: list[tuple[str, tuple[int, ...]]] = [
        (f"{a}.q_proj.weight", (H * Dh, D)), (f"{a}.k_proj.weight", (G * Dh, D)),
        (f"{a}.v_proj.weight", (G * Dh, D)), (f"{a}.o_proj.weight", (D, H * Dh)),
        (f"model.layers.{i}.input_layernorm.weight", (D,)),
        (f"model.layers.{i}.post_attention_layernorm.weight", (D,)),
    ]  # fmt: skip
    if args.qkv_bias:
        names += [
            (f"{a}.q_proj.bias", (H * Dh,)),
            (f"{a}.k_proj.bias", (G * Dh,)),
            (f"{a}.v_proj.bias", (G * Dh,)),
        ]
    if args.qk_norm != "none":
        per_head = args.qk_norm == "head"
        names += [(f"{a}.q_norm.weight", (Dh if per_head else H * Dh,)),
                  (f"{a}.k_norm.weight", (Dh if per_head else G * Dh,))]  # fmt: skip
    if i not in args.moe_layers:
        return names + _mlp_names(f"model.layers.{i}.mlp", D, args.intermediate_size)
    moe = f"model.layers.{i}.{'block_sparse_moe' if args.family == 'mixtral' else 'mlp'}"
    names.append((f"{moe}.gate.weight", (args.num_experts, D)))
    for e in range(args.num_experts):
        names += _expert_names(args, i, e)
    if args.shared_expert_intermediate_size:
        names += _mlp_names(f"{moe}.shared_expert", D, args.shared_expert_intermediate_size)
        names.append((f"{moe}.shared_expert_gate.weight", (1, D)))
    return names


def demo_tensors(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Random weights named and shaped like transformers' save_pretrained output: N(0, 0.02)
    matrices, ones for norms, zeros for biases (HF's _init_weights)."""
    gen = torch.Generator().manual_seed(seed)
    names: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (args.vocab_size, args.hidden_size))
    ]
    for i in range(args.num_layers):
        names += _layer_names(args, i)
    names += [
        ("model.norm.weight", (args.hidden_size,)),
        ("lm_head.weight", (args.vocab_size, args.hidden_size)),
    ]
    out = {}
    for name, shape in names:
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            t = torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)
        out[name] = t.to(args.dtype)
    return out


def build_demo_checkpoint(
    directory: str | Path,
    arch: str = "mixtral",
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    num_layers: int | None = None,
) -> Path:
    """Writes a random-init `arch` checkpoint of size `preset` in HF format into `directory`
    (`num_layers` overrides the preset's depth)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(arch, preset, dtype)
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        cfg["num_hidden_layers"] = num_layers
    args = parse_config(cfg, dtype)
    save_file(
        demo_tensors(args, seed), str(directory / "model.safetensors"), metadata={"format": "pt"}
    )
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    generation = {"bos_token_id": EOS_TOKEN_ID, "eos_token_id": [EOS_TOKEN_ID, IM_END_TOKEN_ID]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(directory, args.vocab_size)
    return directory
