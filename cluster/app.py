"""The moeray Serve application, wired in one place.

    client ─gRPC/HTTP─▶ router (RouterIngress) ─┬─ Generate: engine channel (TCP) ─▶ engine-<tier>
      (direct ingress, or Serve's proxies)      └─ stats/health/fallback: handle ──▶ (EngineServer)

- `build_app(config)`: one engine deployment per tier (workers/engine_deployment.py, given an
  `EngineRegistry` so its direct channel is announced in Redis) and the router ingress
  (router/ingress.py + router/http_app.py) holding their handles.
- `serve_env(config)`: the Ray Serve environment of every process; serve.ingress "direct" (the
  default) makes the router replica listen on the configured ports itself (Serve's direct
  ingress), "proxy" leaves them to Serve's proxies (docs/SERVING.md).
- `serve_options(config)`: the proxies' options. gRPC registers moeray.v1.Inference and
  grpc.health.v1.Health (both answered by the router deployment) and serves reflection
  (gRPCOptions.enable_reflection), so one port (--grpc-port) serves all three.
- `LocalStack`: the laptop stack (`moeray serve`, tests): a private redis-server when no
  state.redis_url is given, a local Ray instance with serve_env, Serve with the app; `close()`
  stops all three.
"""

from __future__ import annotations

import logging
from typing import Any

from moeray.cluster.config import MoerayConfig, TierConfig
from moeray.cluster.redis_server import free_port

log = logging.getLogger(__name__)

APP_NAME = "moeray"
ROUTER_DEPLOYMENT = "router"
GRPC_SERVICER_FUNCTIONS = [
    "moeray.v1.inference_pb2_grpc.add_InferenceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
#: Handle calls beyond the generation streams: stats, health checks, aborts.
_CONTROL_SLACK = 32
#: Serve writes one access-log line per request per process (proxy, router, engine): about
#: 0.3 ms of CPU each on the 2-core dev machine, for lines the moeray metrics already cover.
_LOGGING = {"enable_access_log": False}
#: Serve runs user code and the handle's router on event loops of their own threads, so a
#: streamed item crosses threads inside each replica. These flags put everything on one loop
#: (part of what RAY_SERVE_THROUGHPUT_OPTIMIZED does). Not set: with the engine channel they
#: measured no better (`bench/frontdoor.py --compare`, docs/BENCHMARKS.md).
SINGLE_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
#: Serve settings of the laptop stack only: no load balancer drains the router replica on this
#: machine, so it stops at once (Serve's default holds it 30 s, which would delay every close()).
LOCAL_SERVE_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
#: Environment variables of the replicas' processes (their runtime_env).
REPLICA_ENV: dict[str, str] = {}


def serve_env(config: MoerayConfig) -> dict[str, str]:
    """The Ray Serve settings every process of the app needs (controller, proxies, replicas).

    LocalStack sets them as the Ray job's environment; on Kubernetes the Helm chart sets the same
    variables on the Ray pods. serve.ingress "direct" turns on Serve's direct ingress and pins the
    port range Serve allocates ingress ports from to exactly grpc_port / http_port, so the router
    replica itself listens there (one router replica per node).
    """
    s = config.serve
    if s.ingress != "direct":
        return {}
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(s.grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(s.grpc_port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(s.http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(s.http_port + 1),
    }


def engine_deployment_name(tier: str) -> str:
    return f"engine-{tier}"


def _engine(tier: TierConfig, config: MoerayConfig) -> Any:
    from moeray.workers.engine_deployment import EngineServer
    from ray import serve

    # Serve's own queue must never refuse before the engine's bounded queue does (429 comes
    # from the engine or the router, quickly); the engine's threads use the CPUs torch sees.
    ongoing = tier.engine.max_num_seqs + tier.engine.max_queue + _CONTROL_SLACK
    deployment = serve.deployment(
        name=engine_deployment_name(tier.name),
        ray_actor_options=_actor_options(),
        max_ongoing_requests=ongoing,
        health_check_period_s=10,
        logging_config=_LOGGING,
    )(EngineServer)
    registry = None
    st = config.state
    if st.redis_url and config.router.engine_channel:  # the router finds it through Redis
        from moeray.cluster.state import EngineRegistry

        registry = EngineRegistry(st.redis_url, st.cluster, st.heartbeat_ttl_s)
    return deployment.bind(tier, registry)


def _actor_options() -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": 0}
    if REPLICA_ENV:
        options["runtime_env"] = {"env_vars": dict(REPLICA_ENV)}
    return options


def build_app(config: MoerayConfig) -> Any:
    """The Serve Application: the router ingress bound to every tier's engine deployment."""
    from moeray.router.ingress import RouterIngress
    from ray import serve

    engines = {t.name: _engine(t, config) for t in config.tiers}
    ongoing = len(config.tiers) * config.router.max_inflight_per_tier + _CONTROL_SLACK
    router = serve.deployment(
        name=ROUTER_DEPLOYMENT,
        ray_actor_options=_actor_options(),
        max_ongoing_requests=ongoing,
        logging_config=_LOGGING,
    )(serve.ingress()(RouterIngress))
    return router.bind(config, engines)


def serve_options(config: MoerayConfig) -> tuple[Any, Any]:
    """(HTTPOptions, gRPCOptions) for serve.start from config.serve.

    With ingress "proxy" Serve's proxies listen on the configured ports. With "direct" the router
    replica does (serve_env), and the proxies, which Serve still starts, get free internal ports.
    """
    from ray.serve.config import HTTPOptions, gRPCOptions

    s = config.serve
    direct = s.ingress == "direct"
    http = HTTPOptions(host=s.host, port=free_port() if direct else s.http_port)
    grpc_opts = gRPCOptions(
        port=free_port() if direct else s.grpc_port,
        grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS,
        enable_reflection=True,
    )
    return http, grpc_opts


def with_ports(config: MoerayConfig) -> MoerayConfig:
    """The config with port 0 replaced by a free port (both ingress modes need real numbers)."""
    s = config.serve
    update = {k: free_port() for k in ("grpc_port", "http_port") if getattr(s, k) == 0}
    if not update:
        return config
    return config.model_copy(update={"serve": s.model_copy(update=update)})


class LocalStack:
    """Redis (private unless configured) + local Ray + Serve running the moeray app.

    The config given is the one served, except that state.redis_url is filled in with the
    private server's URL. Use as a context manager or call start() / close().
    """

    def __init__(self, config: MoerayConfig, num_cpus: int | None = None) -> None:
        self.config = config
        self.num_cpus = num_cpus
        self.redis: Any = None
        self._ray_started = False

    def start(self, timeout_s: float = 300.0) -> LocalStack:
        import ray
        from ray import serve

        if self.config.state.redis_url is None:
            from moeray.cluster.redis_server import RedisServer

            self.redis = RedisServer().start()
            state = self.config.state.model_copy(update={"redis_url": self.redis.url})
            self.config = self.config.model_copy(update={"state": state})
        self.config = with_ports(self.config)
        if not ray.is_initialized():
            env = {**serve_env(self.config), **LOCAL_SERVE_ENV}
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})  # fmt: skip
            self._ray_started = True
        elif self.config.serve.ingress == "direct":
            # Ray was started elsewhere, without this stack's Serve environment: Serve's proxies
            # serve the configured ports instead (a cluster sets serve_env on its pods).
            log.warning("Ray is already running: serving through Serve's proxies (ingress proxy)")
            serve_cfg = self.config.serve.model_copy(update={"ingress": "proxy"})
            self.config = self.config.model_copy(update={"serve": serve_cfg})
        http, grpc_opts = serve_options(self.config)
        serve.start(http_options=http, grpc_options=grpc_opts, logging_config=_LOGGING)
        serve.run(build_app(self.config), name=APP_NAME, route_prefix="/", blocking=False)
        self._wait_running(timeout_s)
        return self

    def _wait_running(self, timeout_s: float) -> None:
        """serve.run returns once deployed; replicas that failed to start surface here."""
        import time

        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                return
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"the moeray app failed to deploy: {status.message}")
            time.sleep(0.2)
        raise TimeoutError(f"the moeray app was not running after {timeout_s} s")

    def endpoints(self) -> dict[str, str]:
        s = self.config.serve
        return {
            "grpc": f"{s.host}:{s.grpc_port}",
            "http": f"http://{s.host}:{s.http_port}/v1",
            "redis": self.config.state.redis_url or "",
        }

    def close(self) -> None:
        """Stops Serve, then Ray (if this stack started it), then the private redis-server."""
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            if self._ray_started and ray.is_initialized():
                ray.shutdown()
            if self.redis is not None:
                self.redis.stop()
                self.redis = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
