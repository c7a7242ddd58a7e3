"""Backend selection (MOERAY_KERNELS, the override) and argument checks of the public API."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from moeray import kernels
from moeray.kernels import dispatch


def test_auto_picks_torch_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("MOERAY_KERNELS", raising=False)
    assert dispatch.configured_backend() == "auto"
    assert dispatch.resolve(torch.zeros(1)) == "torch"


def test_environment_and_override(monkeypatch):
    monkeypatch.setenv("MOERAY_KERNELS", "torch")
    assert dispatch.resolve(torch.zeros(1)) == "torch"
    with kernels.use_backend("triton"):
        assert dispatch.configured_backend() == "triton"
        with kernels.use_backend("auto"):
            assert dispatch.configured_backend() == "auto"
        assert dispatch.configured_backend() == "triton"
    assert dispatch.configured_backend() == "torch"
    monkeypatch.setenv("MOERAY_KERNELS", "cuda")
    with pytest.raises(ValueError, match="MOERAY_KERNELS"):
        dispatch.configured_backend()
    with pytest.raises(ValueError, match="backend"):
        kernels.set_backend("fast")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dispatch.resolve(torch.zeros(1))


def test_kernels_work_without_triton_installed():
    """A subprocess where `import triton` fails: the package imports and runs the torch path."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from moeray import kernels\n"
        "from moeray.kernels import dispatch\n"
        "assert not dispatch.triton_available()\n"
        "w, ids = kernels.topk_gating(torch.randn(3, 4), 2)\n"
        "out = kernels.fused_moe(torch.randn(3, 8), torch.randn(4, 6, 8), torch.randn(4, 8, 3), w, ids)\n"
        "assert out.shape == (3, 8)\n"
        "dispatch.set_backend('triton')\n"
        "try:\n"
        "    kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('expected RuntimeError')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MOERAY_KERNELS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "call,field",
    [
        (lambda: kernels.topk_gating(torch.randn(3), 1), "router_logits"),
        (lambda: kernels.topk_gating(torch.randn(3, 4), 5), "top_k"),
        (lambda: kernels.topk_gating(torch.randn(3, 4), 2, scoring="relu"), "scoring"),
        (lambda: kernels.topk_gating(torch.randn(3, 4), 2, bias=torch.zeros(3)), "bias"),
        (
            lambda: kernels.fused_moe(
                torch.randn(3, 8),
                torch.randn(4, 6, 7),
                torch.randn(4, 8, 3),
                torch.rand(3, 2),
                torch.zeros(3, 2, dtype=torch.int32),
            ),
            "w1",
        ),
        (
            lambda: kernels.fused_moe(
                torch.randn(3, 8),
                torch.randn(4, 6, 8),
                torch.randn(4, 8, 4),
                torch.rand(3, 2),
                torch.zeros(3, 2, dtype=torch.int32),
            ),
            "w2",
        ),
        (
            lambda: kernels.fused_moe(
                torch.randn(3, 8),
                torch.randn(4, 6, 8),
                torch.randn(4, 8, 3),
                torch.rand(3, 1),
                torch.zeros(3, 2, dtype=torch.int32),
            ),
            "topk_weights",
        ),
        (
            lambda: kernels.fused_moe(
                torch.randn(3, 8),
                torch.randn(4, 6, 8),
                torch.randn(4, 8, 3),
                torch.rand(3, 2),
                torch.zeros(3, 2),
            ),
            "topk_ids",
        ),
        (lambda: kernels.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6), "weight"),
        (lambda: kernels.rms_norm(torch.randn(2, 8), torch.ones(8), 0.0), "eps"),
        (
            lambda: kernels.add_rms_norm(torch.randn(2, 8), torch.randn(2, 7), torch.ones(8), 1e-6),
            "residual",
        ),
        (lambda: kernels.silu_and_mul(torch.randn(2, 7)), "gate_up"),
        (lambda: kernels.moe_align(torch.zeros(3, 2, dtype=torch.int32), 0), "num_experts"),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()
