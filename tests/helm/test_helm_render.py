"""The chart rendered over a matrix of values, and every object it renders checked.

For each entry of `chart.MATRIX` (CPU and GPU, one and two tiers, sharded and not, autoscaling
on, in-chart and external Redis, auth on and off, GCS fault tolerance, router on the head):
`helm lint --strict` passes; the RayService validates against KubeRay's CRD schema (strict: no
unknown field); each group's pod template and every core object validate against Kubernetes'
published schemas; serveConfigV2 parses with Ray's own ServeDeploySchema; the moeray config in
it validates with MoerayConfig and equals the values' `moeray` key exactly. Then the properties
the issue asks of the objects: groups, resources, probes, Secrets, Services, PDBs, policies.
Relations JSON Schema cannot express are refused by the chart with a message naming the key.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from moeray.cluster.config import MoerayConfig
from ray.serve.schema import ServeDeploySchema

from tests.helm import chart
from tests.helm.chart import CHART, MATRIX, RenderError, helm, matrix_values, one, render

RAY_KINDS = ("head", "router", "engine", "experts")


def _groups(rs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    rc = rs["spec"]["rayClusterConfig"]
    groups = {"head": rc["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in rc.get("workerGroupSpecs", [])})
    return groups


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", list(MATRIX))
def test_lint_strict(name: str, tmp_path: Path) -> None:
    out = helm("lint", "--strict", str(CHART), values=matrix_values(name), tmp=tmp_path)
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("name", list(MATRIX))
def test_rendered_objects_validate(name: str, tmp_path: Path) -> None:
    values = matrix_values(name)
    objects = render(values, tmp_path)
    rs = one(objects, "RayService")
    assert chart.kuberay_errors(rs) == []
    for group_name, group in _groups(rs).items():
        assert chart.pod_template_errors(group["template"]) == [], group_name
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: checked below
            continue
        if obj["kind"] != "RayService":
            assert chart.kubernetes_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"

    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # raises on anything Ray would refuse
    (app,) = serve["applications"]
    assert app["import_path"] == "moeray.cluster.app:app_builder"
    MoerayConfig.model_validate(app["args"]["config"])
    assert app["args"]["config"] == values["moeray"]  # handed over unchanged


def test_validators_catch_a_misspelt_field(tmp_path: Path) -> None:
    """The checks above can fail: an unknown field anywhere is an error, not pruned silently."""
    rs = one(render({}, tmp_path), "RayService")
    bad = copy.deepcopy(rs)
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    assert any("rayStartParam" in e for e in chart.kuberay_errors(bad))
    template = copy.deepcopy(_groups(rs)["head"]["template"])
    template["spec"]["containers"][0]["livenesProbe"] = {}
    assert any("livenesProbe" in e for e in chart.pod_template_errors(template))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    extra = {
        "serviceMonitor": {"enabled": True},
        "rayAuth": {"existingSecret": "ray-token"},
        "models": {"source": "hostPath"},
    }
    values = chart.merged(MATRIX["sharded-gpu-experts"], extra)
    return render(values, tmp_path_factory.mktemp("sharded"))


def test_groups_follow_the_tiers(sharded: list[dict[str, Any]]) -> None:
    groups = _groups(one(sharded, "RayService"))
    assert set(groups) == {"head", "router", "engine-fast", "engine-reasoning", "experts"}
    rc = one(sharded, "RayService")["spec"]["rayClusterConfig"]
    assert rc["enableInTreeAutoscaling"] is True
    experts = groups["experts"]
    assert experts["resources"] == {"moeray_expert_slot": "2"}
    assert (experts["minReplicas"], experts["maxReplicas"]) == (1, 8)
    assert groups["router"]["resources"] == {"moeray_router": "1"}
    assert groups["router"]["replicas"] == 2
    gpu = _container(groups["engine-reasoning"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert gpu["image"] == "moeray-cuda:0.1.0"  # the CUDA image, tagged with appVersion
    assert (
        groups["engine-reasoning"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    )
    assert _container(groups["engine-fast"])["image"] == "moeray:0.1.0"
    assert "nvidia.com/gpu" not in _container(groups["engine-fast"])["resources"]["limits"]
    assert _container(groups["experts"])["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"


def test_every_container_is_bounded_and_non_root(sharded: list[dict[str, Any]]) -> None:
    rs = one(sharded, "RayService")
    pod_specs = [g["template"]["spec"] for g in _groups(rs).values()]
    pod_specs.append(one(sharded, "StatefulSet")["spec"]["template"]["spec"])
    for spec in pod_specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), c["name"]
    autoscaler = rs["spec"]["rayClusterConfig"]["autoscalerOptions"]
    assert {"cpu", "memory"} <= set(autoscaler["resources"]["limits"])


def test_probes(sharded: list[dict[str, Any]]) -> None:
    """Liveness asks only the pod's own raylet (never Redis, never another pod); every Ray
    container sets its readiness, so KubeRay adds no Serve-proxy check to worker pods (expert
    pods hold no Serve replica); router pods are ready when their router answers gRPC health."""
    values = matrix_values("sharded-gpu-experts")
    for name, group in _groups(one(sharded, "RayService")).items():
        c = _container(group)
        assert c["livenessProbe"]["httpGet"] == {"path": "/api/local_raylet_healthz", "port": 52365}
        assert "host" not in c["livenessProbe"]["httpGet"]
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800  # weight loading
        ready = c["readinessProbe"]
        if name == "router":
            assert ready["grpc"] == {"port": values["moeray"]["serve"]["grpc_port"]}
        elif name == "head":
            assert ready["httpGet"]["path"] == "/api/healthz"
        else:
            assert ready["httpGet"] == {"path": "/api/local_raylet_healthz", "port": 52365}


def test_front_door_service_selects_the_router_pods(sharded: list[dict[str, Any]]) -> None:
    rs = one(sharded, "RayService")
    svc = one(sharded, "Service", f"{chart.RELEASE}-moeray")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert set(ports) == {"grpc", "http"}
    for name, group in _groups(rs).items():
        labels = group["template"]["metadata"]["labels"]
        selected = all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert selected == (name == "router"), name
        if selected:
            named = {p["name"]: p["containerPort"] for p in _container(group)["ports"]}
            assert named["grpc"] == ports["grpc"]["port"] == 50051
            assert named["http"] == ports["http"]["port"] == 8001


def test_router_on_the_head(tmp_path: Path) -> None:
    objects = render(MATRIX["router-on-head"], tmp_path)
    groups = _groups(one(objects, "RayService"))
    assert "router" not in groups
    head = groups["head"]
    assert head["resources"] == {"moeray_router": "1"}
    assert head["template"]["metadata"]["labels"]["moeray.io/front-door"] == "true"
    # The head's readiness cannot wait for the router: KubeRay deploys the app once it is ready.
    assert _container(head)["readinessProbe"]["httpGet"]["path"] == "/api/healthz"
    pdb = one(objects, "PodDisruptionBudget", f"{chart.RELEASE}-moeray-head")
    assert pdb["spec"]["minAvailable"] == 1


def test_redis_url_reaches_every_ray_pod_from_a_secret(sharded: list[dict[str, Any]]) -> None:
    rs = one(sharded, "RayService")
    assert "password" not in rs["spec"]["serveConfigV2"].lower()
    secret = one(sharded, "Secret", f"{chart.RELEASE}-moeray-redis")
    for group in _groups(rs).values():
        env = {e["name"]: e for e in _container(group)["env"]}
        ref = env["MOERAY_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (secret["metadata"]["name"], "password")
        url = env["MOERAY_REDIS_URL"]["value"]
        assert url == f"redis://:$(MOERAY_REDIS_PASSWORD)@{chart.RELEASE}-moeray-redis:6379/0"
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
    sts = one(sharded, "StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]


def test_external_redis_and_gcs_fault_tolerance(tmp_path: Path) -> None:
    objects = render(MATRIX["external-redis-gcs-ft"], tmp_path)
    assert not [o for o in objects if o["kind"] == "StatefulSet"]
    rs = one(objects, "RayService")
    for group in _groups(rs).values():
        env = {e["name"]: e for e in _container(group)["env"]}
        ref = env["MOERAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("moeray-redis-url", "url")
    ft = rs["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis.example.svc:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"]["name"] == "redis-password"


def test_ray_token_auth(tmp_path: Path, sharded: list[dict[str, Any]]) -> None:
    rc = one(sharded, "RayService")["spec"]["rayClusterConfig"]
    assert rc["authOptions"] == {"mode": "token", "secretName": "ray-token"}  # existingSecret
    objects = render({}, tmp_path)
    rc = one(objects, "RayService")["spec"]["rayClusterConfig"]
    secret = one(objects, "Secret", rc["authOptions"]["secretName"])
    assert set(secret["data"]) == {"auth_token"}  # the key KubeRay reads
    off = render(MATRIX["external-redis-auth-off"], tmp_path)
    assert "authOptions" not in one(off, "RayService")["spec"]["rayClusterConfig"]


def test_models_mount_read_only(sharded: list[dict[str, Any]], tmp_path: Path) -> None:
    for group in _groups(one(sharded, "RayService")).values():
        mounts = {m["name"]: m for m in _container(group)["volumeMounts"]}
        assert mounts["models"]["readOnly"] is True and mounts["models"]["mountPath"] == "/models"
        assert mounts["shared-mem"]["mountPath"] == "/dev/shm"
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["models"]["hostPath"]["path"] == "/var/lib/moeray/models"
        assert volumes["shared-mem"]["emptyDir"]["medium"] == "Memory"
    baked = _groups(one(render(MATRIX["baked-in-models"], tmp_path), "RayService"))
    assert all("models" not in str(g["template"]["spec"]["volumes"]) for g in baked.values())


def test_disruption_budgets_and_policies(sharded: list[dict[str, Any]]) -> None:
    rs = one(sharded, "RayService")
    groups = _groups(rs)
    budgets = {o["metadata"]["name"]: o for o in sharded if o["kind"] == "PodDisruptionBudget"}
    # Groups of two or more pods get one (router: 2 pods); the others would block every drain.
    assert set(budgets) == {f"{chart.RELEASE}-moeray-router"}
    pdb = budgets[f"{chart.RELEASE}-moeray-router"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    labels = groups["router"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())

    policy = one(sharded, "NetworkPolicy", f"{chart.RELEASE}-moeray-ray")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for group in groups.values():
        labels = group["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector.items())
    front = [
        r
        for r in policy["spec"]["ingress"]
        if {p["port"] for p in r.get("ports", [])} == {50051, 8001}
    ]
    assert front and "from" not in front[0]  # frontDoorFrom [] = anyone

    monitor = one(sharded, "ServiceMonitor")
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {"http", "metrics"}
    services = [o for o in sharded if o["kind"] == "Service"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert any(endpoint["port"] in {p["name"] for p in s["spec"]["ports"]} for s in services)


def test_grafana_dashboard_configmap(sharded: list[dict[str, Any]]) -> None:
    cm = one(sharded, "ConfigMap", f"{chart.RELEASE}-moeray-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["data"]["moeray.json"] == (CHART / "dashboards" / "moeray.json").read_text().rstrip(
        "\n"
    )


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (
            {"moeray": {"state": {"redis_url": "redis://:secret@redis:6379/0"}}},
            "moeray.state.redis_url",
        ),
        ({"moeray": {"serve": {"http_port": 8080}}}, "moeray.serve.http_port"),
        ({"moeray": {"serve": {"grpc_port": 0}}}, "moeray.serve.grpc_port"),
        ({"moeray": {"serve": {"host": "127.0.0.1"}}}, "moeray.serve.host"),
        ({"moeray": {"serve": {"router_resource": None}}}, "moeray.serve.router_resource"),
        ({"routerGroup": {"enabled": False}}, "moeray.serve.router_replicas"),
        ({"engines": {"slow": {"gpus": 1}}}, "engines.slow"),
        ({"moeray": {"tiers": [chart.tier("fast", model="/data/fast")]}}, "moeray.tiers[0].model"),
        (
            {"moeray": {"tiers": [chart.tier("a_b"), chart.tier("a-b")]}},
            "moeray.tiers[1].name",
        ),
        ({"redis": {"mode": "external"}}, "redis.external.existingSecret"),
        (
            chart.merged(chart.EXTERNAL_REDIS, {"gcsFaultTolerance": {"enabled": True}}),
            "gcsFaultTolerance.redisAddress",
        ),
    ],
)
def test_chart_refuses_inconsistent_values(
    override: dict[str, Any], named: str, tmp_path: Path
) -> None:
    with pytest.raises(RenderError) as err:
        render(override, tmp_path)
    assert named in str(err.value)
