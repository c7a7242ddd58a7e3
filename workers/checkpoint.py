"""Reading Hugging Face safetensors checkpoints: one file, several files, or a sharded index.

Tensors are read lazily, one at a time, through `safe_open`, so a process that needs a few experts
(an expert-shard actor) opens only the files and tensors that hold them: `load_expert_weights`.
Expert weights come out fused the way moeray's kernels want them, whatever the checkpoint's
layout: w1 [E, 2F, D] (gate rows then up rows) and w2 [E, D, F]. Both the per-expert layout that
transformers' save_pretrained writes (Mixtral `block_sparse_moe.experts.{e}.w1/w2/w3`, others
`mlp.experts.{e}.gate_proj/up_proj/down_proj`) and the fused layout (`experts.gate_up_proj`,
`experts.down_proj`) are accepted.

Every failure becomes a CheckpointError (a ValueError) whose message names the file, tensor or
field; no exception from inside safetensors reaches the caller.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from moeray.workers.hf_config import CheckpointError, ModelArgs, read_model_args
from safetensors import safe_open

__all__ = ["CheckpointError", "CheckpointReader", "load_expert_weights", "read_experts"]

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Lazy, per-tensor access to the safetensors files of one checkpoint directory.

    With an index, nothing is opened until a tensor is asked for; without one, every
    *.safetensors file's header is read once to learn which tensors it holds.
    """

    def __init__(self, path: str | Path, on_read: Callable[[str], None] | None = None) -> None:
        self.root = Path(path)
        self.on_read = on_read  # called with each tensor name after it is read (progress bars)
        self._handles: dict[Path, Any] = {}
        self._index: Path | None = None
        index = self.root / INDEX_FILE
        self.weight_map = self._read_index(index) if index.exists() else self._scan_files()

    # --- discovery ---------------------------------------------------------------------------
    def _read_index(self, index: Path) -> dict[str, Path]:
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index}: cannot read JSON ({exc})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: field 'weight_map' must be a non-empty object")
        bad = [name for name, file in weight_map.items() if not isinstance(file, str)]
        if bad:
            raise CheckpointError(f"{index}: field 'weight_map.{bad[0]}' must be a file name")
        self._index = index
        # Files are checked when first used, so a shard that needs a few experts does not
        # depend on (or touch) the files holding the rest.
        return {name: self.root / file for name, file in weight_map.items()}

    def _scan_files(self) -> dict[str, Path]:
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.root}: no *.safetensors file and no {INDEX_FILE}")
        out: dict[str, Path] = {}
        for file in files:
            for name in self._open(file).keys():  # noqa: SIM118 (safe_open is no dict)
                out[name] = file
        return out

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            if self._index is not None and not file.is_file():
                raise CheckpointError(
                    f"{self._index}: field 'weight_map' names {file.name!r}, which is not a file "
                    f"in {self.root}"
                )
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own error types and OSError
                raise CheckpointError(f"{file}: unreadable safetensors file ({exc})") from None
            self._handles[file] = handle
        return handle

    # --- access ------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _file_of(self, name: str) -> Path:
        file = self.weight_map.get(name)
        if file is None:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing from the checkpoint")
        return file

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._file_of(name)
        try:
            return tuple(self._open(file).get_slice(name).get_shape())
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({exc})") from None

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The whole tensor `name`, checked against `shape` and cast to `dtype`."""
        return self.get_rows(name, None, shape, dtype)

    def get_rows(
        self,
        name: str,
        rows: tuple[int, int] | None,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (all rows if None), read without loading the rest.
        `shape` is the expected shape of the whole tensor."""
        file = self._file_of(name)
        try:
            sl = self._open(file).get_slice(name)
            full = tuple(sl.get_shape())
            if shape is not None and full != tuple(shape):
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {list(full)}, expected {list(shape)}"
                )
            tensor = sl[:] if rows is None else sl[rows[0] : rows[1]]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({exc})") from None
        if self.on_read is not None:
            self.on_read(name)
        return tensor if dtype is None else tensor.to(dtype)

    def close(self) -> None:
        self._handles.clear()


# --- experts ---------------------------------------------------------------------------------
def moe_prefixes(family: str, layer: int) -> list[str]:
    """Where a layer's MoE block lives: Mixtral checkpoints say block_sparse_moe, transformers 5
    in memory (and everyone else) says mlp."""
    base = f"model.layers.{layer}."
    return [base + "block_sparse_moe", base + "mlp"] if family == "mixtral" else [base + "mlp"]


# per-expert tensor names: (gate [F, D], up [F, D], down [D, F])
_PER_EXPERT_STYLES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _per_expert_names(reader: CheckpointReader, prefix: str, e: int) -> tuple[str, str, str] | None:
    for gate, up, down in _PER_EXPERT_STYLES:
        names = tuple(f"{prefix}.experts.{e}.{n}.weight" for n in (gate, up, down))
        if reader.has(names[0]):
            return names  # type: ignore[return-value]
    return None


def read_experts(
    reader: CheckpointReader, args: ModelArgs, layer: int, experts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused weights of `experts` of MoE layer `layer`: w1 [e, 2F, D], w2 [e, D, F] in args.dtype.

    Reads only those experts' tensors (row slices of a fused tensor)."""
    D, F = args.hidden_size, args.moe_intermediate_size
    w1 = torch.empty(len(experts), 2 * F, D, dtype=args.dtype)
    w2 = torch.empty(len(experts), D, F, dtype=args.dtype)
    for prefix in moe_prefixes(args.family, layer):
        if reader.has(f"{prefix}.experts.gate_up_proj"):
            E = args.num_experts
            for j, e in enumerate(experts):
                rows = (e, e + 1)
                w1[j] = reader.get_rows(f"{prefix}.experts.gate_up_proj", rows, (E, 2 * F, D))[0]
                w2[j] = reader.get_rows(f"{prefix}.experts.down_proj", rows, (E, D, F))[0]
            return w1, w2
        if _per_expert_names(reader, prefix, experts[0] if experts else 0) is not None:
            for j, e in enumerate(experts):
                names = _per_expert_names(reader, prefix, e)
                if names is None:
                    raise CheckpointError(
                        f"{reader.root}: tensor {prefix}.experts.{e}.*.weight (expert {e} of "
                        f"layer {layer}) is missing from the checkpoint"
                    )
                w1[j, :F] = reader.get(names[0], (F, D))
                w1[j, F:] = reader.get(names[1], (F, D))
                w2[j] = reader.get(names[2], (D, F))
            return w1, w2
    raise CheckpointError(
        f"{reader.root}: tensor {moe_prefixes(args.family, layer)[0]}.experts.0.* (the experts of "
        f"layer {layer}) is missing from the checkpoint"
    )


def load_expert_weights(
    path: str | Path, layer: int, experts: list[int], dtype: str | torch.dtype = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """w1 [e, 2F, D], w2 [e, D, F] for just `experts` of MoE layer `layer` of the checkpoint at
    `path`, opening only the files and reading only the tensors that hold them."""
    args = read_model_args(path, dtype)
    if layer not in args.moe_layers:
        raise CheckpointError(
            f"{path}: layer {layer} is not an MoE layer (MoE layers: {args.moe_layers})"
        )
    bad = [e for e in experts if not 0 <= e < args.num_experts]
    if bad:
        raise CheckpointError(f"{path}: experts {bad} out of range [0, {args.num_experts})")
    reader = CheckpointReader(path)
    try:
        return read_experts(reader, args, layer, list(experts))
    finally:
        reader.close()
