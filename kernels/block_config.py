"""Block sizes for the Triton launchers, read from JSON data in kernels/configs/.

Each kernel has one file, `configs/<kernel>.json`:

    {"fallback": {"cuda": {"<T>": {...}}, "interpreter": {"<T>": {...}}},
     "tuned": {"<device name>|<shape key>|<dtype>": {"<T>": {...}}}}

A launcher asks for (kernel, shape key, dtype, T, device). A tuned entry for the exact device and
shape wins; otherwise the fallback of the device class ("cuda" or "interpreter") is used. Inside an
entry the bucket whose token count is nearest to T (in log scale) is chosen, as vLLM does.
bench/kernels.py --tune writes the tuned entries. Values are plain ints (BLOCK_*, num_warps,
num_stages), passed to the kernel as constexprs or launch options.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


@functools.cache
def _load(kernel: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{kernel}.json"
    if not path.exists():
        raise ValueError(f"kernel {kernel!r} has no block-size config file {path}")
    return json.loads(path.read_text())


def device_name(device: torch.device) -> str:
    """The name tuned entries are stored under: the CUDA device name, or 'interpreter' on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter"


def tuned_key(device: str, shape_key: str, dtype: torch.dtype) -> str:
    """The key of a tuned entry: 'NVIDIA H100 80GB HBM3|E=8,F=14336,D=4096|bfloat16'."""
    return f"{device}|{shape_key}|{str(dtype).removeprefix('torch.')}"


def _nearest_bucket(buckets: dict[str, dict[str, int]], num_tokens: int) -> dict[str, int]:
    def distance(bucket: str) -> float:
        return abs(math.log2(int(bucket)) - math.log2(max(num_tokens, 1)))

    return buckets[min(buckets, key=distance)]


def lookup(
    kernel: str, shape_key: str, dtype: torch.dtype, num_tokens: int, device: torch.device
) -> dict[str, int]:
    """The block sizes for one launch (a fresh dict: callers may pop launch options from it)."""
    data = _load(kernel)
    name = device_name(device)
    buckets = data.get("tuned", {}).get(tuned_key(name, shape_key, dtype))
    if buckets is None:
        device_class = "cuda" if device.type == "cuda" else "interpreter"
        buckets = data["fallback"][device_class]
    return dict(_nearest_bucket(buckets, num_tokens))


def write_tuned(kernel: str, key: str, buckets: dict[str, dict[str, int]]) -> Path:
    """Stores tuned buckets for one (device, shape, dtype) key, keeping every other entry."""
    path = CONFIG_DIR / f"{kernel}.json"
    data = json.loads(path.read_text())
    data.setdefault("tuned", {})[key] = {
        str(t): cfg for t, cfg in sorted(buckets.items(), key=lambda kv: int(kv[0]))
    }
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    _load.cache_clear()
    return path
