"""The engine on a CUDA GPU in bf16, against transformers on the same GPU (the oracle).

Marked `gpu`; skipped without CUDA (every CPU CI machine). bench/gpu_check.sh runs it on a GPU
machine. Checks that the weights, the KV cache and the step's tensors live on the GPU, that the
Triton kernels are on the hot path (MOERAY_KERNELS=auto picks them for CUDA tensors), and that
the prefill logits and the greedy tokens agree with transformers' within bf16's precision.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from moeray import kernels
from moeray.kernels import dispatch
from moeray.workers import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[5, 17, 99, 3], [200, 11, 45, 46, 47, 60, 61, 62, 63, 70, 71, 300, 301], [42]]
MAX_NEW = 8


def _hf(path: Path):  # type: ignore[no-untyped-def]
    import transformers

    return (
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    )


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_bf16_engine_on_cuda_agrees_with_transformers_on_cuda(
    arch: str, tiny_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert dispatch.triton_available(), "pip install moeray[gpu]: triton is needed on a GPU"
    path = tiny_checkpoint(arch, dtype="bfloat16")
    used: list[str] = []
    load = kernels.triton_module
    monkeypatch.setattr(kernels, "triton_module", lambda name: used.append(name) or load(name))
    llm = LLM(model=path, dtype="bfloat16", device="cuda", block_size=4)
    engine = llm.engine
    assert engine.model.embed_tokens.weight.is_cuda
    assert all(k.is_cuda and v.is_cuda for k, v in engine.runner.kv_caches)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW))
    assert {"triton_moe", "triton_gating", "triton_norm"} <= set(used)
    hf = _hf(path)
    agree = total = 0
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)[0, len(prompt) :]
        ref_tokens = ref.tolist()[: len(out.token_ids)]
        assert out.token_ids[0] == ref_tokens[0], (arch, prompt)  # same prefill argmax
        agree += sum(a == b for a, b in zip(out.token_ids, ref_tokens))
        total += len(ref_tokens)
    # bf16 kernels round differently from transformers' eager ops, so a near-tie may flip late
    assert agree >= 0.75 * total, f"{arch}: {agree}/{total} greedy tokens agree"


def test_seeded_sampling_on_cuda_is_reproducible(tiny_checkpoint: Callable[..., Path]) -> None:
    """Sampling stays on the GPU; a seeded request draws its noise on the CPU, so it repeats."""
    llm = LLM(model=tiny_checkpoint("mixtral"), device="cuda")
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=6, seed=7)
    first = llm.generate(PROMPTS[0], params)[0].token_ids
    again = llm.generate([PROMPTS[0], PROMPTS[1]], [params, params])[0].token_ids
    assert first == again
