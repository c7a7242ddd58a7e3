"""Regenerates the committed Python code of the gRPC contract.

    python -m moeray.protos.generate            # rewrites protos/moeray/v1/inference_pb2*.py(i)
    python -m moeray.protos.generate --out DIR  # writes into DIR/moeray/v1/ instead (the test does)

Runs grpc_tools.protoc in-process (grpcio-tools, a dev dependency) with the same flags the code
was committed with, so a diff against the committed files means someone edited the .proto
without regenerating (or the other way round).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moeray.protos import PROTO_PATH, PROTO_ROOT

#: The generated files, relative to the output root.
GENERATED = (
    "moeray/v1/inference_pb2.py",
    "moeray/v1/inference_pb2.pyi",
    "moeray/v1/inference_pb2_grpc.py",
)


def generate(out_dir: Path = PROTO_ROOT) -> list[Path]:
    """Runs protoc on PROTO_PATH into out_dir; returns the generated files. Raises RuntimeError."""
    from grpc_tools import protoc  # dev dependency: imported only when regenerating

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "moeray" / "v1").mkdir(parents=True, exist_ok=True)
    rel = PROTO_PATH.relative_to(PROTO_ROOT).as_posix()
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--pyi_out={out_dir}",
        rel,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit status {rc} on {PROTO_PATH}")
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root directory")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
