"""Chooses Triton or torch for every kernel call: the one place that decides, and the one place
that reads MOERAY_KERNELS.

    MOERAY_KERNELS=auto    (default) Triton for CUDA tensors when triton is installed, else torch
    MOERAY_KERNELS=triton  always Triton (on CPU tensors only under TRITON_INTERPRET=1: tests)
    MOERAY_KERNELS=torch   always the torch references
    MOERAY_KERNELS=onednn  as auto, but without moeray's C++ CPU kernels (kernels/cpu_gemm.py):
                           oneDNN's GEMM and torch's attention instead, for comparing

Tests override it with `use_backend("triton")` (a context manager) or `set_backend(...)`.

The torch backend has a CPU fast path: weights prepacked once into a blocked layout
(kernels/cpu_packed.py), multiplied by moeray's CPU GEMM where it runs (`cpu_gemm_wanted`), else
by oneDNN's. `packs_cpu_weights` decides when weights are prepared: under "auto" and "onednn" for
CPU weights of a dtype oneDNN packs; "torch" keeps the plain references (the oracle) and
"triton" the Triton kernels.
triton is an optional extra ([gpu]): it is imported only when a Triton kernel is about to run,
so `import moeray.kernels` works without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch", "onednn")
_override: str | None = None


def _validate(name: str, field: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{field} must be one of {', '.join(BACKENDS)}, got {name!r}")
    return name


def configured_backend() -> str:
    """The backend asked for: the override if one is set, else MOERAY_KERNELS, else 'auto'."""
    if _override is not None:
        return _override
    return _validate(os.environ.get("MOERAY_KERNELS", "auto").strip().lower(), "MOERAY_KERNELS")


def set_backend(name: str | None) -> None:
    """Overrides MOERAY_KERNELS for this process; None goes back to the environment."""
    global _override
    _override = None if name is None else _validate(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """`with use_backend("triton"): ...` runs the block with that backend, then restores."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether the optional triton package is importable (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Whether Triton kernels would run on CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def resolve(tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for a call whose main input is `tensor`."""
    backend = configured_backend()
    if backend in ("auto", "onednn"):
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(
                "MOERAY_KERNELS=triton but triton is not installed (pip install moeray[gpu])"
            )
        if not tensor.is_cuda and not interpreter_enabled():
            raise RuntimeError(
                "MOERAY_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return backend


def packs_cpu_weights(weight: torch.Tensor) -> bool:
    """Whether kernels.prepare_expert_weights packs `weight` for the CPU fast path."""
    from moeray.kernels import cpu_packed

    return (
        configured_backend() in ("auto", "onednn")
        and weight.device.type == "cpu"
        and cpu_packed.supported(weight.dtype, weight.shape[-1])
    )


def cpu_gemm_wanted() -> bool:
    """Whether the CPU fast path may use moeray's CPU GEMM (kernels/cpu_gemm.py): not under
    "onednn"."""
    return configured_backend() != "onednn"


def runs_cpu_kernels(tensor: torch.Tensor) -> bool:
    """Whether moeray's C++ CPU kernels (kernels/cpu_gemm.py: decode attention, norms, rope) take
    a call whose main input is `tensor`: under "auto", on CPU, fp32 or bf16, where the extension
    runs. Else the torch references (and, for decode attention, the caller's gather + SDPA)."""
    from moeray.kernels import cpu_gemm

    return (
        configured_backend() == "auto"
        and tensor.device.type == "cpu"
        and tensor.dtype in (torch.float32, torch.bfloat16)
        and cpu_gemm.available()
    )


def triton_module(name: str) -> ModuleType:
    """Imports moeray.kernels.<name> (a module that imports triton) on first use."""
    return importlib.import_module(f"moeray.kernels.{name}")
