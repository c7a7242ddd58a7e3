"""Typed records of the Redis control state: what engines, shards and the autoscaler exchange.

Everything stored in Redis by `moeray.cluster.state` is one of these dataclasses, serialized here
and nowhere else, so a reader and a writer in different processes agree on the format.

- `Placement`: which expert-shard replicas hold each routed expert of each MoE layer, with the
  epoch under which it was published. Stored as ONE compact JSON blob (nested arrays), never one
  Redis key per expert.
- `ReplicaInfo`: one expert-shard actor as registered by itself (heartbeat-refreshed).
- `PlanRecord`: the expert autoscaler's latest plan and what became of it.

Shape letters (docs/SHAPES.md): L layers (the MoE layers, indexed 0..L-1 in the model's MoE
order), E routed experts per layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

ReplicaState = Literal["starting", "ready", "draining", "dead"]
REPLICA_STATES: tuple[ReplicaState, ...] = ("starting", "ready", "draining", "dead")


NAME_RE = re.compile(r"^[A-Za-z0-9_./-]+$")  # model, tier and cluster names in keys

Mapping3 = tuple[tuple[tuple[int, ...], ...], ...]


def _freeze_mapping(mapping: Iterable[Iterable[Iterable[int]]]) -> Mapping3:
    """Nested sequences -> nested tuples, each replica list sorted and de-duplicated."""
    return tuple(
        tuple(tuple(sorted({int(r) for r in reps})) for reps in layer) for layer in mapping
    )


@dataclass(frozen=True)
class Placement:
    """Expert placement of one model: mapping[layer][expert] -> sorted replica (shard) ids.

    `epoch` is assigned by `ClusterState.publish_placement` (0 = never published). Replica ids
    are the integer ids of expert-shard actors (see `ReplicaInfo.replica_id`).
    """

    epoch: int
    num_layers: int
    num_experts: int
    mapping: Mapping3 = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mapping", _freeze_mapping(self.mapping))
        if self.epoch < 0:
            raise ValueError(f"placement epoch must be >= 0, got {self.epoch}")
        if self.num_layers < 1 or self.num_experts < 1:
            raise ValueError(
                f"placement num_layers and num_experts must be >= 1, got "
                f"{self.num_layers} and {self.num_experts}"
            )
        if len(self.mapping) != self.num_layers or any(
            len(layer) != self.num_experts for layer in self.mapping
        ):
            raise ValueError(
                f"placement mapping must be [num_layers={self.num_layers}][num_experts="
                f"{self.num_experts}] lists of replica ids"
            )
        for li, layer in enumerate(self.mapping):
            for e, reps in enumerate(layer):
                if not reps or reps[0] < 0:
                    raise ValueError(
                        f"placement mapping[{li}][{e}] must list at least one replica id >= 0, "
                        f"got {list(reps)}"
                    )

    def replicas(self, layer: int, expert: int) -> tuple[int, ...]:
        return self.mapping[layer][expert]

    def replica_ids(self) -> list[int]:
        """Every replica id that holds at least one expert, ascending."""
        return sorted({r for layer in self.mapping for reps in layer for r in reps})

    def experts_of(self, replica_id: int) -> dict[int, list[int]]:
        """layer -> ascending experts that `replica_id` holds (layers where it holds none omitted)."""
        held: dict[int, list[int]] = {}
        for li, layer in enumerate(self.mapping):
            experts = [e for e, reps in enumerate(layer) if replica_id in reps]
            if experts:
                held[li] = experts
        return held

    def with_epoch(self, epoch: int) -> Placement:
        return Placement(epoch, self.num_layers, self.num_experts, self.mapping)

    def same_layout(self, other: Placement) -> bool:
        """True when both map every (layer, expert) to the same replicas (epochs ignored)."""
        return self.mapping == other.mapping

    def to_json(self) -> str:
        """Compact JSON of the layout (epoch excluded: Redis stores it beside the body)."""
        body = {"L": self.num_layers, "E": self.num_experts, "m": self.mapping}
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, body: str | bytes, epoch: int) -> Placement:
        d = json.loads(body)
        return cls(epoch=epoch, num_layers=d["L"], num_experts=d["E"], mapping=d["m"])

    @classmethod
    def from_lists(cls, mapping: Sequence[Sequence[Sequence[int]]], epoch: int = 0) -> Placement:
        """Builds a placement from mapping[layer][expert] = replica ids, inferring L and E."""
        num_experts = len(mapping[0]) if mapping else 0
        return cls(epoch, len(mapping), num_experts, _freeze_mapping(mapping))


@dataclass(frozen=True)
class ReplicaInfo:
    """One expert-shard actor, as it registers itself in Redis.

    `experts` lists the (layer, expert) pairs whose weights the actor holds. `node` is its
    node's IP, `node_id` its Ray node id (several raylets may share an IP). `heartbeat_ms` is
    the wall-clock time (ms since the epoch) of its last heartbeat, filled in on read.
    """

    replica_id: int
    actor_name: str
    node: str = ""
    device: str = "cpu"
    node_id: str = ""
    experts: tuple[tuple[int, int], ...] = ()
    state: ReplicaState = "starting"
    heartbeat_ms: int = 0

    def __post_init__(self) -> None:
        if self.replica_id < 0:
            raise ValueError(f"replica_id must be >= 0, got {self.replica_id}")
        if not self.actor_name:
            raise ValueError("actor_name must be a non-empty string")
        if self.state not in REPLICA_STATES:
            raise ValueError(f"state must be one of {REPLICA_STATES}, got {self.state!r}")
        pairs = tuple(sorted((int(li), int(e)) for li, e in self.experts))
        object.__setattr__(self, "experts", pairs)

    def to_fields(self) -> dict[str, str]:
        """Redis hash fields (heartbeat_ms is written by the heartbeat itself)."""
        return {
            "replica_id": str(self.replica_id),
            "actor_name": self.actor_name,
            "node": self.node,
            "node_id": self.node_id,
            "device": self.device,
            "experts": json.dumps(self.experts, separators=(",", ":")),
            "state": self.state,
        }

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> ReplicaInfo:
        return cls(
            replica_id=int(f["replica_id"]),
            actor_name=f["actor_name"],
            node=f.get("node", ""),
            device=f.get("device", "cpu"),
            node_id=f.get("node_id", ""),
            experts=tuple(tuple(p) for p in json.loads(f.get("experts", "[]"))),  # type: ignore[misc]
            state=f.get("state", "starting"),  # type: ignore[arg-type]
            heartbeat_ms=int(f.get("heartbeat_ms", "0")),
        )


@dataclass(frozen=True)
class EngineEndpoint:
    """One engine replica's endpoint (workers/engine_service.py, ZeroMQ), as it registers itself.

    address: host:port the router connects to; token: the secret every call must carry.
    max_prompt_bytes: the longest prompt text (UTF-8 bytes) the engine would tokenize
    (`LLMEngine.max_prompt_bytes`), so that routers refuse longer ones before they cross to the
    engine; 0 when not announced (the engine alone checks).
    """

    tier: str
    replica_id: str
    address: str
    token: str
    max_prompt_bytes: int = 0

    def __post_init__(self) -> None:
        check_name("tier", self.tier)
        check_name("replica_id", self.replica_id)
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"address must be host:port, got {self.address!r}")
        if not self.token:
            raise ValueError("token must be a non-empty string")
        limit = self.max_prompt_bytes
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError(f"max_prompt_bytes must be an integer >= 0, got {limit!r}")

    def to_json(self) -> str:
        return json.dumps(
            [self.tier, self.replica_id, self.address, self.token, self.max_prompt_bytes]
        )

    @classmethod
    def from_json(cls, body: str) -> EngineEndpoint:
        """From to_json's list; fields a newer version appends are ignored (a rolling upgrade
        mixes versions), a record without the first four is refused."""
        fields = json.loads(body)
        if not isinstance(fields, list) or len(fields) < 4:
            raise ValueError(f"an engine endpoint record must be a list of >= 4 fields: {body!r}")
        return cls(*fields[:5])


@dataclass(frozen=True)
class PlanRecord:
    """One plan of a tier's expert autoscaler (cluster/expert_autoscaler.py), as published.

    mode: advisory | active; outcome: applied (published as `to_epoch`), advised (advisory:
    published here only), below_threshold (not worth a change), cooldown (too soon after the
    last change), scaled_down (cold replicas given back), failed (new shards did not start),
    rolled_back (a new controller found a change its predecessor had not published).
    placement: the planned layout (replica ids are planned shard positions until applied).
    """

    model: str
    mode: str
    outcome: str
    from_epoch: int
    to_epoch: int
    balancedness_before: float
    balancedness_after: float
    placement: Placement
    time_ms: int
    detail: str = ""

    def to_json(self) -> str:
        body = {
            "model": self.model, "mode": self.mode, "outcome": self.outcome,
            "from_epoch": self.from_epoch, "to_epoch": self.to_epoch,
            "balancedness_before": self.balancedness_before,
            "balancedness_after": self.balancedness_after,
            "placement": json.loads(self.placement.to_json()), "time_ms": self.time_ms,
            "detail": self.detail,
        }  # fmt: skip
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, body: str) -> PlanRecord:
        d = json.loads(body)
        p = d["placement"]
        placement = Placement(0, p["L"], p["E"], p["m"])
        return cls(
            d["model"], d["mode"], d["outcome"], int(d["from_epoch"]), int(d["to_epoch"]),
            float(d["balancedness_before"]), float(d["balancedness_after"]), placement,
            int(d["time_ms"]), d.get("detail", ""),
        )  # fmt: skip


def check_name(what: str, value: str) -> str:
    """`value` if it is a valid key segment (model, tier, cluster name), else ValueError naming `what`."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"{what} must match {NAME_RE.pattern}, got {value!r}")
    return value


def as_count_matrix(counts: Any, what: str = "counts") -> np.ndarray:
    """A torch tensor / numpy array / nested list of non-negative integers -> int64 [L, E]."""
    if hasattr(counts, "detach"):  # a torch tensor: no torch import needed here
        counts = counts.detach().cpu().numpy()
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{what} must be a non-empty [L, E] matrix, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    if (arr < 0).any():
        raise ValueError(f"{what} must be >= 0 everywhere")
    return arr.astype(np.int64, copy=False)
