"""moeray.workers: the model, the inference engine and the expert-shard actors.

`from moeray.workers import LLM, SamplingParams` is the offline entry point. The heavier names are
imported lazily (PEP 562) so that importing any submodule stays cheap and free of import cycles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeray.workers.io_struct import FinishReason, RequestOutput, SamplingParams, Usage

if TYPE_CHECKING:
    from moeray.workers.async_engine import AsyncLLMEngine, EngineOverloaded
    from moeray.workers.engine import LLMEngine
    from moeray.workers.llm import LLM
    from moeray.workers.tokenizer import Tokenizer

_LAZY = {
    "LLM": "moeray.workers.llm",
    "LLMEngine": "moeray.workers.engine",
    "AsyncLLMEngine": "moeray.workers.async_engine",
    "EngineOverloaded": "moeray.workers.async_engine",
    "Tokenizer": "moeray.workers.tokenizer",
}

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "EngineOverloaded",
    "FinishReason",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "Usage",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeray.workers' has no attribute {name!r}")
