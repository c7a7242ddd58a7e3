"""The chart end to end on this machine, with the KubeRay operator and the kubelet emulated.

No Kubernetes here, so this test does what they would do with the rendered objects:
1. renders the chart (one tier on a demo checkpoint, a router group, a sharded tier's expert
   group, the in-chart Redis, Ray token auth);
2. runs the in-chart Redis StatefulSet's container command, with its env from the rendered
   Secret (kubelet: `$(VAR)` expansion, secretKeyRef);
3. starts one pod per Ray group as KubeRay does (common/pod.go): `ray start` built from the
   group's rayStartParams, its `resources`, the container's CPU and memory limits
   (setMissingRayStartParams, updateRayStartParamsResources, generateRayStartCommand), run as
   `ulimit ...; ray start ...` with the container's env plus what KubeRay injects
   (RAY_AUTH_MODE / RAY_AUTH_TOKEN from authOptions); the head first, the workers once the
   head's readiness probe passes;
4. runs the rendered startup, liveness and readiness probes as the kubelet would;
5. submits the rendered serveConfigV2 through Ray's Serve REST API, as KubeRay's dashboard
   client does (PUT /api/serve/applications/, JSON, bearer token), and waits for RUNNING;
6. checks KubeRay's RayService readiness signal (GET /-/healthz on the head's `serve` port);
7. calls Generate over gRPC through the front-door Service (its named grpc port, resolved to
   the router pod) and reads /health and /metrics through its http port.

What stands in for Kubernetes, and only that: every pod shares this machine's network, so each
pod gets its own Ray ports through its group's rayStartParams (values, as an operator could set
them) and its own temp folder for /tmp; Services resolve to 127.0.0.1 (kube-dns + kube-proxy),
the Redis container's port 6379 to a free port and its /data to a folder; the models hostPath
volume is mounted at the same path. Every process started here carries a marker in its
environment and is stopped at the end by pid.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from moeray.cluster.demo_model import build_demo_checkpoint
from moeray.cluster.redis_server import free_port
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc

from tests.helm import chart

MARKER = "MOERAY_KUBERAY_EMULATION"
RUN_ID = uuid.uuid4().hex
ENGINE = {"max_model_len": 64, "max_tokens_limit": 32, "num_kv_blocks": 16, "block_size": 16}
STARTUP_TIMEOUT_S = 90.0
DEPLOY_TIMEOUT_S = 180.0


# --------------------------------------------------------------------------------------------
# What KubeRay does with a group (ray-operator/controllers/ray/common/pod.go)
# --------------------------------------------------------------------------------------------

_SUFFIX = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}  # fmt: skip


def quantity_value(q: str | int | float) -> int:
    """resource.Quantity.Value(): the quantity as an integer, rounded up ("500m" -> 1)."""
    text = str(q)
    if text.endswith("m"):
        return -(-int(text[:-1]) // 1000)
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", text)
    assert m is not None, text
    return int(-(-float(m.group(1)) * _SUFFIX.get(m.group(2), 1) // 1))


def ray_start_params(group: dict[str, Any], head: bool, head_address: str) -> dict[str, str]:
    """The complete rayStartParams KubeRay builds for a pod of `group`."""
    params = {k: str(v) for k, v in (group.get("rayStartParams") or {}).items()}
    custom = {}
    for name, q in (group.get("resources") or {}).items():  # updateRayStartParamsResources
        key = {"cpu": "num-cpus", "memory": "memory"}.get(name.lower())
        if key:
            params[key] = str(quantity_value(q))
        elif name.lower().endswith("gpu"):
            params["num-gpus"] = str(quantity_value(q))
        else:
            custom[name] = float(q)
    if custom:
        params["resources"] = f"'{json.dumps(custom, separators=(',', ':'))}'"
    if head:  # setMissingRayStartParams
        params.setdefault("dashboard-host", "0.0.0.0")
    else:
        params.setdefault("address", head_address)
    params.setdefault("metrics-export-port", "8080")
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", "52365")
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    if "num-cpus" not in params and "cpu" in limits:  # generateRayStartCommand
        params["num-cpus"] = str(quantity_value(limits["cpu"]))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(quantity_value(limits["memory"]))
    return params


def ray_start_command(params: dict[str, str], head: bool) -> str:
    """convertParamMap + the `ulimit; ray start` line KubeRay puts in the container's args."""
    flags = ""
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false"):
            flags += f" --{key} " if value.lower() == "true" else ""
        else:
            flags += f" --{key}={value} "
    start = f"ray start --head {flags}" if head else f"ray start {flags}"
    return f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {start}"


# --------------------------------------------------------------------------------------------
# What the kubelet does: env, probes; what kube-dns + kube-proxy do: Services
# --------------------------------------------------------------------------------------------


def secret_value(objects: list[dict[str, Any]], name: str, key: str) -> str:
    return base64.b64decode(chart.one(objects, "Secret", name)["data"][key]).decode()


def container_env(
    container: dict[str, Any], objects: list[dict[str, Any]], services: dict[str, str]
) -> dict[str, str]:
    """The container's environment: values with $(VAR) expanded from earlier entries,
    secretKeyRef read from the rendered Secrets, Service host:ports resolved."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            value = secret_value(objects, ref["name"], ref["key"])
        else:
            value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                           lambda m: env.get(m.group(1), m.group(0)), item["value"])  # fmt: skip
        for address, local in services.items():
            value = value.replace(address, local)
        env[item["name"]] = value
    return env


def http_get(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def probe_passes(spec: dict[str, Any]) -> bool:
    """One kubelet probe (httpGet or grpc) against this machine."""
    if "httpGet" in spec:
        status, _ = http_get(f"http://127.0.0.1:{spec['httpGet']['port']}{spec['httpGet']['path']}")
        return 200 <= status < 400
    with grpc.insecure_channel(f"127.0.0.1:{spec['grpc']['port']}") as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def wait_for(what: str, check: Any, timeout_s: float, pods: list[EmulatedPod]) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for pod in pods:
            assert pod.proc.poll() is None, f"pod {pod.group} exited:\n{pod.log_tail()}"
        assert time.monotonic() < deadline, f"{what} not within {timeout_s} s"
        time.sleep(0.5)


@dataclass
class EmulatedPod:
    group: str
    container: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log: Path
    params: dict[str, str] = field(default_factory=dict)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def probe(self, kind: str) -> bool:
        return probe_passes(self.container[f"{kind}Probe"])


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **env, MARKER: RUN_ID}
    full_env.pop("RAY_ADDRESS", None)
    full_env["PATH"] = f"{Path(sys.executable).parent}:{full_env.get('PATH', '')}"
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip


def marked_pids() -> list[int]:
    """Live processes started by this test (their environment carries MARKER=RUN_ID)."""
    needle = f"{MARKER}={RUN_ID}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM the process groups we started and every process carrying the marker (Ray starts
    some in sessions of their own), then SIGKILL what is left after a grace period."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for pid in marked_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while marked_pids() and time.monotonic() < deadline:
        time.sleep(0.25)
    # SIGKILL is delivered asynchronously and a dying Ray process may still fork one last worker,
    # so kill again until nothing carries the marker (bounded).
    deadline = time.monotonic() + 15
    while (left := marked_pids()) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.25)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    assert not marked_pids(), f"processes of the emulation still alive: {marked_pids()}"


# --------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------


def emulation_values(models: Path) -> dict[str, Any]:
    """One sharded tier on a demo checkpoint, small pods, and each pod's own Ray ports."""

    def ports(head: bool = False) -> dict[str, str]:
        keys = ["metrics-export-port", "dashboard-agent-listen-port"]
        if head:
            keys += ["port", "dashboard-port", "ray-client-server-port"]
        params = {k: str(free_port()) for k in keys}
        params["object-store-memory"] = str(80 * 2**20)
        return params

    small = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
    tier = chart.tier(
        "fast", model=str(models / "fast"), engine={**chart.tier("x")["engine"], **ENGINE}
    )
    tier["experts"]["shards"] = 1
    return {
        "moeray": {
            "tiers": [tier],
            "router": {"fast_tier": "fast", "reasoning_tier": "fast"},
            "serve": {"grpc_port": free_port(), "http_port": free_port(), "router_replicas": 1},
        },
        "models": {
            "source": "hostPath",
            "mountPath": str(models),
            "hostPath": {"path": str(models)},
        },
        "rayService": {"serveProxyPort": free_port()},
        "head": {"rayStartParams": ports(head=True), "resources": small},
        "routerGroup": {"rayStartParams": ports(), "resources": small},
        "engineDefaults": {
            "rayStartParams": ports(),
            "resources": {**small, "limits": {"cpu": "2", "memory": "3Gi"}},
        },
        "expertGroup": {"rayStartParams": ports(), "resources": small},
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("kuberay")
    models = root / "models"
    build_demo_checkpoint(models / "fast", preset="tiny", seed=0)
    values = emulation_values(models)
    objects = chart.render(values, root)
    rs = chart.one(objects, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    procs: list[subprocess.Popen[bytes]] = []
    tmp_dirs: list[str] = []
    try:
        # Redis (the StatefulSet's container, its port 6379 and /data mapped onto this machine).
        sts = chart.one(objects, "StatefulSet")
        redis_c = sts["spec"]["template"]["spec"]["containers"][0]
        redis_port = free_port()
        redis_env = container_env(redis_c, objects, {})
        args = [re.sub(r"\$\((\w+)\)", lambda m: redis_env[m.group(1)], a) for a in redis_c["args"]]
        args[args.index("--port") + 1] = str(redis_port)
        args[args.index("--dir") + 1] = str(root)
        procs.append(start_process([*redis_c["command"], *args], redis_env, root / "redis.log"))
        services = {f"{chart.RELEASE}-moeray-redis:6379": f"127.0.0.1:{redis_port}"}
        token = secret_value(objects, rc["authOptions"]["secretName"], "auth_token")
        kuberay_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

        groups = {"head": rc["headGroupSpec"]} | {g["groupName"]: g for g in rc["workerGroupSpecs"]}
        head_params = ray_start_params(groups["head"], True, "")
        head_address = f"127.0.0.1:{head_params['port']}"
        pods: dict[str, EmulatedPod] = {}
        for name, group in groups.items():
            head = name == "head"
            params = ray_start_params(group, head, head_address)
            tmp_dir = tempfile.mkdtemp(prefix="mrk-", dir="/tmp")  # the pod's own /tmp
            tmp_dirs.append(tmp_dir)
            params["temp-dir"] = tmp_dir
            container = group["template"]["spec"]["containers"][0]
            env = {**container_env(container, objects, services), **kuberay_env}
            cmd = ["bash", "-c", ray_start_command(params, head)]
            proc = start_process(cmd, env, root / f"{name}.log")
            procs.append(proc)
            pods[name] = EmulatedPod(name, container, proc, root / f"{name}.log", params)
            if head:  # KubeRay starts workers' raylets once the head's GCS is up
                wait_for("head startup probe", lambda: pods["head"].probe("startup"),
                         STARTUP_TIMEOUT_S, [pods["head"]])  # fmt: skip
        for pod in pods.values():
            wait_for(f"{pod.group} startup probe", lambda p=pod: p.probe("startup"),  # type: ignore[misc]
                     STARTUP_TIMEOUT_S, list(pods.values()))  # fmt: skip
        wait_for("head readiness", lambda: pods["head"].probe("readiness"),
                 STARTUP_TIMEOUT_S, list(pods.values()))  # fmt: skip
        yield {"values": values, "objects": objects, "pods": pods, "token": token,
               "dashboard": f"http://127.0.0.1:{head_params['dashboard-port']}"}  # fmt: skip
    finally:
        stop_all(procs)
        for d in tmp_dirs:
            subprocess.run(["rm", "-rf", d], check=False)


def dashboard_json(cluster: dict[str, Any], path: str) -> Any:
    status, body = http_get(cluster["dashboard"] + path, cluster["token"], timeout=30)
    assert status == 200, f"GET {path}: {status} {body[:500]}"
    return json.loads(body)


def test_groups_become_ray_nodes_with_their_resources(cluster: dict[str, Any]) -> None:
    nodes = dashboard_json(cluster, "/api/v0/nodes?detail=true&limit=100")["data"]["result"][
        "result"
    ]
    alive = [n for n in nodes if n["state"] == "ALIVE"]
    assert len(alive) == len(cluster["pods"]) == 4
    by_resource = {r: n for n in alive for r in n["resources_total"] if r.startswith("moeray_")}
    assert by_resource["moeray_router"]["resources_total"]["moeray_router"] == 1
    assert by_resource["moeray_engine_fast"]["resources_total"]["CPU"] == 2
    assert by_resource["moeray_expert_slot"]["resources_total"]["moeray_expert_slot"] == 2
    (head,) = [n for n in alive if n["is_head_node"]]
    assert head["resources_total"].get("CPU", 0) == 0  # head.numCpus: nothing heavy lands there


def test_serve_config_through_the_rest_api_then_generate(cluster: dict[str, Any]) -> None:
    rs = chart.one(cluster["objects"], "RayService")
    body = json.dumps(yaml.safe_load(rs["spec"]["serveConfigV2"])).encode()
    url = cluster["dashboard"] + "/api/serve/applications/"
    put = urllib.request.Request(url, data=body, method="PUT",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as refused:  # token auth is on
        urllib.request.urlopen(put, timeout=60)
    assert refused.value.code in (401, 403)
    put.add_header("Authorization", f"Bearer {cluster['token']}")
    with urllib.request.urlopen(put, timeout=60) as resp:
        assert resp.status == 200

    pods: dict[str, EmulatedPod] = cluster["pods"]

    last: dict[str, Any] = {}

    def running() -> bool:
        apps = dashboard_json(cluster, "/api/serve/applications/")["applications"]
        app = apps.get("moeray")
        last["app"] = app
        assert app is None or app["status"] != "DEPLOY_FAILED", app and app["message"]
        return app is not None and app["status"] == "RUNNING"

    try:
        wait_for("the moeray app RUNNING", running, DEPLOY_TIMEOUT_S, list(pods.values()))
    except AssertionError as e:  # say what Serve says of each deployment
        deployments = {
            name: (d.get("status"), d.get("message"))
            for name, d in ((last.get("app") or {}).get("deployments") or {}).items()
        }
        raise AssertionError(f"{e}; deployments: {deployments}") from None

    # KubeRay's RayService readiness: the head's Serve proxy answers on the `serve` port.
    head_c = pods["head"].container
    serve_port = {p["name"]: p["containerPort"] for p in head_c["ports"]}["serve"]
    status, text = http_get(f"http://127.0.0.1:{serve_port}/-/healthz")
    assert status == 200 and "success" in text

    # The kubelet: every pod live and ready; the router pod once its router answers gRPC health;
    # the expert pod although it holds no Serve replica.
    wait_for("router readiness", lambda: pods["router"].probe("readiness"), 60, list(pods.values()))
    for pod in pods.values():
        assert pod.probe("liveness") and pod.probe("readiness"), pod.group

    # The router replica runs on the router group's pod (serve.router_resource).
    app = dashboard_json(cluster, "/api/serve/applications/")["applications"]["moeray"]
    nodes = dashboard_json(cluster, "/api/v0/nodes?detail=true&limit=100")["data"]["result"][
        "result"
    ]
    router_node = [n["node_id"] for n in nodes if "moeray_router" in n["resources_total"]]
    replicas = app["deployments"]["router"]["replicas"]
    assert [r["node_id"] for r in replicas] == router_node

    # Generate through the front-door Service: its grpc port -> the router pod's grpc port.
    svc = chart.one(cluster["objects"], "Service", f"{chart.RELEASE}-moeray")
    ports = {p["name"]: p for p in svc["spec"]["ports"]}
    router_ports = {p["name"]: p["containerPort"] for p in pods["router"].container["ports"]}
    grpc_addr = f"127.0.0.1:{router_ports[ports['grpc']['targetPort']]}"
    with grpc.insecure_channel(grpc_addr) as ch:
        stub = pb_grpc.InferenceStub(ch)
        req = pb.GenerateRequest(prompt="The capital of France", tier="fast",
                                 sampling=pb.SamplingParams(max_tokens=8, temperature=0))  # fmt: skip
        msgs = list(stub.Generate(req, timeout=120))
    assert msgs and msgs[-1].usage.completion_tokens == 8
    assert sum(len(m.token_ids) for m in msgs) == 8
    assert all(m.tier == "fast" for m in msgs)

    # The tier's expert shards run on the expert group's raylets, its engine on its own group's.
    actors = dashboard_json(cluster, "/api/v0/actors?detail=true&limit=1000")["data"]["result"][
        "result"
    ]
    alive = [a for a in actors if a["state"] == "ALIVE"]
    expert_nodes = {n["node_id"] for n in nodes if "moeray_expert_slot" in n["resources_total"]}
    engine_nodes = {n["node_id"] for n in nodes if "moeray_engine_fast" in n["resources_total"]}
    shards = [a for a in alive if a["class_name"] == "ExpertShard"]
    assert shards and {a["node_id"] for a in shards} <= expert_nodes, shards
    engines = [r["node_id"] for r in app["deployments"]["engine-fast"]["replicas"]]
    assert engines and set(engines) <= engine_nodes

    http_base = f"http://127.0.0.1:{router_ports[ports['http']['targetPort']]}"
    assert http_get(f"{http_base}/health")[0] == 200
    status, metrics = http_get(f"{http_base}/metrics")
    assert status == 200 and "moeray_requests_total{" in metrics
