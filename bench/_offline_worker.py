"""One engine of bench/offline.py, loaded once and driven over stdin/stdout.

    python -P bench/_offline_worker.py ENGINE MODEL DTYPE MAX_BATCH

ENGINE is `moeray` (moeray.workers.LLM) or `transformers` (generate() on one static batch), both
run by moeray's venv, or `vllm` (vLLM's offline `LLM`), run by vLLM's venv. The worker loads the
model, prints one JSON line `{"ready": true, "load_s": ..., ...}`, then for every JSON line
`{"prompts": [[token ids], ...], "output_len": N}` on stdin generates N tokens per prompt (greedy,
ignore_eos, all prompts at once) and prints `{"wall_s": ..., "output_tokens": ...}`. It exits at
the end of stdin. Everything else that the engines print goes to stderr: the worker moves its
stdout to a private descriptor first, so the protocol stays clean.

Standard library at the top only: this file runs in both venvs. FOOTGUN: start it with `python -P`
and a working directory outside the checkout (bench/kernels.py and the checkout's kernels/ folder
shadow the `kernels` package that transformers probes for).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

#: One call: (prompts, output_len) -> generated tokens counted from the engine's own outputs.
Generate = Callable[[list[list[int]], int], int]


def load_moeray(model: str, dtype: str, max_batch: int) -> tuple[Generate, dict[str, Any]]:
    import torch
    from moeray.workers.io_struct import SamplingParams
    from moeray.workers.llm import LLM

    llm = LLM(model, dtype=dtype, max_num_seqs=max_batch)

    def generate(prompts: list[list[int]], output_len: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        return sum(len(o.token_ids) for o in llm.generate(prompts, params))

    return generate, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def load_transformers(model: str, dtype: str, max_batch: int) -> tuple[Generate, dict[str, Any]]:
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    hf.eval()

    def generate(prompts: list[list[int]], output_len: int) -> int:
        ids = torch.tensor(prompts)  # equal lengths: one static batch, no padding
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len,
                              do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    about = {"torch": torch.__version__, "transformers": transformers.__version__,
             "threads": torch.get_num_threads()}  # fmt: skip
    return generate, about


def load_vllm(model: str, dtype: str, max_batch: int) -> tuple[Generate, dict[str, Any]]:
    import torch
    import vllm

    llm = vllm.LLM(model=model, dtype=dtype, max_num_seqs=max_batch, seed=0)

    def generate(prompts: list[list[int]], output_len: int) -> int:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
        inputs: Any = [{"prompt_token_ids": p} for p in prompts]
        outs = llm.generate(inputs, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    env = {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}
    return generate, {"vllm": vllm.__version__, "torch": torch.__version__, "env": env}


LOADERS = {"moeray": load_moeray, "transformers": load_transformers, "vllm": load_vllm}


def private_stdout() -> TextIO:
    """The protocol's channel: a copy of fd 1; fd 1 itself then points at stderr, so that what
    the engines (and their child processes) print cannot mix with the protocol."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return channel


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[0] not in LOADERS:
        print(__doc__, file=sys.stderr)
        return 2
    engine, model, dtype, max_batch = argv[0], argv[1], argv[2], int(argv[3])
    out = private_stdout()
    t0 = time.perf_counter()
    generate, about = LOADERS[engine](model, dtype, max_batch)
    print(json.dumps({"ready": True, "load_s": time.perf_counter() - t0, **about}), file=out)
    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        tokens = generate(cmd["prompts"], int(cmd["output_len"]))
        print(json.dumps({"wall_s": time.perf_counter() - t0, "output_tokens": tokens}), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
