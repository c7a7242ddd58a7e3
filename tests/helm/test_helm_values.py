"""The chart's values against MoerayConfig, and values.schema.json refusing bad values.

- Every MoerayConfig field (recursively, through tiers[] and the nested configs) has its key
  under `moeray:` in values.yaml and in values.schema.json, and every key there is a field: when
  the config changes, these fail until the chart follows.
- values.schema.json's `moeray` part is MoerayConfig's own schema (tests/helm/values_schema.py);
  the committed file equals the generated one.
- Bad values are refused by `helm template` through the schema, with the key's path in the
  message (Helm prints '/moeray/tiers/0/engine/block_size').
"""

from __future__ import annotations

import copy
import json
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from moeray.cluster.config import MoerayConfig
from pydantic import BaseModel

from tests.helm import chart, values_schema
from tests.helm.chart import CHART, RenderError, render


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (X, list[X], X | None), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (list, typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def config_tree(model: type[BaseModel]) -> dict[str, Any]:
    """{field: subtree or None} of a pydantic model, recursively."""
    tree: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        tree[name] = config_tree(sub) if sub is not None else None
    return tree


def values_tree(node: Any, model_tree: dict[str, Any] | None) -> Any:
    """The same shape read from values.yaml: lists (tiers) contribute each of their items."""
    if isinstance(node, list) and node and isinstance(node[0], dict):
        trees = [values_tree(item, model_tree) for item in node]
        assert all(t == trees[0] for t in trees), "every tier in values.yaml lists the same keys"
        return trees[0]
    if isinstance(node, dict) and model_tree is not None:
        return {k: values_tree(v, model_tree.get(k)) for k, v in node.items()}
    return None


def schema_tree(node: dict[str, Any], defs: dict[str, Any]) -> Any:
    """The same shape read from values.schema.json (following $ref, anyOf, items)."""
    if "$ref" in node:
        return schema_tree(defs[node["$ref"].split("/")[-1]], defs)
    if node.get("type") == "array":
        return schema_tree(node["items"], defs)
    for option in node.get("anyOf", []):
        if "$ref" in option or option.get("type") in ("object", "array"):
            return schema_tree(option, defs)
    if "properties" in node:
        return {k: schema_tree(v, defs) for k, v in node["properties"].items()}
    return None


def _diff(a: Any, b: Any, path: str = "moeray") -> list[str]:
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if (a is None) == (b is None) else [f"{path}: nested in one, not the other"]
    out = [f"{path}.{k}: missing" for k in sorted(set(a) - set(b))]
    out += [f"{path}.{k}: not a config field" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        out += _diff(a[k], b[k], f"{path}.{k}")
    return out


def test_every_config_field_has_its_values_key_and_back() -> None:
    config = config_tree(MoerayConfig)
    values = values_tree(chart.default_values()["moeray"], config)
    assert _diff(config, values) == [], "values.yaml `moeray:` differs from MoerayConfig"
    schema = json.loads((CHART / "values.schema.json").read_text())
    from_schema = schema_tree(schema["properties"]["moeray"], schema["$defs"])
    assert _diff(config, from_schema) == [], "values.schema.json differs from MoerayConfig"


def test_the_mapping_check_can_fail() -> None:
    config = config_tree(MoerayConfig)
    values = copy.deepcopy(config)
    del values["tiers"]["engine"]["block_size"]
    values["serve"]["port"] = None
    assert _diff(config, values) == [
        "moeray.serve.port: not a config field",
        "moeray.tiers.engine.block_size: missing",
    ]


def test_default_moeray_values_are_a_valid_config() -> None:
    MoerayConfig.model_validate(chart.default_values()["moeray"])


def test_committed_schema_is_generated_from_the_config() -> None:
    committed = json.loads(values_schema.SCHEMA_PATH.read_text())
    assert committed == values_schema.with_moeray_schema(committed), (
        "values.schema.json is stale: run `.venv/bin/python -m tests.helm.values_schema`"
    )


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ({"moeray": {"tiers": []}}, "/moeray/tiers"),
        ({"moeray": {"tiers": [{"name": "Fast", "model": "/models/f"}]}}, "/moeray/tiers/0/name"),
        ({"moeray": {"tiers": [chart.tier("fast", dtype="int3")]}}, "/moeray/tiers/0/dtype"),
        (
            {"moeray": {"tiers": [chart.tier("fast", engine={"block_size": 0})]}},
            "/moeray/tiers/0/engine",
        ),
        ({"moeray": {"router": {"threshold": 1.5}}}, "/moeray/router/threshold"),
        ({"moeray": {"serve": {"grpc_port": 70000}}}, "/moeray/serve/grpc_port"),
        ({"moeray": {"serve": {"grpcport": 1}}}, "/moeray/serve"),
        ({"moeray": {"state": {"cluster": "a b"}}}, "/moeray/state/cluster"),
        ({"redis": {"mode": "sentinel"}}, "/redis/mode"),
        ({"models": {"source": "s3"}}, "/models/source"),
        ({"engineDefaults": {"gpus": -1}}, "/engineDefaults/gpus"),
        ({"engines": {"fast": {"gpu": 1}}}, "/engines/fast"),
        ({"expertGroup": {"resourceName": "expert slot"}}, "/expertGroup/resourceName"),
        ({"head": {"resources": {"limits": {"cpu": "one"}}}}, "/head/resources/limits/cpu"),
        (
            {"pods": {"podSecurityContext": {"runAsNonRoot": False}}},
            "/pods/podSecurityContext/runAsNonRoot",
        ),
        ({"rayService": {"upgradeStrategy": "InPlace"}}, "/rayService/upgradeStrategy"),
        ({"frontDoor": {"type": "Ingress"}}, "/frontDoor/type"),
        ({"replicas": 3}, "replicas"),
    ],
)
def test_schema_refuses_bad_values_naming_the_key(
    override: dict[str, Any], path: str, tmp_path: Path
) -> None:
    with pytest.raises(RenderError) as err:
        render(override, tmp_path)
    message = str(err.value)
    assert "schema" in message, message
    assert path in message, message
