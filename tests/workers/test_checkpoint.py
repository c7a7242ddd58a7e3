"""Checkpoint reading: sharded checkpoints, per-expert loading, fused expert layouts, and the
CheckpointError every broken checkpoint must give (naming the file, tensor or field)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from moeray.workers.checkpoint import CheckpointError, load_expert_weights
from moeray.workers.hf_config import parse_config, read_model_args
from moeray.workers.loader import load_model
from moeray.workers.moe import LocalExperts
from safetensors.torch import load_file, save_file

from tests.checkpoints import tiny_config
from tests.workers.paged_driver import PagedDriver

PROMPTS = [[5, 9, 33, 100, 7], [3, 44, 200]]


def logits(path: Path) -> torch.Tensor:
    return PagedDriver(load_model(path, progress=False), len(PROMPTS), 16).step(PROMPTS)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def split_per_tensor(src: Path, dst: Path) -> Path:
    """Re-shards a checkpoint into one file per tensor, with an index (a valid HF layout)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    weight_map = {}
    for i, (name, tensor) in enumerate(sorted(load_file(src / "model.safetensors").items())):
        file = f"model-{i:05d}.safetensors"
        save_file({name: tensor.contiguous()}, str(dst / file), metadata={"format": "pt"})
        weight_map[name] = file
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return dst


def test_sharded_checkpoint_loads_the_same(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    import transformers

    single = tiny_checkpoint("mixtral")
    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")  # transformers writes the index itself
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    torch.testing.assert_close(logits(sharded), logits(single), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_load_expert_weights_returns_the_experts_slices(
    arch: str, tiny_checkpoint: Callable[..., Path]
) -> None:
    import transformers

    path = tiny_checkpoint(arch)
    layer = read_model_args(path).moe_layers[-1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path)
    experts = hf.model.layers[layer].mlp.experts  # transformers' fused [E, 2F, D] / [E, D, F]
    w1, w2 = load_expert_weights(path, layer, [3, 1], "float32")
    torch.testing.assert_close(w1, experts.gate_up_proj.detach()[[3, 1]], atol=0, rtol=0)
    torch.testing.assert_close(w2, experts.down_proj.detach()[[3, 1]], atol=0, rtol=0)
    w1_bf16, _ = load_expert_weights(path, layer, [0], "bfloat16")
    assert w1_bf16.dtype == torch.bfloat16


def test_load_expert_weights_reads_only_the_experts_files(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """Every tensor in its own file; delete all files but those of the requested experts."""
    full = tiny_checkpoint("mixtral")
    path = split_per_tensor(full, tmp_path / "split")
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    keep = {f for name, f in index.items() if ".layers.1.block_sparse_moe.experts.2." in name}
    assert len(keep) == 3
    for file in path.glob("*.safetensors"):
        if file.name not in keep:
            file.unlink()
    w1, w2 = load_expert_weights(path, 1, [2], "float32")
    ref_w1, ref_w2 = load_expert_weights(full, 1, [0, 1, 2, 3], "float32")
    torch.testing.assert_close(w1[0], ref_w1[2], atol=0, rtol=0)
    torch.testing.assert_close(w2[0], ref_w2[2], atol=0, rtol=0)


def test_fused_expert_layout_is_accepted(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """A checkpoint that stores experts fused (transformers' in-memory names) loads the same."""
    src = tiny_checkpoint("olmoe")
    dst = copy_checkpoint(src, tmp_path / "fused")
    tensors = load_file(src / "model.safetensors")
    args = read_model_args(src)
    for layer in args.moe_layers:
        w1, w2 = load_expert_weights(src, layer, list(range(args.num_experts)), "float32")
        for e in range(args.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                del tensors[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]
        tensors[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = w1
        tensors[f"model.layers.{layer}.mlp.experts.down_proj"] = w2
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    torch.testing.assert_close(logits(dst), logits(src), atol=0, rtol=0)


# --- broken checkpoints ----------------------------------------------------------------------
def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def rewrite_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def break_arch(p: Path) -> None:
    edit_config(p, architectures=["GPT2LMHeadModel"])


def break_field(p: Path) -> None:
    edit_config(p, hidden_size=None)


def break_config_json(p: Path) -> None:
    (p / "config.json").write_text("{not json")


def remove_config(p: Path) -> None:
    (p / "config.json").unlink()


def remove_tensor(p: Path) -> None:
    rewrite_tensors(p, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))


def remove_expert(p: Path) -> None:
    rewrite_tensors(p, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.3.w2.weight"))


def misshape_tensor(p: Path) -> None:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 5)

    rewrite_tensors(p, edit)


def corrupt_file(p: Path) -> None:
    (p / "model.safetensors").write_bytes(b"\x00garbage" * 100)


def truncate_file(p: Path) -> None:
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])


def remove_weights(p: Path) -> None:
    (p / "model.safetensors").unlink()


def bad_index_json(p: Path) -> None:
    (p / "model.safetensors.index.json").write_text("[1, 2")


def index_names_missing_file(p: Path) -> None:
    index = {"weight_map": {"model.embed_tokens.weight": "model-00009-of-00009.safetensors"}}
    (p / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN = [
    (break_arch, "architectures"),
    (break_field, "hidden_size"),
    (break_config_json, "config.json"),
    (remove_config, "config.json"),
    (remove_tensor, "model.layers.1.self_attn.k_proj.weight"),
    (remove_expert, "experts.3"),
    (misshape_tensor, "model.layers.0.self_attn.o_proj.weight"),
    (corrupt_file, "model.safetensors"),
    (truncate_file, "model.safetensors"),
    (remove_weights, "safetensors"),
    (bad_index_json, "model.safetensors.index.json"),
    (index_names_missing_file, "weight_map"),
]


@pytest.mark.parametrize(("breaker", "named"), BROKEN, ids=[b.__name__ for b, _ in BROKEN])
def test_broken_checkpoint_raises_checkpoint_error_naming_the_culprit(
    breaker: Callable[[Path], None],
    named: str,
    tiny_checkpoint: Callable[..., Path],
    tmp_path: Path,
) -> None:
    path = copy_checkpoint(tiny_checkpoint("mixtral"), tmp_path / "broken")
    breaker(path)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as info:
        load_model(path, progress=False)
    assert isinstance(info.value, ValueError)


def test_bad_dtype_and_expert_requests_are_named(tiny_checkpoint: Callable[..., Path]) -> None:
    path = tiny_checkpoint("mixtral")
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(path, dtype="int8", progress=False)
    with pytest.raises(CheckpointError, match="out of range"):
        load_expert_weights(path, 0, [7], "float32")
    with pytest.raises(CheckpointError, match="layer 5"):
        load_expert_weights(path, 5, [0], "float32")


def test_unsupported_rope_type_is_named(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    path = copy_checkpoint(tiny_checkpoint("llama"), tmp_path / "rope")
    edit_config(path, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope_type"):
        load_model(path, progress=False)


def test_tiny_config_knows_every_arch() -> None:
    with pytest.raises(ValueError, match="arch"):
        tiny_config("gpt2")


def test_model_with_given_backend_skips_experts(
    tiny_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    """load_model(expert_backend=...) never reads routed experts: a backend built from
    load_expert_weights serves a checkpoint whose expert tensors are gone, with equal logits."""
    full = tiny_checkpoint("qwen2_moe")
    args = read_model_args(full)
    everything = list(range(args.num_experts))
    backend = LocalExperts(
        {layer: load_expert_weights(full, layer, everything) for layer in args.moe_layers}
    )
    stripped = copy_checkpoint(full, tmp_path / "no-experts")
    rewrite_tensors(stripped, lambda t: [t.pop(n) for n in list(t) if ".mlp.experts." in n])
    model = load_model(stripped, expert_backend=backend, progress=False)
    ours = PagedDriver(model, len(PROMPTS), 16).step(PROMPTS)
    # the loader keeps its own experts column-major on CPU: same math, other summation order
    torch.testing.assert_close(ours, logits(full), atol=1e-5, rtol=1e-5)


def test_legacy_config_fields_parse_like_new_ones(tiny_checkpoint: Callable[..., Path]) -> None:
    """transformers 4.x wrote rope_theta/rope_scaling/torch_dtype at the top level."""
    cfg = json.loads((tiny_checkpoint("llama") / "config.json").read_text())
    legacy = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(cfg["rope_parameters"])
    legacy["rope_theta"] = rope.pop("rope_theta")
    legacy["rope_scaling"] = {**rope, "type": rope.pop("rope_type")}
    legacy["torch_dtype"] = "bfloat16"
    new, old = parse_config(cfg), parse_config(legacy)
    assert old.dtype == torch.bfloat16 and new.dtype == torch.float32
    assert (old.rope_theta, old.rope_scaling) == (new.rope_theta, new.rope_scaling)
