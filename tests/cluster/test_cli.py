"""The `moeray` command line in a subprocess: generate --output json equals LLM.generate, bad flags
give one line naming the flag with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from moeray.workers import LLM, SamplingParams

from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ck"), "qwen3_moe")


def moeray(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moeray.cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_json_equals_the_python_api(path: Path) -> None:
    proc = moeray(
        "generate", "--model", str(path), "--prompt-token-ids", "5,6,7,8",
        "--max-tokens", "7", "--temperature", "0", "--output", "json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    want = LLM(model=path).generate([5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=7))[0]
    assert got["token_ids"] == want.token_ids
    assert got["text"] == want.text
    assert got["finish_reason"] == want.finish_reason.value  # type: ignore[union-attr]
    assert got["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


def test_generate_text_with_seed_is_reproducible(path: Path) -> None:
    proc = moeray("generate", "--model", str(path), "--prompt", "Hello", "--max-tokens", "5",
                  "--temperature", "1.0", "--top-k", "20", "--seed", "3", "--stop", "zz")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    params = SamplingParams(max_tokens=5, temperature=1.0, top_k=20, seed=3, stop=["zz"])
    assert proc.stdout == LLM(model=path).generate("Hello", params)[0].text + "\n"


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--max-tokens", "x"], "--max-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--output", "xml"], "--output"),
        (["--prompt-token-ids", "1,a"], "--prompt-token-ids"),
        (["--model", "/nonexistent/ckpt"], "--model"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag(path: Path, flags: list[str], named: str) -> None:
    base = {"--model": str(path), "--prompt": "hi"}
    if "--prompt-token-ids" in flags:
        base.pop("--prompt")
    for flag, value in zip(flags[::2], flags[1::2]):
        base[flag] = value
    proc = moeray("generate", *[x for kv in base.items() for x in kv])
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "Loading weights" not in ln]
    assert len(lines) == 1 and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
