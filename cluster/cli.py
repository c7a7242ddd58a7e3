"""The `moeray` command line: `moeray generate`, `moeray demo`, and the commands of sibling modules.

Every module `moeray.cluster.cli_<name>` that defines `register(subparsers)` adds its own
subcommands (e.g. cli_serve.py: serve, chat, route); each subcommand sets `func(args) -> int`.
Bad flags or values print one line naming the flag and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_DEMO_DIR = Path(".demo")
DEMO_PROMPTS = [
    "What is a mixture of experts?",
    "Write a short poem about the sea.",
    "Question: what is the capital of France?",
]


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs; auto = cuda when torch sees a GPU",
    )
    p.add_argument(
        "--no-cpu-tuning",
        dest="cpu_tuning",
        action="store_false",
        help="plain torch layers on CPU (no workers/cpu_tuning.py transform)",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="turn the engine's automatic prefix caching off",
    )
    p.add_argument(
        "--expert-shards", type=int, default=0, help="expert-shard Ray actors; 0 = in-process"
    )
    p.add_argument("--expert-replicas", type=int, default=1, help="replicas of every expert")
    p.add_argument("--redis-url", default=None, help="Redis URL; none = a private redis-server")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_model_len", "num_kv_blocks", "block_size", "max_num_seqs")
    options: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    options["enable_prefix_caching"] = args.enable_prefix_caching
    options.update(device=args.device, cpu_tuning=args.cpu_tuning)
    if args.expert_shards:  # LLM arguments, not EngineConfig fields
        options.update(
            expert_shards=args.expert_shards,
            expert_replicas=args.expert_replicas,
            redis_url=args.redis_url,
        )
    return options


def _register_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate from one prompt with a local checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-token-ids", type=_token_ids, help="comma-separated token ids")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stop-token-ids", type=_token_ids, default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--output", choices=["text", "json"], default="text")
    _add_engine_flags(p)
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace) -> int:
    from moeray.workers.io_struct import InvalidRequest, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_ids,
        ignore_eos=args.ignore_eos,
    )
    try:
        params.validate()
    except InvalidRequest as e:  # shown as the flag that set the field
        raise ValueError(f"argument --{e.field.replace('_', '-')}: {e}") from None
    if not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model} is not a checkpoint directory")
    from moeray.workers.llm import LLM  # torch and the model: only once the flags are valid

    llm = LLM(model=args.model, dtype=args.dtype, **_engine_options(args))
    prompt = args.prompt if args.prompt is not None else args.prompt_token_ids
    out = llm.generate(prompt, params)[0]
    if args.output == "json":
        print(
            json.dumps(
                {
                    "prompt_token_ids": out.prompt_token_ids,
                    "token_ids": out.token_ids,
                    "text": out.text,
                    "finish_reason": out.finish_reason.value if out.finish_reason else None,
                    "usage": {
                        "prompt_tokens": out.usage.prompt_tokens,
                        "completion_tokens": out.usage.completion_tokens,
                        "total_tokens": out.usage.total_tokens,
                    },
                },
                ensure_ascii=False,
            )
        )
    else:
        print(out.text)
    return 0


def _register_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="build the demo MoE checkpoint (once) and generate from it")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_DEMO_DIR)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    _add_engine_flags(p)
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from moeray.cluster.demo_model import build_demo_checkpoint
    from moeray.workers import LLM, SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    path = args.cache_dir / "demo"
    if not (path / "config.json").is_file():
        print(f"building the demo checkpoint in {path} ...", flush=True)
        build_demo_checkpoint(path)
    llm = LLM(model=str(path), dtype=args.dtype, **_engine_options(args))
    tok = llm.tokenizer
    prompts = [
        tok.encode(
            tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False
        )
        if tok.chat_template
        else p
        for p in DEMO_PROMPTS
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(DEMO_PROMPTS, outs):
        reason = out.finish_reason.value if out.finish_reason else "-"
        print(f"> {prompt}\n{out.text!r}  [{out.usage.completion_tokens} tokens, {reason}]\n")
    generated = sum(o.usage.completion_tokens for o in outs)
    print(f"{generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tok/s")
    return 0


def _register_plugins(sub: Any) -> None:
    """Calls register(subparsers) of every moeray.cluster.cli_* module."""
    import moeray.cluster as cluster

    for info in sorted(pkgutil.iter_modules(cluster.__path__), key=lambda m: m.name):
        if not info.name.startswith("cli_"):
            continue
        try:
            module = importlib.import_module(f"moeray.cluster.{info.name}")
        except Exception as e:  # a broken sibling must not take `generate` down with it
            print(f"moeray: warning: commands of {info.name} unavailable: {e}", file=sys.stderr)
            continue
        register = getattr(module, "register", None)
        if callable(register):
            register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeray", description="Serve Mixture-of-Experts LLMs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_generate(sub)
    _register_demo(sub)
    _register_plugins(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad values: the message names the field / flag
        print(f"moeray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
