"""The moeray Serve application, wired in one place.

    client ─gRPC/HTTP─▶ router replica (FrontDoor: its own gRPC + HTTP servers on the ports)
                            │ the one internal transport: gRPC, msgspec bodies, endpoints in Redis
                            ▼
                        engine-<tier> replicas (EngineServer: AsyncLLMEngine + EngineService)

- `build_app(config)`: one engine deployment per tier (workers/engine_deployment.py, given an
  `EngineRegistry` so each replica announces its endpoint in Redis) and the router deployment
  (router/front_door.py), at most one replica per node, optionally pinned to nodes that advertise
  `serve.router_resource`. Serve places, restarts and health-checks the replicas; Serve's own
  proxies are not used (`proxy_location: Disabled`), so no private Serve flag is involved.
- `app_builder(args)`: the same app for a Serve config file / KubeRay's `serveConfigV2`
  (`import_path: moeray.cluster.app:app_builder`, `args: {config: <moeray config>}`).
- `LocalStack`: the laptop stack (`moeray serve`, tests): a private redis-server when no
  state.redis_url is given, a local Ray instance (or an existing cluster at `ray_address`),
  Serve with the app; `close()` stops what it started.
"""

from __future__ import annotations

import logging
from typing import Any

from moeray.cluster.autoscaling import engine_deployment_options
from moeray.cluster.config import MoerayConfig, TierConfig, apply_environment
from moeray.cluster.redis_server import free_port
from moeray.cluster.resources import engine_actor_options

log = logging.getLogger(__name__)

APP_NAME = "moeray"
ROUTER_DEPLOYMENT = "router"
#: The app's replicas log through moeray's loggers; Serve's per-request access log would add a
#: line per health check and stats call.
_LOGGING = {"enable_access_log": False}
#: Engine replicas set up moeray's structured logs (cluster/logs.py) when their process starts.
_LOG_SETUP = {"worker_process_setup_hook": "moeray.cluster.logs.setup_logging"}
#: The fraction of a router-resource unit one router replica takes (one replica per node anyway).
_ROUTER_RESOURCE_UNITS = 0.01


def _with_log_setup(options: dict[str, Any]) -> dict[str, Any]:
    """Actor options with moeray's log setup added to their runtime_env."""
    return {**options, "runtime_env": {**options.get("runtime_env", {}), **_LOG_SETUP}}


def engine_deployment_name(tier: str) -> str:
    return f"engine-{tier}"


def _engine(tier: TierConfig, config: MoerayConfig) -> Any:
    from moeray.cluster.state import EngineRegistry
    from moeray.workers.engine_deployment import EngineServer
    from ray import serve

    st = config.state
    assert st.redis_url, "state.redis_url is filled in before the app is built"
    deployment = serve.deployment(
        name=engine_deployment_name(tier.name),
        ray_actor_options=_with_log_setup(engine_actor_options(tier)),
        health_check_period_s=2,
        health_check_timeout_s=10,
        logging_config=_LOGGING,
        **engine_deployment_options(tier.engine),  # replicas, or autoscaling on LLM signals
    )(EngineServer)
    registry = EngineRegistry.from_config(st)
    if not tier.experts.shards:
        return deployment.bind(tier, registry)
    return deployment.bind(tier, registry, _expert_controller(tier, registry))


def _expert_controller(tier: TierConfig, registry: Any) -> Any:
    """The tier's expert controller (cluster/expert_autoscaler.py): owns the tier's shard
    actors for all its engine replicas and runs the expert autoscaler; one replica, restarted by
    Serve (its Redis lease lets one act at a time)."""
    from moeray.cluster.expert_autoscaler import ExpertController, controller_deployment_name
    from ray import serve

    return serve.deployment(
        name=controller_deployment_name(tier.name),
        num_replicas=1,
        # Control work only: no CPUs reserved, and never the tier's engine resource, which
        # would take an engine replica's place on its node.
        ray_actor_options=_with_log_setup({"num_cpus": 0}),
        health_check_period_s=2,
        logging_config=_LOGGING,
    )(ExpertController).bind(tier, registry)


def build_app(config: MoerayConfig) -> Any:
    """The Serve Application: the router deployment, bound to every tier's engine deployment."""
    from moeray.router.front_door import FrontDoor
    from ray import serve

    if not config.state.redis_url:
        raise ValueError("state.redis_url must be set to build the app (LocalStack starts one)")
    engines = {t.name: _engine(t, config) for t in config.tiers}
    s = config.serve
    options: dict[str, Any] = {"num_cpus": 0}
    if s.router_resource:
        options["resources"] = {s.router_resource: _ROUTER_RESOURCE_UNITS}
    router = serve.deployment(
        name=ROUTER_DEPLOYMENT,
        num_replicas=s.router_replicas,
        max_replicas_per_node=1,  # each replica listens on the node's grpc_port / http_port
        ray_actor_options=options,
        health_check_period_s=2,
        logging_config=_LOGGING,
    )(FrontDoor)
    return router.bind(config, engines)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve's application builder: `args["config"]` is a moeray config mapping (as in the YAML
    file); environment settings (MOERAY_REDIS_URL) fill what it leaves open."""
    from moeray.cluster.config import ConfigError, describe_validation_error
    from pydantic import ValidationError

    if not isinstance(args, dict) or not isinstance(args.get("config"), dict):
        raise ConfigError("args.config must be a mapping holding the moeray config")
    try:
        config = MoerayConfig.model_validate(args["config"])
    except ValidationError as e:
        raise ConfigError(f"invalid args.config: {describe_validation_error(e)}") from None
    return build_app(apply_environment(config))


def with_ports(config: MoerayConfig) -> MoerayConfig:
    """The config with port 0 replaced by a free port (the router binds real numbers)."""
    s = config.serve
    update = {k: free_port() for k in ("grpc_port", "http_port") if getattr(s, k) == 0}
    if not update:
        return config
    return config.model_copy(update={"serve": s.model_copy(update=update)})


class LocalStack:
    """Redis (private unless configured) + local Ray + Serve running the moeray app.

    The config given is the one served, except that state.redis_url is filled in with the
    private server's URL and ports 0 with free ports. ray_address joins an existing Ray cluster
    instead of starting a local instance. Use as a context manager or call start() / close().
    """

    def __init__(
        self, config: MoerayConfig, num_cpus: int | None = None, ray_address: str | None = None
    ) -> None:
        self.config = apply_environment(config)
        self.num_cpus = num_cpus
        self.ray_address = ray_address
        self.redis: Any = None
        self._ray_started = False
        self._running = False

    def start(self, timeout_s: float = 300.0) -> LocalStack:
        """Starts everything and waits until the front door serves; a second call (e.g. `with
        LocalStack(...).start() as stack`) returns the running stack."""
        if self._running:
            return self
        import ray
        from ray import serve

        if self.config.state.redis_url is None:
            from moeray.cluster.redis_server import RedisServer

            self.redis = RedisServer().start()
            state = self.config.state.model_copy(update={"redis_url": self.redis.url})
            self.config = self.config.model_copy(update={"state": state})
        self.config = with_ports(self.config)
        if not ray.is_initialized():
            if self.ray_address:
                ray.init(address=self.ray_address, log_to_driver=False)
            else:
                from moeray.cluster.expert_parallel import config_expert_resources

                ray.init(
                    address="local",  # a new instance, even if `ray start` runs on this machine
                    num_cpus=self.num_cpus,
                    resources=config_expert_resources(self.config),  # a tier's expert shards
                    include_dashboard=False,
                    log_to_driver=False,
                )
            self._ray_started = True
        serve.start(proxy_location="Disabled", logging_config=_LOGGING)
        serve.run(build_app(self.config), name=APP_NAME, route_prefix=None, blocking=False)
        self._wait_running(timeout_s)
        self._running = True
        return self

    def _wait_running(self, timeout_s: float) -> None:
        """serve.run returns once deployed; replicas that failed to start surface here. Ready
        means the front door answers and reaches an engine replica of every tier."""
        import time

        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING" and self._front_door_ready():
                return
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"the moeray app failed to deploy: {status.message}")
            time.sleep(0.2)
        raise TimeoutError(f"the moeray app was not ready after {timeout_s} s")

    def _front_door_ready(self) -> bool:
        """GET /health on the router answers 200: every tier has an engine replica it reaches."""
        import urllib.error
        import urllib.request

        s = self.config.serve
        host = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
        try:
            with urllib.request.urlopen(f"http://{host}:{s.http_port}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def endpoints(self) -> dict[str, str]:
        s = self.config.serve
        return {
            "grpc": f"{s.host}:{s.grpc_port}",
            "http": f"http://{s.host}:{s.http_port}/v1",
            "redis": self.config.state.redis_url or "",
        }

    def close(self) -> None:
        """Stops Serve (or, on a cluster it joined, only its app), then Ray (if this stack
        started it), then the private redis-server."""
        import ray
        from ray import serve

        self._running = False
        try:
            if ray.is_initialized():
                if self.ray_address:
                    serve.delete(APP_NAME)
                else:
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
