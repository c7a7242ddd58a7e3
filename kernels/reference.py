"""Torch references for the MoE hot path: the CPU implementation and the oracle for the Triton kernels.

Every function here has the same signature as its Triton twin in this package. The references
compute in float32 (inputs are upcast; a no-op for fp32 models) and return the input dtype, except
where the contract says float32. Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_gating(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores experts and picks the top-k per token.

    router_logits [T, E] -> (weights float32 [T, K], ids int32 [T, K]).
    scoring="softmax": softmax over all E, then top-k (Mixtral, Qwen2/3-MoE, OLMoE);
    scoring="sigmoid": sigmoid scores; `bias` [E] is added for *selection only* and the weights are
    the unbiased scores (DeepSeek-V3). renormalize=True divides the K weights by their sum.
    Ties pick the lower expert id (torch.topk order).
    """
    logits = router_logits.float()  # [T, E]
    if scoring == "softmax":
        scores = torch.softmax(logits, dim=-1)
    elif scoring == "sigmoid":
        scores = torch.sigmoid(logits)
    else:
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    select = scores if bias is None else scores + bias.float()
    _, ids = torch.topk(select, top_k, dim=-1)  # [T, K]
    weights = scores.gather(-1, ids)  # [T, K]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return weights, ids.to(torch.int32)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: [T, 2F] (gate then up) -> [T, F] = silu(gate) * up."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., D], weight [D] -> [..., D] (as Llama/Mixtral/Qwen do it:
    normalise in fp32, cast back to x's dtype, then scale)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The routed-expert FFN: out[t] = sum_k w[t,k] * W2[e] @ (silu(W1g[e] @ x) * (W1u[e] @ x)).

    hidden [T, D], w1 [E, 2F, D] (gate rows then up rows), w2 [E, D, F],
    topk_weights [T, K] (float32), topk_ids [T, K] (int) -> [T, D] in hidden's dtype.
    Ids outside [0, E) (e.g. -1 for experts another shard holds) contribute nothing.
    """
    T, D = hidden.shape
    E = w1.shape[0]
    out = torch.zeros(T, D, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()  # [T*K]
    K = topk_ids.shape[1]
    order = torch.argsort(flat_ids, stable=True)  # [T*K]
    counts = torch.bincount(flat_ids.clamp(-1, E).add(1), minlength=E + 2)[1 : E + 1].tolist()
    start = int((flat_ids < 0).sum())
    for e, n in enumerate(counts):
        if n == 0:
            continue
        slots = order[start : start + n]  # [n] positions in the flattened [T*K]
        start += n
        tok = slots // K  # [n]
        x = hidden[tok].float()  # [n, D]
        h = silu_and_mul(F.linear(x, w1[e].float()))  # [n, F]
        y = F.linear(h, w2[e].float())  # [n, D]
        out.index_add_(0, tok, y * topk_weights.reshape(-1)[slots].float().unsqueeze(-1))
    return out.to(hidden.dtype)
