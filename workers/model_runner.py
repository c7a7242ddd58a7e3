"""Runs one scheduled step through the model: flattens the batch, builds the ForwardContext.

Owns the paged KV cache (allocated once with `model.make_kv_cache(N, S)`, on the model's
device). Per step it builds one tensor per field (ids, positions, slot mapping, block tables)
from Python lists, moves them to the model's device, runs the model on the T new tokens, and
computes logits only for the last token of the sequences that sample this step (a chunk in the
middle of a prompt needs none). `resolve_device` turns a configured device into a torch one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from moeray.workers.forward_context import ForwardContext
from moeray.workers.sequence import Sequence


def resolve_device(device: str, field: str = "device") -> torch.device:
    """A configured device (auto | cpu | cuda | cuda:N) -> torch.device; auto = cuda when torch
    sees a GPU. ValueError naming `field` for anything else, or for cuda without a GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"{field} is {device!r} but torch sees no CUDA device on this machine "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use cpu or auto"
            )
        dev = torch.device(device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{field} is {device!r} but this machine has {torch.cuda.device_count()} GPU(s)"
            )
        return dev
    raise ValueError(f"{field} must be auto, cpu, cuda or cuda:N, got {device!r}")


class PromptRows(NamedTuple):
    """Hidden states of a sequence's prompt positions first..first+n-1 (for prompt_logprobs:
    row j predicts prompt token first + j + 1)."""

    seq: int  # index in the step's sequences
    first: int
    hidden: torch.Tensor  # [n, D]


class StepResult(NamedTuple):
    logits: torch.Tensor | None  # [B', V] f32 of the sequences that sample, or None
    prompt_rows: list[PromptRows]  # only for sequences that asked for prompt_logprobs


class ModelRunner:
    def __init__(self, model: Any, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.kv_caches = model.make_kv_cache(num_blocks, block_size)
        self.device: torch.device = model.embed_tokens.weight.device

    def prepare(
        self, seqs: list[Sequence], num_new_tokens: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, ForwardContext, list[int]]:
        """-> input_ids [T], positions [T], ctx, and the token rows whose logits are sampled."""
        size = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        context_lens: list[int] = []
        sample_rows: list[int] = []
        for seq, n in zip(seqs, num_new_tokens):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if n == 1:  # decode: skip the range machinery
                ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // size] * size + start % size)
            else:
                ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend(table[p // size] * size + p % size for p in range(start, end))
            starts.append(starts[-1] + n)
            context_lens.append(end)
            if end == seq.num_tokens:
                sample_rows.append(starts[-1] - 1)
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        dev = self.device
        ctx = ForwardContext(
            kv_caches=self.kv_caches,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int64, device=dev),
            query_start_loc=starts,
            context_lens=context_lens,
            is_decode=starts[-1] == len(seqs),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        return input_ids, torch.tensor(positions, dtype=torch.int64, device=dev), ctx, sample_rows

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], num_new_tokens: list[int]) -> StepResult:
        """One forward step -> logits [B', V] f32 (on the model's device) for the B' sequences
        that sample (None if none does), and the hidden states of the prompt positions whose
        log-probabilities a sequence asked for and does not have yet."""
        input_ids, positions, ctx, sample_rows = self.prepare(seqs, num_new_tokens)
        hidden = self.model(input_ids, positions, ctx)  # [T, D]
        prompt_rows = _prompt_rows(seqs, num_new_tokens, ctx.query_start_loc, hidden)
        if not sample_rows:
            return StepResult(None, prompt_rows)
        if len(sample_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(sample_rows, dtype=torch.int64, device=self.device)]
        return StepResult(self.model.compute_logits(hidden), prompt_rows)


def _prompt_rows(
    seqs: list[Sequence], num_new_tokens: list[int], starts: list[int], hidden: torch.Tensor
) -> list[PromptRows]:
    """The step's rows at prompt positions p (p + 1 still a prompt token) of sequences that
    asked for prompt_logprobs, from the first position without one (a recomputed prompt after
    preemption is not recorded twice)."""
    out = []
    for b, (seq, n) in enumerate(zip(seqs, num_new_tokens)):
        if seq.prompt_logprobs is None:
            continue
        start = seq.num_computed_tokens  # this step computes positions start..start+n-1
        first = max(start, len(seq.prompt_logprobs) - 1)
        end = min(start + n, seq.num_prompt_tokens - 1)
        if first < end:
            row = starts[b] + first - start
            out.append(PromptRows(b, first, hidden[row : row + end - first]))
    return out
