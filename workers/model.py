"""The decoder: one class for every supported architecture, driven by ModelArgs (gpt-fast style).

Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Llama and Qwen3 differ only in details that ModelArgs names
(biases, q/k norms, qkv clipping, shared expert, which layers are sparse, rope scaling), so they
share this code. The model works on a flattened batch: `forward(input_ids [T], positions [T], ctx)`
with the paged KV cache described by a ForwardContext (workers/forward_context.py). Weights are
created empty (on the meta device by the loader) and filled by workers/loader.py; the fusions
(q|k|v into one Linear, gate|up into one Linear and into expert w1) happen there. Every linear
layer is a plain nn.Linear: device-specific tuning is a transform applied to the finished model
(workers/cpu_tuning.py), like expert parallelism (CausalLM.set_expert_backend).
Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import math

import torch
from moeray.kernels import add_rms_norm, apply_rope, rms_norm
from moeray.workers.attention import paged_attention
from moeray.workers.forward_context import ForwardContext
from moeray.workers.hf_config import ModelArgs
from moeray.workers.moe import DenseMLP, ExpertBackend, MoEBlock
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(args: ModelArgs, device: torch.device | str = "cpu") -> torch.Tensor:
    """[Dh/2] inverse frequencies, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    dim = args.head_dim
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1.0 / (args.rope_theta ** (steps / dim))
    scaling = args.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class Attention(nn.Module):
    """Fused-qkv attention with optional q/k norms and clipping, over the paged KV cache."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        H, G, Dh, D = args.num_heads, args.num_kv_heads, args.head_dim, args.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = H, G, Dh
        self.wqkv = nn.Linear(D, (H + 2 * G) * Dh, bias=args.qkv_bias)  # q rows, k rows, v rows
        self.wo = nn.Linear(H * Dh, D, bias=args.o_bias)
        self.qk_norm = args.qk_norm
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if args.qk_norm == "head":  # Qwen3: over each head's Dh
            self.q_norm, self.k_norm = (
                RMSNorm(Dh, args.rms_norm_eps),
                RMSNorm(Dh, args.rms_norm_eps),
            )
        elif args.qk_norm == "proj":  # OLMoE: over the whole q (H*Dh) and k (G*Dh) projections
            self.q_norm = RMSNorm(H * Dh, args.rms_norm_eps)
            self.k_norm = RMSNorm(G * Dh, args.rms_norm_eps)
        self.clip_qkv = args.clip_qkv
        self.scale = Dh**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        ctx: ForwardContext,
    ) -> torch.Tensor:
        """x [T, D] -> [T, D]."""
        T = x.shape[0]
        H, G, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.wqkv(x)  # [T, (H+2G)*Dh]
        if self.qk_norm == "none":
            if self.clip_qkv is not None:
                qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
            # q and k share cos/sin: one rope over their [T, H+G, Dh] view
            qk = apply_rope(qkv[:, : (H + G) * Dh].view(T, H + G, Dh), cos, sin)
            q, k = qk[:, :H], qk[:, H:]  # [T, H, Dh], [T, G, Dh] views
            v = qkv[:, (H + G) * Dh :].view(T, G, Dh)
        else:
            q, k, v = self._normed_qkv(qkv)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, ctx, self.scale)  # [T, H, Dh]
        return self.wo(out.view(T, H * Dh))

    def _normed_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H+2G)*Dh] -> q [T, H, Dh], k, v [T, G, Dh] with the q/k norms (and clipping)."""
        T = qkv.shape[0]
        H, G, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        assert self.q_norm is not None and self.k_norm is not None
        q, k, v = qkv.split([H * Dh, G * Dh, G * Dh], dim=-1)
        if self.qk_norm == "proj":  # OLMoE: norm the whole projections, then clamp
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q, k, v = q.reshape(T, H, Dh), k.reshape(T, G, Dh), v.reshape(T, G, Dh)
        if self.qk_norm == "head":  # Qwen3: norm each head over Dh
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        D = args.hidden_size
        self.attn = Attention(args)
        self.attn_norm = RMSNorm(D, args.rms_norm_eps)
        self.ffn_norm = RMSNorm(D, args.rms_norm_eps)
        self.mlp: nn.Module
        if layer in args.moe_layers:
            self.mlp = MoEBlock(
                layer,
                D,
                args.num_experts,
                args.top_k,
                args.norm_topk_prob,
                args.shared_expert_intermediate_size,
            )
        else:
            self.mlp = DenseMLP(D, args.intermediate_size, bias=args.mlp_bias)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] = the previous block's output, residual [T, D] = the stream before it (None
        for the first layer, whose x is the embeddings) -> (this layer's FFN output, residual).
        Passing the residual along lets each add fuse with the next norm (add_rms_norm)."""
        if residual is None:
            h, residual = rms_norm(x, self.attn_norm.weight, self.attn_norm.eps), x
        else:
            h, residual = add_rms_norm(x, residual, self.attn_norm.weight, self.attn_norm.eps)
        h = self.attn(h, cos, sin, kv_cache, ctx)
        h, residual = add_rms_norm(h, residual, self.ffn_norm.weight, self.ffn_norm.eps)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """A decoder-only LM over a paged KV cache. Build with workers/loader.load_model."""

    def __init__(self, args: ModelArgs, device: torch.device | str = "cpu") -> None:
        """Parameters follow torch's default device (the loader uses meta); the plain tensors
        below (not parameters, so to_empty leaves them alone) are made on `device`."""
        super().__init__()
        self.args = args
        D, V = args.hidden_size, args.vocab_size
        self.embed_tokens = nn.Embedding(V, D)
        self.layers = nn.ModuleList([DecoderLayer(args, i) for i in range(args.num_layers)])
        self.norm = RMSNorm(D, args.rms_norm_eps)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.inv_freq = rope_inv_freq(args, device)  # [Dh/2] f32
        self.expert_backend: ExpertBackend | None = None
        # tokens routed per (layer, expert) since the last take_expert_counts(); dense rows stay 0
        self.expert_counts = torch.zeros(
            args.num_layers, args.num_experts, dtype=torch.int64, device=device
        )  # [L, E]

    # --- the forward step ------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, 1, Dh] in the model dtype (fp32 math, like HF)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, Dh]
        return emb.cos().to(self.args.dtype), emb.sin().to(self.args.dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64 -> final-normed hidden [T, D]."""
        x = self.embed_tokens(input_ids)  # [T, D]
        cos, sin = self.rope(positions)
        residual = None
        for layer, kv_cache in zip(self.layers, ctx.kv_caches):
            x, residual = layer(x, residual, cos, sin, kv_cache, ctx)
        assert residual is not None, "a model has at least one layer"
        return add_rms_norm(x, residual, self.norm.weight, self.norm.eps)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> logits [B, V] float32."""
        return self.lm_head(hidden).float()

    # --- KV cache --------------------------------------------------------------------------
    def make_kv_cache(
        self, num_blocks: int, block_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k_cache, v_cache), each [N, S, G, Dh] zeros in the model dtype."""
        a = self.args
        shape = (num_blocks, block_size, a.num_kv_heads, a.head_dim)
        device = self.embed_tokens.weight.device
        return [
            (
                torch.zeros(shape, dtype=a.dtype, device=device),
                torch.zeros(shape, dtype=a.dtype, device=device),
            )
            for _ in range(a.num_layers)
        ]

    def kv_bytes_per_token(self) -> int:
        a = self.args
        return 2 * a.num_layers * a.num_kv_heads * a.head_dim * a.dtype.itemsize

    # --- experts ---------------------------------------------------------------------------
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoEBlock)]

    def set_expert_backend(self, backend: ExpertBackend) -> None:
        """Routes every MoE layer's experts through `backend` (a transform on a finished model)."""
        self.expert_backend = backend
        for block in self.moe_blocks():
            block.backend = backend
            block.counts = self.expert_counts[block.layer]

    def take_expert_counts(self) -> torch.Tensor:
        """[L, E] int64 tokens routed per (layer, expert) since the last call; resets them."""
        counts = self.expert_counts.clone()
        self.expert_counts.zero_()
        return counts
