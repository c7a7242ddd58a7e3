"""The moeray Serve application, wired in one place.

    client ─gRPC─▶ Serve gRPC proxy ─┐                    ┌─▶ engine-<tier> (EngineServer) ...
    client ─HTTP─▶ Serve HTTP proxy ─┴─▶ router (RouterIngress) ─┤
                                                          └─▶ engine-<tier> ...

- `build_app(config)`: one engine deployment per tier (workers/engine_deployment.py) and the
  router ingress (router/ingress.py + router/http_app.py) holding their handles.
- `serve_options(config)`: the proxies' options. The gRPC proxy registers moeray.v1.Inference
  and grpc.health.v1.Health (both answered by the router deployment) and serves reflection
  itself (Serve's gRPCOptions.enable_reflection, a passthrough service on the proxy), so one
  port (--grpc-port) serves all three; see docs/SERVING.md.
- `LocalStack`: the laptop stack (`moeray serve`, tests): a private redis-server when no
  state.redis_url is given, a local Ray instance, Serve with the app; `close()` stops all three.
"""

from __future__ import annotations

import logging
from typing import Any

from moeray.cluster.config import MoerayConfig, TierConfig

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
#: (what RAY_SERVE_THROUGHPUT_OPTIMIZED does). Measured with `bench/frontdoor.py --compare`
#: (docs/BENCHMARKS.md): no difference beyond the noise of the loaded 2-core VM, so replicas keep
#: Serve's defaults (REPLICA_ENV, empty) and the bench keeps the comparison.
SINGLE_LOOP_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
#: Environment variables of the replicas' processes (their runtime_env).
REPLICA_ENV: dict[str, str] = {}


def engine_deployment_name(tier: str) -> str:
    return f"engine-{tier}"


def _engine(tier: TierConfig) -> Any:
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
    return deployment.bind(tier)


def _actor_options() -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": 0}
    if REPLICA_ENV:
        options["runtime_env"] = {"env_vars": dict(REPLICA_ENV)}
    return options


def build_app(config: MoerayConfig) -> Any:
    """The Serve Application: the router ingress bound to every tier's engine deployment."""
    from moeray.router.ingress import RouterIngress
    from ray import serve

    engines = {t.name: _engine(t) for t in config.tiers}
    ongoing = len(config.tiers) * config.router.max_inflight_per_tier + _CONTROL_SLACK
    router = serve.deployment(
        name=ROUTER_DEPLOYMENT,
        ray_actor_options=_actor_options(),
        max_ongoing_requests=ongoing,
        logging_config=_LOGGING,
    )(serve.ingress()(RouterIngress))
    return router.bind(config, engines)


def serve_options(config: MoerayConfig) -> tuple[Any, Any]:
    """(HTTPOptions, gRPCOptions) for serve.start from config.serve."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    http = HTTPOptions(host=config.serve.host, port=config.serve.http_port)
    grpc_opts = gRPCOptions(
        port=config.serve.grpc_port,
        grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS,
        enable_reflection=True,
    )
    return http, grpc_opts


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
        if not ray.is_initialized():
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False)
            self._ray_started = True
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
