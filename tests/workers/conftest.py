"""Fixtures for the model tests: tiny HF checkpoints, written once per session.

`tiny_checkpoint(arch, dtype="float32", **overrides)` returns the directory of a checkpoint saved
by transformers (tests/checkpoints.py); identical requests share one directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    cache: dict[str, Path] = {}

    def get(arch: str, dtype: str = "float32", **overrides: Any) -> Path:
        key = f"{arch}-{dtype}-{sorted(overrides.items())}"
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{arch}-{dtype}")
            cache[key] = make_tiny_checkpoint(directory, arch, dtype=dtype, **overrides)
        return cache[key]

    return get
