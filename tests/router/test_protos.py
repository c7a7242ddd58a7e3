"""The gRPC contract: the committed generated code matches the .proto, and it imports as moeray.v1."""

from __future__ import annotations

from pathlib import Path

import pytest
from moeray.protos import PROTO_PATH, PROTO_ROOT, SERVICE_NAME, inference_pb2, inference_pb2_grpc
from moeray.protos.generate import GENERATED, generate


def test_committed_generated_code_matches_regeneration(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")
    fresh = generate(tmp_path)
    for name, path in zip(GENERATED, fresh):
        committed = (PROTO_ROOT / name).read_text()
        assert path.read_text() == committed, (
            f"{name} differs from what protoc generates from {PROTO_PATH.name}; "
            "run `python -m moeray.protos.generate`"
        )


def test_generated_modules_import_as_moeray_v1() -> None:
    from moeray.v1 import inference_pb2 as direct

    assert direct is inference_pb2
    assert inference_pb2.DESCRIPTOR.package == "moeray.v1"
    assert SERVICE_NAME == "moeray.v1.Inference"
    assert hasattr(inference_pb2_grpc, "InferenceStub")
    assert hasattr(inference_pb2_grpc, "add_InferenceServicer_to_server")


def test_service_methods_and_streaming() -> None:
    service = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Route", "ListTiers", "GetClusterStatus", "Abort"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not any(m.server_streaming for n, m in methods.items() if n != "Generate")


def test_request_input_is_a_oneof_and_optional_sampling_fields_track_presence() -> None:
    req = inference_pb2.GenerateRequest(prompt="hi")
    assert req.WhichOneof("input") == "prompt"
    req.prompt_token_ids.ids.extend([1, 2, 3])
    assert req.WhichOneof("input") == "prompt_token_ids"  # setting one clears the other
    assert req.prompt == ""
    s = inference_pb2.SamplingParams()
    assert not s.HasField("temperature")
    s.temperature = 0.0
    assert s.HasField("temperature")  # explicit 0.0 (greedy) differs from "absent"
    wire = inference_pb2.GenerateRequest.FromString(
        inference_pb2.GenerateRequest(prompt="x", sampling=s).SerializeToString()
    )
    assert wire.sampling.HasField("temperature") and wire.sampling.temperature == 0.0
