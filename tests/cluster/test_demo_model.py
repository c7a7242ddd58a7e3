"""The demo checkpoint (written without transformers) is a real HF checkpoint: transformers loads
it and computes the same logits as moeray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from moeray.cluster.demo_model import ARCHS, PRESETS, build_demo_checkpoint, demo_config
from moeray.workers.loader import load_model

from tests.workers.paged_driver import PagedDriver

PROMPTS = [[5, 9, 33, 100, 7], [3, 44, 200, 17]]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_demo_checkpoint_loads_in_transformers_with_equal_logits(arch: str, tmp_path: Path) -> None:
    import transformers

    path = build_demo_checkpoint(tmp_path / arch, arch=arch, preset="tiny", seed=1)
    model = load_model(path, progress=False)
    ours = PagedDriver(model, len(PROMPTS), 16).step(PROMPTS).split([len(p) for p in PROMPTS])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf).__name__ == ARCHS[arch]
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(ours[b], ref, atol=1e-4, rtol=1e-4)


def test_demo_checkpoint_files_and_eos(tmp_path: Path) -> None:
    path = build_demo_checkpoint(tmp_path / "demo", dtype="bfloat16")
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names  # the demo tokenizer
    model = load_model(path, progress=False)
    assert model.args.dtype == torch.bfloat16
    assert model.args.eos_token_ids == [0, 2]  # <|endoftext|>, <|im_end|>
    assert model.args.num_experts == PRESETS["tiny"]["experts"]


def test_bench_preset_shape() -> None:
    cfg = demo_config("mixtral", "bench", "float32")
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (512, 8, 8)
    assert (cfg["num_key_value_heads"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (
        2,
        8,
        2,
    )
    assert (cfg["intermediate_size"], cfg["vocab_size"]) == (1024, 32000)


def test_bad_arch_and_preset_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch"):
        build_demo_checkpoint(tmp_path, arch="gpt2")
    with pytest.raises(ValueError, match="preset"):
        build_demo_checkpoint(tmp_path, preset="huge")
