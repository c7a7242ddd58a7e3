"""load_model: a Hugging Face checkpoint directory -> a ready CausalLM (eval mode, no grad).

The model is created on the meta device (no random init, no double allocation), materialised
empty on the target device, and every parameter is filled from the checkpoint, fusing as it goes:
q|k|v rows into `wqkv`, gate|up rows into `w13` (dense FFNs, shared expert) and into the experts'
w1 [E, 2F, D]. Each tensor is shape-checked; problems raise CheckpointError naming the tensor.
Weights keep their plain layout; device-specific tuning is a separate transform
(workers/cpu_tuning.py), and the experts' kernel-specific form is kernels.prepare_expert_weights'
(LocalExperts applies it).
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from moeray.workers.checkpoint import CheckpointError, CheckpointReader, moe_prefixes, read_experts
from moeray.workers.hf_config import ModelArgs, read_model_args
from moeray.workers.model import Attention, CausalLM, DecoderLayer
from moeray.workers.moe import DenseMLP, ExpertBackend, LocalExperts, MoEBlock
from tqdm.auto import tqdm


def _fill(param: torch.Tensor, reader: CheckpointReader, name: str) -> None:
    """Copies checkpoint tensor `name` into `param` (or a row slice of a fused param)."""
    param.copy_(reader.get(name, tuple(param.shape), param.dtype))


def _load_attention(attn: Attention, reader: CheckpointReader, prefix: str) -> None:
    H, G, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rows = {
        "q_proj": (0, H * Dh),
        "k_proj": (H * Dh, (H + G) * Dh),
        "v_proj": ((H + G) * Dh, (H + 2 * G) * Dh),
    }
    for proj, (start, stop) in rows.items():
        _fill(attn.wqkv.weight[start:stop], reader, f"{prefix}.{proj}.weight")
        if attn.wqkv.bias is not None:
            _fill(attn.wqkv.bias[start:stop], reader, f"{prefix}.{proj}.bias")
    _fill(attn.wo.weight, reader, f"{prefix}.o_proj.weight")
    if attn.wo.bias is not None:
        _fill(attn.wo.bias, reader, f"{prefix}.o_proj.bias")
    if attn.q_norm is not None and attn.k_norm is not None:
        _fill(attn.q_norm.weight, reader, f"{prefix}.q_norm.weight")
        _fill(attn.k_norm.weight, reader, f"{prefix}.k_norm.weight")


def _load_mlp(mlp: DenseMLP, reader: CheckpointReader, prefix: str) -> None:
    F = mlp.w2.weight.shape[1]
    _fill(mlp.w13.weight[:F], reader, f"{prefix}.gate_proj.weight")
    _fill(mlp.w13.weight[F:], reader, f"{prefix}.up_proj.weight")
    _fill(mlp.w2.weight, reader, f"{prefix}.down_proj.weight")
    if mlp.w13.bias is not None and mlp.w2.bias is not None:
        _fill(mlp.w13.bias[:F], reader, f"{prefix}.gate_proj.bias")
        _fill(mlp.w13.bias[F:], reader, f"{prefix}.up_proj.bias")
        _fill(mlp.w2.bias, reader, f"{prefix}.down_proj.bias")


def _load_moe_block(block: MoEBlock, reader: CheckpointReader, args: ModelArgs) -> None:
    """The router gate and shared expert; routed experts are read by read_experts."""
    prefixes = moe_prefixes(args.family, block.layer)
    prefix = next((p for p in prefixes if reader.has(f"{p}.gate.weight")), prefixes[0])
    _fill(block.gate.weight, reader, f"{prefix}.gate.weight")
    if block.shared_expert is not None and block.shared_expert_gate is not None:
        _load_mlp(block.shared_expert, reader, f"{prefix}.shared_expert")
        _fill(block.shared_expert_gate.weight, reader, f"{prefix}.shared_expert_gate.weight")


def _load_dense_weights(model: CausalLM, reader: CheckpointReader) -> None:
    args = model.args
    _fill(model.embed_tokens.weight, reader, "model.embed_tokens.weight")
    for i, module in enumerate(model.layers):
        layer = cast(DecoderLayer, module)
        prefix = f"model.layers.{i}"
        _load_attention(layer.attn, reader, f"{prefix}.self_attn")
        _fill(layer.attn_norm.weight, reader, f"{prefix}.input_layernorm.weight")
        _fill(layer.ffn_norm.weight, reader, f"{prefix}.post_attention_layernorm.weight")
        if isinstance(layer.mlp, MoEBlock):
            _load_moe_block(layer.mlp, reader, args)
        else:
            _load_mlp(cast(DenseMLP, layer.mlp), reader, f"{prefix}.mlp")
    _fill(model.norm.weight, reader, "model.norm.weight")
    if args.tie_word_embeddings:  # HF ties lm_head to the embeddings (ignoring a saved copy)
        model.lm_head.weight = model.embed_tokens.weight
    else:
        _fill(model.lm_head.weight, reader, "lm_head.weight")


def _local_experts(
    model: CausalLM, reader: CheckpointReader, device: str | torch.device
) -> LocalExperts:
    args = model.args
    weights = {}
    for layer in args.moe_layers:
        w1, w2 = read_experts(reader, args, layer, list(range(args.num_experts)))
        weights[layer] = (w1.to(device), w2.to(device))
    return LocalExperts(weights)


def load_model(
    path: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    expert_backend: ExpertBackend | None = None,
    progress: bool = True,
) -> CausalLM:
    """Loads the checkpoint directory `path` into a CausalLM (eval, requires_grad False).

    dtype: "auto" (config's dtype), "float32" or "bfloat16". With `expert_backend` given, the
    routed experts' weights are not read here (the backend owns them, e.g. shard actors);
    otherwise a LocalExperts backend holds them all.
    """
    args = read_model_args(path, dtype)
    with torch.device("meta"):
        model = CausalLM(args, device=device).to(dtype=args.dtype)
    model.to_empty(device=device)
    reader = CheckpointReader(path)
    bar = tqdm(
        total=len(reader.weight_map), desc="Loading weights", unit="tensor", disable=not progress
    )
    reader.on_read = lambda _name: bar.update(1)
    try:
        with torch.no_grad():
            _load_dense_weights(model, reader)
            if args.is_moe:
                model.set_expert_backend(expert_backend or _local_experts(model, reader, device))
    finally:
        bar.close()
        reader.close()
    model.eval().requires_grad_(False)
    return model


__all__ = ["CheckpointError", "load_model"]
