"""Shape and dtype checks of the public kernel API, shared by the torch and Triton paths.

Bad input raises ValueError naming the argument, whichever backend runs. Shape letters:
docs/SHAPES.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moeray.kernels.cpu_packed import PackedExperts

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _shape(name: str, t: torch.Tensor | PackedExperts, expected: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)}")


def _float(name: str, t: torch.Tensor | PackedExperts) -> None:
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _same_device(name: str, t: torch.Tensor | PackedExperts, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the inputs are on {ref.device}")


def check_topk_gating(
    router_logits: torch.Tensor, top_k: int, scoring: str, bias: torch.Tensor | None
) -> None:
    """router_logits [T, E] float, 1 <= top_k <= E, scoring softmax|sigmoid, bias [E] or None."""
    _shape("router_logits", router_logits, "[T, E]", router_logits.dim() == 2)
    _float("router_logits", router_logits)
    E = router_logits.shape[1]
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")
    if bias is not None:
        _shape("bias", bias, f"[E={E}]", tuple(bias.shape) == (E,))
        _float("bias", bias)
        _same_device("bias", bias, router_logits)


def check_fused_moe(
    hidden: torch.Tensor,
    w1: torch.Tensor | PackedExperts,
    w2: torch.Tensor | PackedExperts,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    """hidden [T, D], w1 [E, 2F, D], w2 [E, D, F], topk_weights [T, K], topk_ids [T, K] int."""
    _shape("hidden", hidden, "[T, D]", hidden.dim() == 2)
    T, D = hidden.shape
    _shape("w1", w1, f"[E, 2F, D={D}]", w1.dim() == 3 and w1.shape[2] == D and w1.shape[1] % 2 == 0)
    E, F = w1.shape[0], w1.shape[1] // 2
    _shape("w2", w2, f"[E={E}, D={D}, F={F}]", tuple(w2.shape) == (E, D, F))
    _shape("topk_ids", topk_ids, f"[T={T}, K]", topk_ids.dim() == 2 and topk_ids.shape[0] == T)
    K = topk_ids.shape[1]
    _shape("topk_weights", topk_weights, f"[T={T}, K={K}]", tuple(topk_weights.shape) == (T, K))
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    for name, t in (("hidden", hidden), ("w1", w1), ("w2", w2), ("topk_weights", topk_weights)):
        _float(name, t)
    for name, t in (("w1", w1), ("w2", w2), ("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        _same_device(name, t, hidden)


def check_same_dtype(hidden: torch.Tensor, **weights: torch.Tensor) -> None:
    """The Triton GEMMs multiply in one dtype: every weight must have hidden's dtype."""
    for name, w in weights.items():
        if w.dtype != hidden.dtype:
            raise ValueError(
                f"{name} must have the dtype of hidden ({hidden.dtype}), got {w.dtype}"
            )


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """x [..., D] float, weight [D], eps > 0."""
    _float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have shape [..., D], got a scalar")
    D = x.shape[-1]
    _shape("weight", weight, f"[D={D}]", tuple(weight.shape) == (D,))
    _float("weight", weight)
    _same_device("weight", weight, x)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


def check_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    """As check_rms_norm, plus residual with x's shape and dtype."""
    check_rms_norm(x, weight, eps)
    _shape("residual", residual, f"{tuple(x.shape)} (x's shape)", residual.shape == x.shape)
    if residual.dtype != x.dtype:
        raise ValueError(f"residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    _same_device("residual", residual, x)


def check_silu_and_mul(gate_up: torch.Tensor) -> None:
    """gate_up [T, 2F] float."""
    _shape("gate_up", gate_up, "[T, 2F]", gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0)
    _float("gate_up", gate_up)


def check_moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """topk_ids [T, K] int, num_experts >= 1, block_m >= 1."""
    _shape("topk_ids", topk_ids, "[T, K]", topk_ids.dim() == 2)
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m must be a positive int, got {block_m!r}")
