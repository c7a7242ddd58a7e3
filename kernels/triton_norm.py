"""RMSNorm, residual-add + RMSNorm, and the SwiGLU activation (silu_and_mul) in Triton.

All memory-bound: each reads its inputs once and writes once (add_rms_norm saves the separate
add's read and write of [T, D]). Torch twins: moeray.kernels.reference.rms_norm, .add_rms_norm
and .silu_and_mul. Shape letters: docs/SHAPES.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from moeray.kernels import block_config, contracts

_MAX_FUSED_D = 65536  # a whole row lives in registers; larger D would spill


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, D, stride_x, stride_o, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    # As HF Llama: normalise in fp32, round to x's dtype, then scale by the weight.
    normed = (xf * rstd).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    contracts.check_rms_norm(x, weight, eps)
    D = x.shape[-1]
    if D > _MAX_FUSED_D:
        raise ValueError(f"x's last dim D={D} exceeds the fused RMSNorm limit {_MAX_FUSED_D}")
    x2 = x.reshape(-1, D)  # [T, D]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)  # [T, D]
    if x2.shape[0] > 0:
        cfg = block_config.lookup("rms_norm", f"D={D}", x.dtype, x2.shape[0], x.device)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            weight.contiguous(),
            out,
            D,
            x2.stride(0),
            out.stride(0),
            float(eps),
            BLOCK_D=triton.next_power_of_2(D),
            num_warps=cfg["num_warps"],
        )
    return out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]; see the reference."""
    return _launch_rms_norm(x, weight, eps)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, D, stride_x, stride_r, stride_o, stride_s, eps,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
    # Round the sum to x's dtype first: the next layer's residual is that rounded sum.
    summed = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    tl.store(sum_ptr + row * stride_s + cols, summed, mask=mask)
    sf = summed.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = (sf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    contracts.check_add_rms_norm(x, residual, weight, eps)
    D = x.shape[-1]
    if D > _MAX_FUSED_D:
        raise ValueError(f"x's last dim D={D} exceeds the fused RMSNorm limit {_MAX_FUSED_D}")
    x2 = x.reshape(-1, D).contiguous()  # [T, D]
    r2 = residual.reshape(-1, D).contiguous()  # [T, D]
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)  # [T, D]
    summed = torch.empty_like(x2)  # [T, D]
    if x2.shape[0] > 0:
        cfg = block_config.lookup("rms_norm", f"D={D}", x.dtype, x2.shape[0], x.device)
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), out, summed, D, x2.stride(0), r2.stride(0), out.stride(0),
            summed.stride(0), float(eps), BLOCK_D=triton.next_power_of_2(D), num_warps=cfg["num_warps"],
        )  # fmt: skip
    return out.view(x.shape), summed.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D], weight [D] -> (normed [..., D], x + residual [..., D]); see the reference."""
    return _launch_add_rms_norm(x, residual, weight, eps)


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, F, stride_g, stride_o, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F
    gate = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_g + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    contracts.check_silu_and_mul(gate_up)
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(T, F, dtype=gate_up.dtype, device=gate_up.device)  # [T, F]
    if T > 0 and F > 0:
        cfg = block_config.lookup("silu_and_mul", f"F={F}", gate_up.dtype, T, gate_up.device)
        grid = (T, triton.cdiv(F, cfg["BLOCK_F"]))
        _silu_and_mul_kernel[grid](
            gate_up,
            out,
            F,
            gate_up.stride(0),
            out.stride(0),
            BLOCK_F=cfg["BLOCK_F"],
            num_warps=cfg["num_warps"],
        )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2F] (gate then up) -> [T, F]; see the reference."""
    return _launch_silu_and_mul(gate_up)
