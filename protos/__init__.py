"""moeray.protos: the gRPC contract of moeray and its generated Python code.

The .proto lives in `protos/moeray/v1/inference.proto`; the generated modules are committed beside
it and import as `moeray.v1.inference_pb2` / `moeray.v1.inference_pb2_grpc` (pyproject maps the
`moeray.v1` package to that folder, so the generated `from moeray.v1 import ...` lines work).
Regenerate with `python -m moeray.protos.generate`; tests/router/test_protos.py fails when the
committed code differs from what the installed grpcio-tools produces.
"""

from __future__ import annotations

from pathlib import Path

from moeray.v1 import inference_pb2, inference_pb2_grpc

#: Root to pass to protoc with -I (the .proto files sit under moeray/v1/ below it).
PROTO_ROOT: Path = Path(__file__).resolve().parent
#: The service definition.
PROTO_PATH: Path = PROTO_ROOT / "moeray" / "v1" / "inference.proto"
#: Fully qualified service name, as gRPC reflection and health checks spell it.
SERVICE_NAME: str = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name

__all__ = ["PROTO_PATH", "PROTO_ROOT", "SERVICE_NAME", "inference_pb2", "inference_pb2_grpc"]
