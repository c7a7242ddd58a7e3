"""The Grafana dashboard the chart ships, and the container images' Dockerfiles.

Dashboard: valid JSON with the panels the issue asks for (per-tier TTFT, TPOT, throughput, queue,
KV use; the per-(layer, expert) load heat map; replicas and balancedness over time), and every
metric a query reads exists: moeray_* families in the front door's registry
(router/metrics.py), except the expert families that the served expert-parallelism and
autoscaler issues add (EXPERT_FAMILIES); ray_* families in Ray's own source.

Images (no Docker here; the KubeRay emulation test runs the commands they must support): both
run as uid 1000 (the chart's runAsNonRoot), install moeray and the Ray version the chart
declares (rayVersion), and use the same Python, since Ray refuses nodes whose versions differ.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ray
from moeray.router.metrics import FrontDoorMetrics

from tests.helm.chart import CHART, REPO, default_values

DASHBOARD = CHART / "dashboards" / "moeray.json"
IMAGES = REPO / "helm" / "images"
#: Families that issues 11 and 12 add (served expert parallelism, the expert autoscaler).
EXPERT_FAMILIES = {
    "moeray_expert_tokens_total",
    "moeray_expert_balancedness",
    "moeray_expert_placement_epoch",
    "moeray_expert_replicas",
}


def _queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dash["panels"]
        for target in panel.get("targets", [])
    ]


def _exported_names() -> set[str]:
    """Every sample name the front door's registry exposes (…_total, _bucket, _sum, _count)."""
    names = set()
    for family in FrontDoorMetrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{s}" for s in ("bucket", "sum", "count"))
    return names


def test_dashboard_has_the_panels_the_issue_asks_for() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "moeray"
    titles = " | ".join(t for t, _ in _queries()).lower()
    for wanted in ("first token", "per output token", "tokens/s", "queue", "kv cache",
                   "heat map", "balancedness", "replicas"):  # fmt: skip
        assert wanted in titles, wanted
    heatmaps = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert any("by (layer, expert)" in t["expr"] for p in heatmaps for t in p["targets"])
    tier = [v for v in dash["templating"]["list"] if v["name"] == "tier"]
    assert tier and tier[0]["includeAll"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_reads_only_metrics_that_exist() -> None:
    exported = _exported_names()
    ray_source = "\n".join(
        p.read_text() for p in Path(ray.__file__).parent.joinpath("serve").rglob("*.py")
    )
    for title, expr in _queries():
        for name in set(re.findall(r"\b(moeray_[a-z_]+|ray_[a-z_]+)\b", expr)):
            if name.startswith("ray_"):
                assert f'"{name.removeprefix("ray_")}"' in ray_source, f"{title}: {name}"
            else:
                assert name in exported or name in EXPERT_FAMILIES, f"{title}: {name}"


def _dockerfile(flavor: str) -> str:
    return (IMAGES / f"Dockerfile.{flavor}").read_text()


def test_images_run_as_uid_1000_with_moeray_and_the_charts_ray() -> None:
    values = default_values()
    uid = values["pods"]["podSecurityContext"]["runAsUser"]
    for flavor in ("cpu", "cuda"):
        text = _dockerfile(flavor)
        users = re.findall(r"^USER\s+(\S+)", text, re.M)
        assert users and users[-1].split(":")[0] == str(uid), flavor
        assert f"--uid {uid}" in text, flavor
        assert f"ARG RAY_VERSION={values['rayVersion']}" in text, flavor
        assert '"ray[serve]==${RAY_VERSION}"' in text, flavor
        assert "import moeray.cluster.app" in text, flavor  # the app KubeRay's Serve imports
        assert re.search(r"\bbash\b", text), flavor  # KubeRay runs /bin/bash -lc
        for folder in ("cluster", "kernels", "protos", "router", "workers"):
            assert f"COPY {folder} {folder}" in text, (flavor, folder)
    # the CPU kernels are compiled into the CPU image for every instruction set the build machine
    # runs, where uid 1000 can load them
    assert "cpu_gemm.build(isa) for isa in cpu_gemm.isas()" in _dockerfile("cpu")
    assert "g++" in _dockerfile("cpu")
    assert "chown -R 1000:1000 /opt/moeray" in _dockerfile("cpu")
    cpu = re.search(r"^ARG PYTHON_VERSION=(3\.\d+)$", _dockerfile("cpu"), re.M)
    cuda = re.search(r"\bpython(3\.\d+) -m venv", _dockerfile("cuda"))
    assert cpu and cuda and cpu.group(1) == cuda.group(1)
