"""Helpers of the chart tests: run the real `helm` binary, render the chart with given values,
find the rendered objects, validate them against KubeRay's CRD schema and Kubernetes' schemas.

- `helm_binary()`: .tools/bin/helm (unpacked by `.ci/setup`) or `helm` on PATH; a test FAILS
  without it (CI always has it).
- `kuberay_schema(kind)`: the openAPIV3Schema of the KubeRay CRD in ../shared/schemas/kuberay/
  (beside the clone in CI). Missing folder = failure, not a skip. The schema is made strict
  (`strict_schema`): an API server prunes unknown fields silently, so a misspelt field would be
  lost without a word; here it is an error.
- `render(values)`: `helm template` with a values file; `RenderError` carries helm's message.
- `MATRIX`: the value sets the issue asks for (CPU and GPU, one and two tiers, sharded and not,
  autoscaling on, in-chart and external Redis, auth on and off, GCS fault tolerance).
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moeray"
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
#: The Kubernetes version whose published schemas the core objects are checked against.
KUBE_VERSION = "1.33"
RELEASE = "demo"


class RenderError(RuntimeError):
    """helm refused the values; the message is helm's."""


def helm_binary() -> str:
    local = REPO / ".tools" / "bin" / "helm"
    if local.exists():
        return str(local)
    found = shutil.which("helm")
    if found is None:
        raise AssertionError(
            "no helm binary: run `bash .ci/setup` (it unpacks helm into .tools/bin)"
        )
    return found


def helm(*args: str, values: dict[str, Any] | None = None, tmp: Path | None = None) -> str:
    """Runs helm with `args` (plus `-f values.yaml` when values are given); stdout, or RenderError."""
    cmd = [helm_binary(), *args]
    if values is not None:
        assert tmp is not None, "values need a folder to be written to"
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        cmd += ["-f", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise RenderError((proc.stderr + proc.stdout).strip())
    return proc.stdout


def render(values: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """The objects `helm template` renders with these values (release RELEASE)."""
    out = helm("template", RELEASE, str(CHART), values=values, tmp=tmp)
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def default_values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` merged into a copy of `base` (maps merge, anything else replaces), as helm does."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tier(name: str, shards: int = 0, **extra: Any) -> dict[str, Any]:
    """A tier of the values with every MoerayConfig field at its values.yaml default."""
    base = copy.deepcopy(default_values()["moeray"]["tiers"][0])
    base.update({"name": name, "model": f"/models/{name}", **extra})
    base["experts"]["shards"] = shards
    return base


def two_tiers(shards: int = 0) -> dict[str, Any]:
    return {"moeray": {"tiers": [tier("fast"), tier("reasoning", shards=shards)]}}


GPU = {
    "engines": {
        "reasoning": {
            "gpus": 2,
            "resources": {
                "requests": {"cpu": "8", "memory": "64Gi"},
                "limits": {"cpu": "8", "memory": "64Gi"},
            },
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    }
}
EXTERNAL_REDIS = {"redis": {"mode": "external", "external": {"existingSecret": "moeray-redis-url"}}}

MATRIX: dict[str, dict[str, Any]] = {
    "defaults": {},
    "two-tiers-cpu": two_tiers(),
    "two-tiers-gpu": merged(two_tiers(), GPU),
    "sharded": two_tiers(shards=2),
    "sharded-gpu-experts": merged(
        two_tiers(shards=4), merged(GPU, {"expertGroup": {"gpus": 1, "maxReplicas": 8}})
    ),
    "autoscaler-on-unsharded": {"rayAutoscaler": {"enabled": True}},
    "external-redis-auth-off": merged(EXTERNAL_REDIS, {"rayAuth": {"enabled": False}}),
    "internal-redis-gcs-ft": merged(two_tiers(shards=2), {"gcsFaultTolerance": {"enabled": True}}),
    "external-redis-gcs-ft": merged(
        EXTERNAL_REDIS,
        {
            "gcsFaultTolerance": {
                "enabled": True,
                "redisAddress": "redis.example.svc:6379",
                "passwordSecret": {"name": "redis-password", "key": "password"},
            }
        },
    ),
    "router-on-head": {
        "routerGroup": {"enabled": False},
        "moeray": {"serve": {"router_replicas": 1}},
        "head": {"podDisruptionBudget": {"enabled": True}},
    },
    "everything-on": merged(
        two_tiers(shards=2),
        {
            "serviceMonitor": {"enabled": True},
            "rayAuth": {"existingSecret": "ray-token"},
            "frontDoor": {"type": "LoadBalancer"},
            "models": {"source": "hostPath"},
        },
    ),
    "baked-in-models": {"models": {"source": "image"}, "networkPolicy": {"enabled": False}},
}


def matrix_values(name: str) -> dict[str, Any]:
    """The values of one matrix entry, as a complete values file (defaults merged in)."""
    return merged(default_values(), MATRIX[name])


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------


def _int_or_string(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int | str)


def strict_schema(node: Any) -> Any:
    """The CRD schema with `additionalProperties: false` on every object that lists its
    properties and does not keep unknown fields (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def kuberay_schema(kind: str) -> dict[str, Any]:
    """The strict openAPIV3Schema of KubeRay's `kind` (ray.io/v1)."""
    if not SCHEMAS.is_dir():
        raise AssertionError(
            f"KubeRay CRD schemas not found at {SCHEMAS}: CI copies shared/ beside the clone"
        )
    crd = yaml.safe_load((SCHEMAS / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict_schema(version["schema"]["openAPIV3Schema"])


def kuberay_errors(obj: dict[str, Any]) -> list[str]:
    """Every way `obj` breaks its KubeRay CRD schema, as 'path: message' lines."""
    checker = jsonschema.FormatChecker()
    checker.checks("int-or-string")(lambda v: _int_or_string(checker, v))
    validator = jsonschema.Draft7Validator(kuberay_schema(obj["kind"]), format_checker=checker)
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def kubernetes_errors(obj: dict[str, Any]) -> list[str]:
    """Every way `obj` breaks Kubernetes' published (strict) schema for its kind."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path)}: {e.message}"]
    return []


def pod_template_errors(template: dict[str, Any]) -> list[str]:
    """A RayService group's pod template checked as the template of a Kubernetes PodTemplate."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "group"}}
    return kubernetes_errors({**wrapper, "template": template})
