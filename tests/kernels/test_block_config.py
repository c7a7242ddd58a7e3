"""Block sizes come from the JSON configs: tuned entries win, the nearest T bucket is used."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moeray.kernels import block_config


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    for path in block_config.CONFIG_DIR.glob("*.json"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(block_config, "CONFIG_DIR", tmp_path)
    block_config._load.cache_clear()
    yield tmp_path
    block_config._load.cache_clear()


def test_every_shipped_config_has_both_fallbacks():
    for path in block_config.CONFIG_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert set(data["fallback"]) == {"cuda", "interpreter"}, path.name
        assert all(int(t) >= 1 for buckets in data["fallback"].values() for t in buckets), path.name


def test_tuned_entry_wins_and_nearest_bucket_is_used(config_dir):
    cpu = torch.device("cpu")
    assert block_config.lookup("fused_moe", "E=8,F=48,D=32", torch.float32, 7, cpu)["BLOCK_M"] == 16
    key = block_config.tuned_key("interpreter", "E=8,F=48,D=32", torch.float32)
    tuned = {"1": {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1},
             "64": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1}}  # fmt: skip
    block_config.write_tuned("fused_moe", key, tuned)
    assert block_config.lookup("fused_moe", "E=8,F=48,D=32", torch.float32, 7, cpu)["BLOCK_M"] == 16
    assert (
        block_config.lookup("fused_moe", "E=8,F=48,D=32", torch.float32, 40, cpu)["BLOCK_M"] == 32
    )
    # Another shape or dtype still gets the fallback.
    assert (
        block_config.lookup("fused_moe", "E=8,F=48,D=32", torch.bfloat16, 40, cpu)["BLOCK_N"] == 32
    )
    assert json.loads((config_dir / "fused_moe.json").read_text())["tuned"][key] == tuned


def test_unknown_kernel_is_a_value_error():
    with pytest.raises(ValueError, match="no_such_kernel"):
        block_config.lookup("no_such_kernel", "", torch.float32, 1, torch.device("cpu"))
