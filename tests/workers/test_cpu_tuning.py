"""workers/cpu_tuning.py: the engine with the CPU transform on and off gives transformers' greedy
tokens, the transform swaps the linear layers (all but the small ones), and the process
environment it asks for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import threadpoolctl
import torch
from moeray import kernels
from moeray.kernels import cpu_gemm
from moeray.workers import LLM, SamplingParams, cpu_tuning
from moeray.workers.cpu_tuning import PackedLinear, apply_cpu_tuning, cpu_process_env
from moeray.workers.loader import load_model
from torch import nn

from tests.workers.test_engine import hf_greedy

PROMPTS = [[5, 17, 99, 3], [200, 11, 45, 46, 47, 60, 61, 62, 63, 70, 71, 300, 301], [42]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)


def _linears(model: nn.Module) -> tuple[int, int]:
    mods = list(model.modules())
    return sum(type(m) is nn.Linear for m in mods), sum(type(m) is PackedLinear for m in mods)


@pytest.fixture
def pack_every_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny test models' weights are all under MIN_PACKED_ELEMENTS: pack them anyway."""
    monkeypatch.setattr(cpu_tuning, "MIN_PACKED_ELEMENTS", 0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "llama"])
@pytest.mark.parametrize("tuning", [True, False])
def test_greedy_matches_transformers_with_and_without_the_transform(
    arch: str, tuning: bool, tiny_checkpoint: Callable[..., Path], pack_every_linear: None
) -> None:
    path = tiny_checkpoint(arch)
    llm = LLM(model=path, block_size=4, cpu_tuning=tuning)
    plain, packed = _linears(llm.engine.model)
    assert (plain == 0 and packed > 0) if tuning else (plain > 0 and packed == 0)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        assert out.token_ids == hf_greedy(path, prompt, GREEDY.max_tokens), (arch, tuning)


def test_transform_swaps_every_linear_and_keeps_the_logits(
    tiny_checkpoint: Callable[..., Path], pack_every_linear: None
) -> None:
    """qwen2_moe has q/k/v biases, a shared expert and its gate: every nn.Linear is swapped and
    the logits stay within fp32 rounding of the plain model's; numpy's BLAS is capped at one
    thread."""
    from tests.workers.test_model_parity import moeray_prefill_logits

    path = tiny_checkpoint("qwen2_moe")
    prompts = [[3, 9, 27, 81], [7]]
    plain = load_model(path, progress=False)
    count = _linears(plain)[0]  # qkv, o, the router gate, shared expert (+ its gate), dense FFNs
    before = moeray_prefill_logits(plain, prompts)
    model = apply_cpu_tuning(load_model(path, progress=False))
    assert count == 17 and _linears(model) == (0, count)
    for a, b in zip(before, moeray_prefill_logits(model, prompts)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    blas = threadpoolctl.threadpool_info()
    assert all(lib["num_threads"] == 1 for lib in blas if lib["user_api"] == "blas")


def test_dense_layers_take_the_packed_path_s_gemm() -> None:
    """moeray's CPU GEMM where this CPU runs it, oneDNN's when MOERAY_KERNELS=onednn."""
    layer = nn.Linear(512, 768)
    x = torch.randn(3, 512)
    own = PackedLinear(layer)
    assert (own.packed.blocked is not None) == cpu_gemm.available()
    with kernels.use_backend("onednn"):
        onednn = PackedLinear(layer)
    assert onednn.packed.blocked is None and "oneDNN-packed" in repr(onednn)
    for packed in (own, onednn):
        torch.testing.assert_close(packed(x), layer(x), atol=1e-4, rtol=1e-4)


def test_small_weights_stay_plain_unless_bf16_on_moerays_gemm() -> None:
    """A router gate [8, 512] is faster through MKL than through a oneDNN call: not packed in
    fp32; in bf16 moeray's GEMM (where it runs) beats torch's, so there it is packed."""
    model = nn.Sequential(nn.Linear(512, 8, bias=False), nn.Linear(512, 768), nn.Linear(512, 128))
    apply_cpu_tuning(model)
    assert [type(m).__name__ for m in model] == ["Linear", "PackedLinear", "PackedLinear"]
    assert cpu_tuning.MIN_PACKED_ELEMENTS == 512 * 128
    gate = nn.Sequential(nn.Linear(512, 8, bias=False)).to(torch.bfloat16)
    x = torch.randn(5, 512).to(torch.bfloat16)
    before = gate(x)
    apply_cpu_tuning(gate)
    own = cpu_gemm.available()
    assert type(gate[0]).__name__ == ("PackedLinear" if own else "Linear")
    torch.testing.assert_close(gate(x), before, atol=2e-2, rtol=2e-2)


def test_transform_keeps_plain_layers_under_the_torch_references(
    tiny_checkpoint: Callable[..., Path],
) -> None:
    with kernels.use_backend("torch"):
        model = apply_cpu_tuning(load_model(tiny_checkpoint("mixtral"), progress=False))
    assert _linears(model)[1] == 0


def test_process_env_sizes_the_pools_and_stops_spinning_only_for_waiters() -> None:
    env = cpu_process_env(3, waits_on_peers=True)
    assert env["OMP_NUM_THREADS"] == "3" and env["MKL_NUM_THREADS"] == "3"
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert all(isinstance(v, str) for v in env.values())
    # A process that computes on its own keeps the runtime's spin-then-sleep default.
    alone = cpu_process_env(2, waits_on_peers=False)
    assert alone == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "1"}
    with pytest.raises(ValueError, match="num_threads"):
        cpu_process_env(0, waits_on_peers=False)
