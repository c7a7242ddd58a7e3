"""CPU tuning, in one optional place: a transform of a finished model and a process environment.

The model, the loader and the engine know nothing of CPUs. What makes a CPU engine fast is
applied afterwards, the way gpt-fast applies tensor parallelism to a finished model:

- `apply_cpu_tuning(model)` swaps every nn.Linear of a CPU model for a `PackedLinear` whose
  weight was reordered once into a blocked layout (kernels/cpu_packed.py: moeray's CPU GEMM where
  the CPU has AVX512_BF16 or AVX2 + FMA, else oneDNN's; the routed experts get the same treatment inside
  moeray.kernels), and caps the BLAS that numpy loads
  (OpenBLAS) at one thread with threadpoolctl: numpy only does bookkeeping here, and a second
  BLAS thread pool busy-waits beside torch's OpenMP workers and starves them on a small node.
  Greedy tokens stay those of transformers (tests/workers/test_cpu_tuning.py).
- `cpu_process_env(num_threads, waits_on_peers=...)` is the environment of a process that runs
  CPU torch work (an engine replica, an expert shard): thread counts and the OpenMP wait policy
  must be set before torch loads its OpenMP runtime, so they belong where the process is
  created (a Ray `runtime_env`), not in code that runs after `import torch`.

Nothing here changes per step: no thread counts flipped, no calls into an OpenMP runtime.
"""

from __future__ import annotations

import threadpoolctl
import torch
from moeray.kernels import PackedWeight, packed_linear, packs_cpu_weights
from torch import nn

#: Weights with fewer elements stay plain nn.Linear, unless they are bf16 and moeray's GEMM
#: takes them: a oneDNN call costs ~15 us whatever its size, more than MKL takes for a small fp32
#: weight (a Mixtral router gate [8, 512] at one row 2.4 us plain vs 14.7 us packed, at 64 rows
#: 11.6 vs 20.0; a [64, 512] one 4.2 vs 15.5 and 29 vs 34), while from [512, 512] up the packed
#: form is as fast or faster at every row count (2-core dev VM, 2026-11-30, 2 threads). Router
#: gates of MoE models are the usual small ones. In bf16 torch's own GEMM is the slow one and
#: moeray's costs little per call: the [8, 512] gate at 1 / 64 / 512 rows 3.3 / 19.5 / 22.6 us
#: plain vs 1.8 / 2.2 / 6.6 us (2-core Sapphire Rapids VM, AMX tiles, 2026-12-02).
MIN_PACKED_ELEMENTS = 65536


class PackedLinear(nn.Module):
    """nn.Linear's forward on a prepacked weight (kernels/cpu_packed.py): x [T, in] -> [T, out]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = PackedWeight(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        form = "oneDNN" if self.packed.blocked is None else "moeray"
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}-packed"


def apply_cpu_tuning(model: nn.Module) -> nn.Module:
    """Tunes a finished CPU model in place and returns it; a no-op for a model on another
    device, or with weights oneDNN cannot pack (kernels.packs_cpu_weights: MOERAY_KERNELS=torch
    keeps the plain layers). Weights under MIN_PACKED_ELEMENTS stay plain unless they are bf16
    on moeray's GEMM.

    FOOTGUN: a packed layer's weight is opaque (no `.weight` to read or load into), so apply it
    last, after loading and after any other transform that reads weights. The embedding table
    stays plain, so a tied LM head gets a packed copy of it.
    """
    threadpoolctl.threadpool_limits(limits=1, user_api="blas")
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
        and packs_cpu_weights(child.weight)
        and (child.weight.numel() >= MIN_PACKED_ELEMENTS or child.weight.dtype == torch.bfloat16)
    ]
    for parent, name, child in swaps:
        packed = PackedLinear(child)
        if child.weight.numel() >= MIN_PACKED_ELEMENTS or packed.packed.blocked is not None:
            setattr(parent, name, packed)  # a small bf16 one only on moeray's GEMM
    return model


def cpu_process_env(num_threads: int, *, waits_on_peers: bool) -> dict[str, str]:
    """Environment variables for a process that runs CPU torch work on `num_threads` cores.

    For Ray: `runtime_env={"env_vars": cpu_process_env(n, ...)}` where the engine replica or
    shard actor is created. OMP_NUM_THREADS / MKL_NUM_THREADS size torch's intra-op pool;
    OPENBLAS_NUM_THREADS=1 keeps numpy's BLAS single-threaded.

    waits_on_peers: the process spends its steps waiting for other processes' CPU work on the
    same node (an engine dispatching to expert shards, a shard between its engine's layers).
    Then OMP_WAIT_POLICY=PASSIVE: its idle OpenMP workers sleep at once instead of
    busy-waiting for milliseconds after every parallel region on the cores its peers need.
    Otherwise the OpenMP runtime's default stays: a step is hundreds of short parallel regions,
    and waking sleeping workers for each one made an engine with in-process experts 1.7x slower
    per decode step (docs/BENCHMARKS.md, "OpenMP's wait policy").
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    n = str(num_threads)
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": "1"}
    if waits_on_peers:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env
