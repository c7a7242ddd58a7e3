"""The Triton kernels on the engine's hot path, on CPU: MOERAY_KERNELS=triton under the Triton
interpreter (TRITON_INTERPRET=1) gives transformers' greedy tokens, in-process and with the
routed experts on Ray shard actors, and the shards run the same kernel code.

The engine runs in a subprocess: TRITON_INTERPRET must be set before the triton_* modules are
imported, and the Ray shard actors inherit the environment of the process that starts Ray.
The in-process shard test runs here, so this module sets TRITON_INTERPRET at import, before
anything imports triton (as tests/kernels/conftest.py does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from moeray import kernels
from moeray.kernels import PackedExperts
from moeray.workers.expert_shard import ExpertShard, ShardBatch, unpack_result
from moeray.workers.moe import LocalExperts

from tests.workers.test_engine import hf_greedy

pytest.importorskip("triton")

PROMPTS = [[5, 17, 99, 3], [200, 11, 45, 46, 47, 60, 61], [42]]
MAX_TOKENS = 6

# Records which triton_* modules the engine's step calls into, then prints the tokens.
_SCRIPT = r"""
import json, sys
from moeray import kernels
from moeray.workers import LLM, SamplingParams

used = set()
_load = kernels.triton_module
def _recording(name):
    used.add(name)
    return _load(name)
kernels.triton_module = _recording

path, shards, prompts, max_tokens = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=path, block_size=4, expert_shards=shards)
try:
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    print(json.dumps({"tokens": [o.token_ids for o in outs], "triton_modules": sorted(used)}))
finally:
    llm.close()
"""


def _run_engine(path: Path, shards: int) -> dict:
    env = {
        **os.environ,
        "MOERAY_KERNELS": "triton",
        "TRITON_INTERPRET": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_ADDRESS": "local",  # a private Ray instance that inherits this environment
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _SCRIPT,
            str(path),
            str(shards),
            json.dumps(PROMPTS),
            str(MAX_TOKENS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("shards", [0, 2])
def test_triton_engine_gives_transformers_greedy_tokens(
    shards: int, tiny_checkpoint: Callable[..., Path]
) -> None:
    path = tiny_checkpoint("mixtral")
    out = _run_engine(path, shards)
    assert out["tokens"] == [hf_greedy(path, p, MAX_TOKENS) for p in PROMPTS]
    # the step's norms, SwiGLU, gating and (in-process) experts ran the Triton kernels
    expected = {"triton_norm", "triton_gating"} | ({"triton_moe"} if shards == 0 else set())
    assert expected <= set(out["triton_modules"])


def test_shards_and_local_experts_run_the_same_triton_code(monkeypatch) -> None:
    """Under MOERAY_KERNELS=triton neither the in-process experts nor a shard packs its weights,
    both call the Triton fused_moe, and a shard's partial rows add up to the in-process layer."""
    calls: list[str] = []
    load = kernels.triton_module
    monkeypatch.setattr(kernels, "triton_module", lambda name: calls.append(name) or load(name))
    g = torch.Generator().manual_seed(0)
    E, D, F = 5, 16, 12
    weights = {
        0: (torch.randn(E, 2 * F, D, generator=g) / 4, torch.randn(E, D, F, generator=g) / 4)
    }
    hidden = torch.randn(6, D, generator=g)
    w, ids = torch.topk(torch.softmax(torch.randn(6, E, generator=g), -1), 2)
    ids = ids.to(torch.int32)
    with kernels.use_backend("triton"):
        local = LocalExperts(weights)
        shard = ExpertShard({0: list(range(E))}, weights=weights)
        assert not isinstance(local.weights[0][0], PackedExperts)
        assert not isinstance(shard.tables[0][0], PackedExperts)
        expected = local.forward_layer(0, hidden, w, ids)
        assert calls == ["triton_moe"]
        reply = shard.run(ShardBatch(0, hidden, w, ids).pack())
        assert calls == ["triton_moe", "triton_moe"]
    rows = unpack_result(reply, ids.numel(), D).view(6, 2, D)  # one weighted row per (t, k)
    order = ids.argsort(dim=1, stable=True)  # the engine adds them in global expert order
    summed = torch.zeros(6, D)
    for k in range(2):
        summed += rows.gather(1, order[:, k, None, None].expand(6, 1, D))[:, 0]
    torch.testing.assert_close(summed, expected, atol=1e-5, rtol=1e-5)
