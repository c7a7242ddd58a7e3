"""The `moeray` part of helm/moeray/values.schema.json, generated from MoerayConfig.

The chart's values hold the moeray config under one key, field for field, so its JSON Schema is
MoerayConfig's own (pydantic's `model_json_schema`), trimmed of what Helm does not need (titles,
defaults: values.yaml carries those). The rest of values.schema.json (the Kubernetes keys) is
written by hand. `tests/helm/test_values.py` fails when the committed schema differs from the
generated one; after a config change, regenerate it:

    .venv/bin/python -m tests.helm.values_schema
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeray.cluster.config import MoerayConfig

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "helm" / "moeray" / "values.schema.json"
_DROP = {"title", "default"}


def _trim(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _trim(v) for k, v in node.items() if k not in _DROP}
    if isinstance(node, list):
        return [_trim(v) for v in node]
    return node


def moeray_schema() -> tuple[dict[str, Any], dict[str, Any]]:
    """(the schema of values.moeray, the $defs it refers to) from MoerayConfig."""
    schema = _trim(MoerayConfig.model_json_schema())
    defs = schema.pop("$defs", {})
    return schema, defs


def with_moeray_schema(chart_schema: dict[str, Any]) -> dict[str, Any]:
    """The chart's schema with properties.moeray and $defs replaced by the generated ones."""
    moeray, defs = moeray_schema()
    out = dict(chart_schema)
    out["properties"] = {**chart_schema["properties"], "moeray": moeray}
    out["$defs"] = defs
    return out


def main() -> None:
    current = json.loads(SCHEMA_PATH.read_text())
    SCHEMA_PATH.write_text(json.dumps(with_moeray_schema(current), indent=2) + "\n")
    print(f"wrote {SCHEMA_PATH}")


if __name__ == "__main__":
    main()
