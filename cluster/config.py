"""The one typed configuration of moeray.

A root `MoerayConfig` made of small per-concern configs. YAML file <-> config <-> CLI flags <-> Helm
values map one to one (field names are the same everywhere). Every config validates itself on
construction and its errors are sentences that name the field. Environment variables are read
here and nowhere else (the one exception: MOERAY_KERNELS, read by moeray.kernels.dispatch,
which may import nothing but torch and triton).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EngineAutoscalingConfig(_Strict):
    """Engine replicas of a tier scaled on LLM signals (cluster/autoscaling.py, run by Ray Serve).

    Every replica reports its waiting requests, KV-cache use and TTFT p90; the tier wants as many
    replicas as the most demanding signal asks for, within [min_replicas, max_replicas]. Serve
    applies the delays, so a short burst scales nothing and an idle tier returns to min_replicas
    after downscale_delay_s.
    """

    enabled: bool = Field(False, description="scale on these signals instead of engine.replicas")
    min_replicas: int = Field(1, ge=1, description="replicas at least (also the initial count)")
    max_replicas: int = Field(4, ge=1, description="replicas at most")
    target_waiting: float = Field(
        2.0, gt=0, description="waiting (queued) requests per replica the tier aims for"
    )
    target_kv_use: float = Field(
        0.8, gt=0, le=1, description="fraction of KV-cache blocks in use per replica to aim for"
    )
    target_ttft_p90_s: float | None = Field(
        None, gt=0, description="time to first token (p90 over look_back_period_s); None = unused"
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="a need must last this long to add")
    downscale_delay_s: float = Field(
        60.0, ge=0, description="idle (or over-provisioned) this long before removing a replica"
    )
    look_back_period_s: float = Field(10.0, gt=0, description="window the signals average over")

    @model_validator(mode="after")
    def _bounds(self) -> EngineAutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("engine.autoscaling.max_replicas must be >= min_replicas")
        return self


class EngineConfig(_Strict):
    """The engine of one tier: paged KV cache and continuous batching, and how many replicas."""

    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks; None = sized from kv_cache_memory_gb"
    )
    kv_cache_memory_gb: float = Field(
        1.0, gt=0, description="memory for the KV cache when num_kv_blocks is None"
    )
    max_num_seqs: int = Field(64, ge=1, description="sequences in the running batch at most")
    max_num_batched_tokens: int = Field(2048, ge=1, description="tokens in one step at most")
    prefill_chunk_size: int = Field(
        512, ge=1, description="long prompts are prefilled in chunks of this size"
    )
    max_model_len: int | None = Field(None, ge=1, description="context limit; None = the model's")
    max_tokens_limit: int = Field(
        4096, ge=1, description="largest max_tokens a request may ask for"
    )
    max_queue: int = Field(
        256, ge=0, description="waiting requests at most before new ones are refused"
    )
    cpu_tuning: bool = Field(
        True,
        description="tune a CPU model after loading (workers/cpu_tuning.py: oneDNN-prepacked "
        "linear layers, single-threaded numpy BLAS); false = plain torch layers",
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV blocks of prompt prefixes seen before (vLLM's APC)"
    )
    replicas: int = Field(1, ge=1, description="engine replicas of the tier (without autoscaling)")
    autoscaling: EngineAutoscalingConfig = Field(
        default_factory=EngineAutoscalingConfig,
        description="scale the replicas on LLM signals instead of a fixed count (enabled: true)",
    )
    drain_timeout_s: float = Field(
        120.0, gt=0, description="a replica being removed finishes its streams within this time"
    )

    @model_validator(mode="after")
    def _one_replica_setting(self) -> EngineConfig:
        if self.autoscaling.enabled and self.replicas != 1:
            raise ValueError(
                "engine.replicas must stay 1 when engine.autoscaling.enabled is true "
                "(autoscaling.min_replicas sets the initial count)"
            )
        return self


class ExpertsConfig(_Strict):
    """Where a tier's routed experts run."""

    shards: int = Field(0, ge=0, description="expert-shard Ray actors; 0 = in-process experts")
    replicas: int = Field(1, ge=1, description="replicas of every expert at start")
    transport: Literal["socket", "plain"] = Field(
        "socket",
        description="engine <-> shard dispatch: socket = a Unix socket to shards on the engine's "
        "node and TCP to shards on other nodes; plain = Ray actor calls (slower)",
    )
    dispatch_deadline_s: float = Field(
        0.5,
        gt=0,
        description="a shard that has not answered one layer's dispatch (of up to 64 tokens; "
        "bigger batches get proportionally longer) within this is replaced and the step re-run",
    )
    shard_num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per shard actor")
    shard_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per shard actor")
    shard_resource: str | None = Field(
        "moeray_expert_slot",
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="custom Ray resource a node must advertise to hold expert shards (one unit "
        "per shard; the Helm chart's expert group advertises it, and the Ray autoscaler adds "
        "such nodes when shards wait); None = any node with the CPUs/GPUs",
    )
    autoscale: Literal["off", "advisory", "active"] = Field(
        "off",
        description="the tier's expert autoscaler (cluster/expert_autoscaler.py): off; advisory = "
        "plan and publish (Redis, moeray experts --plan, metrics), change nothing; active = "
        "replicate hot experts onto new shards and give cold replicas back, while serving",
    )
    rebalance_interval_s: float = Field(
        30.0, gt=0, description="the autoscaler reads the load windows and plans this often"
    )
    rebalance_threshold: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="a plan is carried out only if it raises balancedness by more than this",
    )
    rebalance_cooldown_s: float = Field(
        60.0, ge=0, description="no new placement within this long after the last change"
    )
    scale_down_idle_s: float = Field(
        120.0,
        gt=0,
        description="an expert's extra replicas (beyond min_replicas) are given back after its "
        "load has not needed them for this long",
    )
    min_replicas: int = Field(1, ge=1, description="replicas of every expert at least")
    max_replicas: int = Field(4, ge=1, description="replicas of one expert at most")
    slots_per_shard: int | None = Field(
        None, ge=1, description="experts (per MoE layer) one shard may hold; None = unbounded"
    )
    max_shards: int | None = Field(
        None, ge=1, description="shard actors the autoscaler may use at most; None = shards"
    )

    @field_validator("autoscale", mode="before")
    @classmethod
    def _autoscale_mode(cls, v: Any) -> Any:
        if v is False:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if isinstance(v, bool):
            raise ValueError("experts.autoscale is a mode now: off, advisory or active, not true")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> ExpertsConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError("experts.max_replicas must be >= experts.min_replicas")
        if self.max_shards is not None and self.max_shards < self.shards:
            raise ValueError("experts.max_shards must be >= experts.shards")
        return self


class TierConfig(_Strict):
    """One tier of the query router: a model and how it is served."""

    name: str = Field(..., min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    model: str = Field(..., min_length=1, description="local path of a Hugging Face checkpoint")
    dtype: DType = "auto"
    description: str = ""
    engine: EngineConfig = Field(default_factory=EngineConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="where each engine replica runs the model: cuda, cpu, or auto (cuda when the "
        "replica's process sees a GPU); cuda on a machine without one is refused when the "
        "engine starts",
    )
    num_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs each engine replica asks Ray for; its torch threads (at least 1)",
    )
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs each engine replica asks Ray for (device cuda needs > 0)"
    )
    reasoning_parser: Literal["deepseek_r1", "qwen3"] | None = Field(
        None,
        description="split a reasoning model's thinking (<think>...</think>) from its answer "
        "into chat's reasoning_content, as vLLM's --reasoning-parser: deepseek_r1 (the template "
        "opens <think>; all is reasoning until </think>) or qwen3 (both tags in the output)",
    )
    tool_call_parser: Literal["hermes", "pythonic", "mistral", "deepseek_v3"] | None = Field(
        None,
        description="tell a model's tool calls from its text on chat, so that tool_choice auto "
        "(OpenAI's default with tools) works, as vLLM's --tool-call-parser: hermes (Qwen2.5, "
        "Qwen3, Qwen3-MoE: JSON {name, arguments} between <tool_call> and </tool_call>), "
        "pythonic (Llama 3.2, Llama 4: a Python list of calls, [f(a=1), g()]), mistral "
        "(Mixtral 8x22B Instruct and Mistral's tool models: the calls after [TOOL_CALLS]) or "
        "deepseek_v3 (DeepSeek-V3, R1, V3.1: calls between <｜tool▁call▁begin｜> tags); "
        "None = auto is refused, required and named functions still work",
    )
    resource: str | None = Field(
        None,
        min_length=1,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="custom Ray resource a node must advertise to hold this tier's engine "
        "replicas (one unit each; the Helm chart's engine group of the tier advertises "
        "moeray_engine_<tier>); None = any node with the CPUs/GPUs",
    )

    @model_validator(mode="after")
    def _gpu_for_cuda(self) -> TierConfig:
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError(
                f"tiers[{self.name}].num_gpus must be > 0 when device is cuda "
                "(Ray hides the GPUs from a replica that asks for none)"
            )
        return self


class RouterConfig(_Strict):
    """Query-level routing between tiers."""

    policy: Literal["features", "classifier"] = "features"
    fast_tier: str = "fast"
    reasoning_tier: str = "reasoning"
    threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="score at or above which a request goes to the reasoning tier",
    )
    classifier_path: str | None = Field(
        None, description="trained classifier file (policy=classifier)"
    )
    allow_fallback: bool = Field(
        True, description="send to the fast tier when the reasoning tier is saturated"
    )
    max_inflight_per_tier: int = Field(
        256, ge=1, description="requests in flight per tier before it counts as saturated"
    )
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest request message accepted"
    )
    max_queue_wait_s: float = Field(
        20.0,
        gt=0,
        description="an admitted request with no first token after this long is refused "
        "(RESOURCE_EXHAUSTED / HTTP 429) and its engine call cancelled",
    )
    prefix_routing: bool = Field(
        True,
        description="send a request to the engine replica that served its prompt prefix before "
        "(its KV blocks are likely cached there); false = always the least-loaded replica",
    )
    prefix_imbalance: int = Field(
        8,
        ge=0,
        description="open streams the prefix holder may have above the least-loaded "
        "replica before the request goes to the least-loaded one instead",
    )


class StateConfig(_Strict):
    """The Redis control state."""

    redis_url: str | None = Field(
        None, description="redis://host:port/db; None = a private redis-server"
    )
    cluster: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    heartbeat_ttl_s: float = Field(10.0, gt=0)
    load_window_s: float = Field(10.0, gt=0)
    load_push_every_steps: int = Field(16, ge=1)


class ServeConfig(_Strict):
    """Where clients reach the front door (docs/SERVING.md).

    Every router replica listens on host:grpc_port and host:http_port of its node itself, so
    there is at most one per node. Port 0 = a free port chosen at start (one node only).
    """

    host: str = Field("127.0.0.1", min_length=1, description="address the front door binds")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (moeray.v1.Inference)")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (OpenAI API, /metrics)")
    router_replicas: int = Field(1, ge=1, description="router replicas (one per node at most)")
    router_resource: str | None = Field(
        None,
        min_length=1,
        description="custom Ray resource a node must advertise to hold a router replica "
        "(the Helm chart gives it to the nodes its front-door Service selects); None = any node",
    )

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServeConfig:
        if self.grpc_port and self.grpc_port == self.http_port:
            raise ValueError("serve.grpc_port and serve.http_port must differ")
        return self


class MoerayConfig(_Strict):
    """The root config: tiers, router, state, serve."""

    tiers: list[TierConfig] = Field(..., min_length=1)
    router: RouterConfig = Field(default_factory=RouterConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("tiers")
    @classmethod
    def _unique_names(cls, tiers: list[TierConfig]) -> list[TierConfig]:
        names = [t.name for t in tiers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"tier names must be unique; repeated: {sorted(dup)}")
        return tiers

    def tier(self, name: str) -> TierConfig:
        for t in self.tiers:
            if t.name == name:
                return t
        raise KeyError(name)


#: Environment variables the config reads (here and nowhere else), and the fields they fill when
#: the config leaves them unset: a Redis URL with a password comes from a Kubernetes Secret this
#: way, never from the (visible) Serve config.
ENVIRONMENT = {"MOERAY_REDIS_URL": ("state", "redis_url")}


def apply_environment(config: MoerayConfig, environ: dict[str, str] | None = None) -> MoerayConfig:
    """The config with unset fields filled from the environment (ENVIRONMENT)."""
    env = os.environ if environ is None else environ
    for var, (section, name) in ENVIRONMENT.items():
        part = getattr(config, section)
        if env.get(var) and getattr(part, name) is None:
            part = part.model_copy(update={name: env[var]})
            config = config.model_copy(update={section: part})
    return config


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the field."""


def config_with(config: MoerayConfig, section: str, values: dict[str, Any]) -> MoerayConfig:
    """The config with `values` set in one section (CLI flags), validated again as a whole;
    ConfigError naming `section.field` otherwise."""
    raw = config.model_dump()
    raw[section] = {**raw[section], **values}
    try:
        return MoerayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid option: {describe_validation_error(e)}") from None


def config_set(config: MoerayConfig, assignments: list[str]) -> MoerayConfig:
    """The config with `path=value` assignments applied (the CLI's --set, like Helm's), e.g.
    `tiers.0.experts.autoscale=active` or `router.prefix_routing=false`; values are YAML
    scalars or flow collections. Every config field is reachable this way; ConfigError names
    the path of a bad one."""
    raw: Any = config.model_dump()
    for item in assignments:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--set {item!r}: expected PATH=VALUE, e.g. router.threshold=0.6")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {path}: the value is not valid YAML: {e}") from None
        node = raw
        keys = path.split(".")
        for depth, key in enumerate(keys):
            where = ".".join(keys[: depth + 1])
            last = depth == len(keys) - 1
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(f"--set {path}: {where} is not an index of the list")
                if last:
                    node[int(key)] = value
                else:
                    node = node[int(key)]
            elif isinstance(node, dict) and key in node:
                if last:
                    node[key] = value
                else:
                    node = node[key]
            else:
                raise ConfigError(f"--set {path}: {where} is not a config field")
    try:
        return MoerayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid --set: {describe_validation_error(e)}") from None


def describe_validation_error(err: ValidationError) -> str:
    """One sentence per problem, each naming the dotted field path."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def load_config(
    path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> MoerayConfig:
    """Reads a YAML config file and validates it; raises ConfigError naming the file and field."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    raw = {**raw, **(overrides or {})}
    try:
        return MoerayConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"invalid config {p}: {describe_validation_error(e)}") from None
