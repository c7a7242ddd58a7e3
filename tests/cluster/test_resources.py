"""Placement of a tier's engine: the device fields of the config, the Ray options of a replica
(cluster/resources.py), and `device: cuda` refused clearly where no GPU is (this CPU machine)."""

from __future__ import annotations

import os

import pytest
import torch
from moeray.cluster.cli import main
from moeray.cluster.config import MoerayConfig, TierConfig, describe_validation_error
from moeray.cluster.resources import engine_actor_options
from moeray.workers.model_runner import resolve_device
from pydantic import ValidationError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def _config(**tier: object) -> MoerayConfig:
    return MoerayConfig.model_validate({"tiers": [{"name": "fast", "model": "/m", **tier}]})


def test_device_fields_default_to_auto_on_no_reserved_resources() -> None:
    tier = _config().tiers[0]
    assert (tier.device, tier.num_cpus, tier.num_gpus) == ("auto", 0.0, 0.0)
    assert _config(device="cuda", num_gpus=1, num_cpus=4).tiers[0].device == "cuda"


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"device": "gpu"}, "tiers.0.device"),
        ({"num_cpus": -1}, "tiers.0.num_cpus"),
        ({"num_gpus": -0.5}, "tiers.0.num_gpus"),
        ({"device": "cuda"}, "tiers[fast].num_gpus"),  # Ray would hide the GPUs from it
    ],
)
def test_bad_placement_names_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError) as err:
        _config(**fields)
    assert named in describe_validation_error(err.value)


def test_engine_actor_options_ask_ray_for_the_tier_resources() -> None:
    cpu = engine_actor_options(TierConfig(name="a", model="/m", num_cpus=3.5))
    assert cpu["num_cpus"] == 3.5 and cpu["num_gpus"] == 0.0
    env = cpu["runtime_env"]["env_vars"]
    assert env["OMP_NUM_THREADS"] == "3" and "OMP_WAIT_POLICY" not in env  # experts in-process
    sharded = TierConfig(name="s", model="/m", num_cpus=2, experts={"shards": 2})
    assert engine_actor_options(sharded)["runtime_env"]["env_vars"]["OMP_WAIT_POLICY"] == "PASSIVE"
    gpu = engine_actor_options(TierConfig(name="b", model="/m", device="cuda", num_gpus=1))
    assert gpu["num_gpus"] == 1 and gpu["num_cpus"] == 0.0
    # No CPUs reserved: every core of the machine, not the one thread Ray gives such actors.
    threads = gpu["runtime_env"]["env_vars"]["OMP_NUM_THREADS"]
    assert threads == str(os.cpu_count())
    assert "resources" not in gpu
    pinned = engine_actor_options(TierConfig(name="c", model="/m", resource="moeray_engine_c"))
    assert pinned["resources"] == {"moeray_engine_c": 1}


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match=r"tiers\.fast\.device must be auto, cpu"):
        resolve_device("tpu", "tiers.fast.device")


@no_cuda
def test_cuda_without_a_gpu_is_refused_naming_the_field(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"tiers\.fast\.device is 'cuda' but torch sees no CUDA"):
        resolve_device("cuda", "tiers.fast.device")
    from moeray.workers.engine import LLMEngine

    with pytest.raises(ValueError, match="device is 'cuda' but torch sees no CUDA"):
        LLMEngine(tmp_path, device="cuda")  # refused before anything is read


@no_cuda
def test_generate_device_cuda_without_a_gpu_exits_2(tmp_path, capsys) -> None:
    from moeray.cluster.demo_model import build_demo_checkpoint

    path = build_demo_checkpoint(tmp_path / "tiny", preset="tiny")
    argv = ["generate", "--model", str(path), "--prompt", "hi", "--device", "cuda"]
    assert main(argv) == 2
    assert "device is 'cuda'" in capsys.readouterr().err
    assert main([*argv[:-1], "cpu", "--max-tokens", "2", "--no-cpu-tuning"]) == 0
