"""Hugging Face config.json -> ModelArgs: the one typed description the model is built from.

Every architecture-specific convention (which config field holds the expert count, whether q/k/v
carry a bias, where the q/k norms sit, which layers are sparse, how the top-k weights are
normalised) is decided here, once, so workers/model.py is a single class driven by ModelArgs, the
way gpt-fast's `ModelArgs` drives its Transformer. The conventions follow transformers' own
modeling_<arch>.py files (version 5.x); the comments name the HF behaviour being reproduced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint cannot be served; the message names the file, tensor or config field."""


# architecture name in config.json -> (family, is MoE). The family picks the tensor names and
# conventions below; dense families get num_experts = 0.
SUPPORTED_ARCHS: dict[str, str] = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "OlmoeForCausalLM": "olmoe",
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    """Everything the decoder needs to know about a checkpoint's architecture.

    Shape letters (docs/SHAPES.md): D = hidden_size, H = num_heads, G = num_kv_heads,
    Dh = head_dim, E = num_experts (0 = dense model), K = top_k, F = moe_intermediate_size.
    """

    arch: str  # config.json "architectures"[0], e.g. "MixtralForCausalLM"
    family: str  # "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "llama" | "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # FFN width of dense layers
    max_position_embeddings: int
    rms_norm_eps: float
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    moe_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False  # renormalise the K routing weights to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's sigmoid-gated shared expert; 0 = none
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"  # "none" | "head" (Qwen3: per head over Dh) | "proj" (OLMoE: whole q/k)
    clip_qkv: float | None = None  # OLMoE clamps q, k, v to [-clip, clip] after the norms
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear" | "llama3", ...}
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    dtype: torch.dtype = torch.float32

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _require(cfg: dict[str, Any], key: str, source: str) -> Any:
    if cfg.get(key) is None:
        raise CheckpointError(f"{source}: required field {key!r} is missing")
    return cfg[key]


def _positive_int(cfg: dict[str, Any], key: str, source: str) -> int:
    value = _require(cfg, key, source)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{source}: field {key!r} must be a positive integer, got {value!r}")
    return value


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _resolve_dtype(dtype: str | torch.dtype, cfg: dict[str, Any], source: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # transformers 5 writes "dtype"; 4.x wrote "torch_dtype". Neither -> fp32 (HF's default).
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise CheckpointError(
            f"{source}: dtype must be one of 'auto', {', '.join(map(repr, _DTYPES))}; got {dtype!r}"
        )
    return _DTYPES[str(dtype)]


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling) from transformers 5's rope_parameters or 4.x's rope_theta/rope_scaling."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise CheckpointError(
            f"{source}: field 'rope_parameters.rope_type' = {rope_type!r} is not supported "
            f"(supported: {', '.join(_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    needed = (
        ["factor"] if rope_type == "linear" else ["factor", "low_freq_factor", "high_freq_factor"]
    )
    for key in needed:
        _require(params, key, f"{source} rope_parameters")
    scaling: dict[str, Any] = {"rope_type": rope_type, **{k: float(params[k]) for k in needed}}
    if rope_type == "llama3":  # HF's default pretraining length is max_position_embeddings
        original = params.get("original_max_position_embeddings") or cfg.get(
            "max_position_embeddings"
        )
        scaling["original_max_position_embeddings"] = original
    return theta, scaling


def _sparse_layers(cfg: dict[str, Any], num_layers: int, family: str) -> list[int]:
    """Which layers are MoE: all of them for Mixtral/OLMoE; Qwen2/3-MoE use decoder_sparse_step and
    mlp_only_layers exactly like their HF decoder layer: (i+1) % step == 0 and i not in mlp_only."""
    if family in ("mixtral", "olmoe"):
        return list(range(num_layers))
    step = int(cfg.get("decoder_sparse_step") or 1)
    mlp_only = set(cfg.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0]


def _family_fields(cfg: dict[str, Any], family: str, source: str) -> dict[str, Any]:
    """The per-architecture fields (experts, biases, norms)."""
    out: dict[str, Any] = {}
    if family == "mixtral":
        out["num_experts"] = _positive_int(cfg, "num_local_experts", source)
        out["moe_intermediate_size"] = _positive_int(cfg, "intermediate_size", source)
        out["norm_topk_prob"] = True  # MixtralTopKRouter always renormalises
    elif family in ("qwen2_moe", "qwen3_moe"):
        key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
        out["num_experts"] = _positive_int(cfg, key, source)
        out["moe_intermediate_size"] = _positive_int(cfg, "moe_intermediate_size", source)
        out["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
    elif family == "olmoe":
        out["num_experts"] = _positive_int(cfg, "num_experts", source)
        out["moe_intermediate_size"] = _positive_int(cfg, "intermediate_size", source)
        out["norm_topk_prob"] = bool(cfg.get("norm_topk_prob", False))
        out["clip_qkv"] = None if cfg.get("clip_qkv") is None else float(cfg["clip_qkv"])
    if out.get("num_experts"):
        out["top_k"] = _positive_int(cfg, "num_experts_per_tok", source)
        if out["top_k"] > out["num_experts"]:
            raise CheckpointError(f"{source}: field 'num_experts_per_tok' exceeds the expert count")
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = int(
            cfg.get("shared_expert_intermediate_size") or 0
        )
        out["qkv_bias"] = bool(cfg.get("qkv_bias", True))  # Qwen2MoeConfig default; o_proj never
    else:
        bias = bool(cfg.get("attention_bias", False))
        out["qkv_bias"] = out["o_bias"] = bias
    out["mlp_bias"] = family == "llama" and bool(cfg.get("mlp_bias", False))
    out["qk_norm"] = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "proj"}.get(family, "none")
    return out


def _max_positions(cfg: dict[str, Any], source: str) -> int:
    """The context limit. A sliding window narrower than that is enforced by capping the context
    at the window (moeray's attention has no windowed mask), so no output is silently wrong."""
    limit = _positive_int(cfg, "max_position_embeddings", source)
    window = cfg.get("sliding_window")
    use_window = cfg.get("use_sliding_window", True)  # Qwen configs gate the window with a flag
    if isinstance(window, int) and window > 0 and use_window:
        limit = min(limit, window)
    return limit


def parse_config(
    cfg: dict[str, Any],
    dtype: str | torch.dtype = "auto",
    generation_config: dict[str, Any] | None = None,
    source: str = "config.json",
) -> ModelArgs:
    """Builds ModelArgs from a parsed config.json; errors name `source` and the field."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{source}: field 'architectures' = {archs!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    family = SUPPORTED_ARCHS[arch]
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{source}: field 'hidden_act' must be 'silu', got {cfg['hidden_act']!r}"
        )
    hidden = _positive_int(cfg, "hidden_size", source)
    heads = _positive_int(cfg, "num_attention_heads", source)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{source}: field 'num_key_value_heads' must divide num_attention_heads"
        )
    layers = _positive_int(cfg, "num_hidden_layers", source)
    fam = _family_fields(cfg, family, source)
    theta, scaling = _rope(cfg, source)
    gen = generation_config or {}
    eos = _token_ids(cfg.get("eos_token_id")) + _token_ids(gen.get("eos_token_id"))
    return ModelArgs(
        arch=arch,
        family=family,
        vocab_size=_positive_int(cfg, "vocab_size", source),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        max_position_embeddings=_max_positions(cfg, source),
        rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        moe_layers=_sparse_layers(cfg, layers, family) if fam.get("num_experts") else [],
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=list(dict.fromkeys(eos)),  # de-duplicated, order kept
        bos_token_id=cfg.get("bos_token_id", gen.get("bos_token_id")),
        dtype=_resolve_dtype(dtype, cfg, source),
        **fam,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_model_args(path: str | Path, dtype: str | torch.dtype = "auto") -> ModelArgs:
    """ModelArgs of the checkpoint directory `path` (config.json + optional generation_config.json)."""
    root = Path(path)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (not a Hugging Face checkpoint directory?)")
    gen_file = root / "generation_config.json"
    gen = _read_json(gen_file) if gen_file.is_file() else None
    return parse_config(_read_json(config_file), dtype, gen, source=str(config_file))
