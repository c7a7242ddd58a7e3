"""moeray.kernels: the MoE hot path behind one API, Triton on CUDA and torch everywhere.

The public functions (shape letters in docs/SHAPES.md):
    topk_gating(router_logits [T, E], top_k, scoring, renormalize, bias) -> (weights f32 [T, K], ids i32 [T, K])
    fused_moe(hidden [T, D], w1 [E, 2F, D], w2 [E, D, F], topk_weights [T, K], topk_ids [T, K]) -> [T, D]
    rms_norm(x [..., D], weight [D], eps) -> [..., D]
    silu_and_mul(gate_up [T, 2F]) -> [T, F]

Which implementation runs is decided in one place (moeray.kernels.dispatch, MOERAY_KERNELS).
"""

from moeray.kernels.reference import fused_moe, rms_norm, silu_and_mul, topk_gating

__all__ = ["fused_moe", "rms_norm", "silu_and_mul", "topk_gating"]
