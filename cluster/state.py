"""The Redis control plane of a moeray cluster (never touched per token).

`ClusterState` reads and writes the shared state under namespaced keys `moeray:{cluster}:...`:

| key | type | holds |
| --- | --- | --- |
| `placement:{model}` | hash {epoch, body} | the `Placement` of a model, body = compact JSON |
| `placement:{model}:announce` | pub/sub channel | new epoch numbers |
| `replicas:{model}` | set | ids of registered expert-shard replicas |
| `replica:{model}:{id}` | hash, TTL | one `ReplicaInfo`; expires unless heartbeated |
| `load:{model}:{window}` | hash "l,e" -> count, TTL | tokens routed per (layer, expert) in a window |
| `load_total:{model}` | hash "l,e" -> count | tokens routed per (layer, expert) ever (a counter) |
| `lease:{model}` | string, TTL | owner id of the one active autoscaler |
| `shards:{model}` | hash id -> actor name | the shard actors the tier's controller owns (no TTL) |
| `acks:{model}` | hash engine id -> epoch | the placement epoch each engine replica serves on |
| `plan:{model}` | string | the autoscaler's latest `PlanRecord` (JSON) |
| `plans:{model}` | hash "mode,outcome" -> count | plans made, by mode and outcome (a counter) |
| `engines:{wire}:{tier}` | set | replica ids of a tier's engine replicas (their endpoints) |
| `engine:{wire}:{tier}:{id}` | string, TTL | one `EngineEndpoint` (JSON, with its prompt limit); expires unless refreshed |

`{wire}` is the router <-> engine protocol (ENGINE_WIRE): routers only see engines they can talk
to, so during an upgrade that changes it (old and new RayClusters sharing one Redis namespace)
each generation's routers stream to that generation's engines.

Every multi-step update is one Lua script (atomic, one round trip). Placement epochs only grow:
`publish_placement` is a compare-and-set on the expected epoch, so two planners cannot both win.

Three background helpers (in `state_sync`, re-exported here) keep Redis off the hot path, each
on one daemon thread that `close()` stops in bounded time, none letting a Redis error escape:
- `PlacementWatcher`: caches the latest placement (pub/sub + cheap epoch poll); after Redis loses
  its memory it republishes the cached placement (`republish` never lowers an epoch).
- `LoadReporter`: sums [L, E] counts locally, pushes them every N steps; keeps them on errors.
- `Heartbeater`: refreshes a replica's TTL and re-registers it after a Redis restart.
- `EndpointAnnouncer`: keeps an engine replica's endpoint registered.
"""

from __future__ import annotations

import time
from typing import Any, cast
from urllib.parse import urlparse

import numpy as np
import redis
from moeray.cluster.config import StateConfig
from moeray.cluster.state_messages import (
    REPLICA_STATES,
    EngineEndpoint,
    Placement,
    PlanRecord,
    ReplicaInfo,
    ReplicaState,
    as_count_matrix,
    check_name,
)
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

# KEYS[1] placement hash; ARGV: expected epoch (-1 = any), body, channel -> {won, epoch}
#: The router <-> engine wire protocol of this release (workers/engine_service.py), part of the
#: engine endpoint keys. Change it with any change routers and engines must agree on.
ENGINE_WIRE = "zmq1"

_PUBLISH_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local expected = tonumber(ARGV[1])
if expected >= 0 and cur ~= expected then return {0, cur} end
local new = cur + 1
redis.call('HSET', KEYS[1], 'epoch', new, 'body', ARGV[2])
redis.call('PUBLISH', ARGV[3], new)
return {1, new}
"""
# Writes the placement under ITS OWN epoch only if Redis holds an older one (or none).
_REPUBLISH_LUA = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local e = tonumber(ARGV[1])
if cur >= e then return {0, cur} end
redis.call('HSET', KEYS[1], 'epoch', e, 'body', ARGV[2])
redis.call('PUBLISH', ARGV[3], e)
return {1, e}
"""
# KEYS[1] replica hash; ARGV: now_ms, ttl_ms. 0 = unknown replica (expired, or Redis restarted).
_HEARTBEAT_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'heartbeat_ms', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""
_SET_STATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1])
return 1
"""
# KEYS[1] replica-id set; ARGV[1] replica key prefix. Drops ids whose hash expired.
_LIST_REPLICAS_LUA = """
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local h = redis.call('HGETALL', ARGV[1] .. id)
  if #h == 0 then redis.call('SREM', KEYS[1], id) else table.insert(out, h) end
end
return out
"""
# KEYS[1] window hash, KEYS[2] all-time totals hash; ARGV: ttl_ms, then field, delta pairs.
_PUSH_LOAD_LUA = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return (#ARGV - 1) / 2
"""
_ACQUIRE_LUA = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class EpochConflict(RuntimeError):
    """publish_placement lost a compare-and-set: Redis holds `current_epoch`, not the expected one."""

    def __init__(self, model: str, expected: int, current: int) -> None:
        super().__init__(
            f"placement of {model!r} is at epoch {current}, not the expected {expected}; "
            "re-read it and plan again"
        )
        self.expected_epoch = expected
        self.current_epoch = current


def _check_url(redis_url: str) -> str:
    parsed = urlparse(redis_url) if isinstance(redis_url, str) else None
    ok = parsed is not None and (
        (parsed.scheme in ("redis", "rediss") and bool(parsed.hostname))
        or (parsed.scheme == "unix" and bool(parsed.path))
    )
    try:
        ok = ok and (parsed is None or parsed.port is None or parsed.port > 0)
    except ValueError:  # a port that is not a number
        ok = False
    if not ok:
        raise ValueError(f"redis_url must look like redis://host:port/db, got {redis_url!r}")
    return redis_url


class ClusterState:
    """Typed access to the Redis state of one moeray cluster (thread-safe; one client pool).

    Every method is one network round trip (a Lua script, a pipeline or a single command) and
    raises redis.RedisError (ConnectionError, TimeoutError) when Redis is unreachable; the
    background helpers below catch those, direct callers decide.
    """

    def __init__(
        self,
        redis_url: str,
        cluster: str = "default",
        *,
        heartbeat_ttl_s: float = 10.0,
        load_window_s: float = 10.0,
        load_windows_kept: int = 12,
        socket_timeout_s: float = 2.0,
        retries: int = 1,
    ) -> None:
        self.redis_url = _check_url(redis_url)
        self.cluster = check_name("cluster", cluster)
        for name, v in (("heartbeat_ttl_s", heartbeat_ttl_s), ("load_window_s", load_window_s)):
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        if load_windows_kept < 1:
            raise ValueError(f"load_windows_kept must be >= 1, got {load_windows_kept}")
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.load_window_s = load_window_s
        self.load_windows_kept = load_windows_kept
        # Few, short retries: the background helpers have their own capped backoff, and a
        # caller must learn quickly that Redis is gone rather than hang.
        self.client: redis.Redis = redis.Redis.from_url(
            redis_url,
            decode_responses=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries),
        )
        reg = self.client.register_script
        self._publish, self._republish = reg(_PUBLISH_LUA), reg(_REPUBLISH_LUA)
        self._heartbeat, self._set_state = reg(_HEARTBEAT_LUA), reg(_SET_STATE_LUA)
        self._list_replicas, self._push_load = reg(_LIST_REPLICAS_LUA), reg(_PUSH_LOAD_LUA)
        self._acquire, self._renew = reg(_ACQUIRE_LUA), reg(_RENEW_LUA)
        self._release = reg(_RELEASE_LUA)

    @classmethod
    def from_config(cls, cfg: StateConfig, redis_url: str) -> ClusterState:
        """From a `moeray.cluster.config.StateConfig` and the URL actually in use."""
        return cls(
            redis_url,
            cfg.cluster,
            heartbeat_ttl_s=cfg.heartbeat_ttl_s,
            load_window_s=cfg.load_window_s,
        )

    def key(self, *parts: object) -> str:
        return ":".join(("moeray", self.cluster, *(str(p) for p in parts)))

    def ping(self) -> bool:
        """True when Redis answers; never raises."""
        try:
            return bool(self.client.ping())
        except (redis.RedisError, OSError):
            return False

    def close(self) -> None:
        self.client.close()

    # ---- placement -------------------------------------------------------------------------

    def placement_channel(self, model: str) -> str:
        return self.key("placement", check_name("model", model), "announce")

    def publish_placement(
        self, model: str, placement: Placement, expected_epoch: int | None = None
    ) -> Placement:
        """Atomically stores `placement` under the next epoch and announces it.

        expected_epoch: the epoch the caller planned from (0 = none published yet); if Redis
        holds another one, raises EpochConflict and writes nothing. None = unconditional.
        Returns the placement with its new epoch (placement.epoch itself is ignored).
        """
        if not isinstance(placement, Placement):
            raise ValueError(f"placement must be a Placement, got {type(placement).__name__}")
        if expected_epoch is not None and expected_epoch < 0:
            raise ValueError(f"expected_epoch must be >= 0 or None, got {expected_epoch}")
        exp = -1 if expected_epoch is None else expected_epoch
        key, channel = self.key("placement", model), self.placement_channel(model)
        won, epoch = self._publish(keys=[key], args=[exp, placement.to_json(), channel])
        if not won:
            raise EpochConflict(model, exp, int(epoch))
        return placement.with_epoch(int(epoch))

    def republish(self, model: str, placement: Placement) -> int:
        """Restores `placement` under its own epoch if Redis holds an older one or none (after a
        Redis restart). Never lowers the epoch; idempotent. Returns the epoch Redis now holds."""
        if placement.epoch < 1:
            raise ValueError(f"placement.epoch must be >= 1 to republish, got {placement.epoch}")
        key, channel = self.key("placement", model), self.placement_channel(model)
        _won, epoch = self._republish(
            keys=[key], args=[placement.epoch, placement.to_json(), channel]
        )
        return int(epoch)

    def read_placement(self, model: str) -> Placement | None:
        """The current placement with its epoch (one round trip), or None if none is stored."""
        epoch, body = self.client.hmget(
            self.key("placement", check_name("model", model)), ["epoch", "body"]
        )
        if epoch is None or body is None:
            return None
        return Placement.from_json(body, int(epoch))

    def read_epoch(self, model: str) -> int:
        """The current epoch only (the cheap poll); 0 when no placement is stored."""
        epoch = self.client.hget(self.key("placement", check_name("model", model)), "epoch")
        return int(epoch) if epoch is not None else 0

    # ---- replicas --------------------------------------------------------------------------

    def _replica_key(self, model: str, replica_id: int) -> str:
        return self.key("replica", check_name("model", model), int(replica_id))

    def register_replica(self, model: str, info: ReplicaInfo, ttl_s: float | None = None) -> None:
        """Writes `info` with a fresh heartbeat and a TTL (default heartbeat_ttl_s)."""
        ttl_ms = int((ttl_s or self.heartbeat_ttl_s) * 1000)
        key = self._replica_key(model, info.replica_id)
        fields = {**info.to_fields(), "heartbeat_ms": str(int(time.time() * 1000))}
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]  # redis-py's key type is invariant
        pipe.pexpire(key, ttl_ms)
        pipe.sadd(self.key("replicas", model), info.replica_id)
        pipe.execute()

    def heartbeat(self, model: str, replica_id: int, ttl_s: float | None = None) -> bool:
        """Refreshes the replica's TTL. False when Redis no longer knows it: register again."""
        ttl_ms = int((ttl_s or self.heartbeat_ttl_s) * 1000)
        now_ms = int(time.time() * 1000)
        return bool(
            self._heartbeat(keys=[self._replica_key(model, replica_id)], args=[now_ms, ttl_ms])
        )

    def set_replica_state(self, model: str, replica_id: int, state: ReplicaState) -> bool:
        """Changes the state (TTL kept); False when the replica is unknown."""
        if state not in REPLICA_STATES:
            raise ValueError(f"state must be one of {REPLICA_STATES}, got {state!r}")
        return bool(self._set_state(keys=[self._replica_key(model, replica_id)], args=[state]))

    def mark_dead(self, model: str, replica_id: int) -> bool:
        """Marks a replica dead (it leaves live_replicas now, and Redis when its TTL ends)."""
        return self.set_replica_state(model, replica_id, "dead")

    def remove_replica(self, model: str, replica_id: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._replica_key(model, replica_id))
        pipe.srem(self.key("replicas", model), int(replica_id))
        pipe.execute()

    def replicas(self, model: str) -> list[ReplicaInfo]:
        """Every replica whose heartbeat has not expired (any state), by id."""
        rows = self._list_replicas(
            keys=[self.key("replicas", check_name("model", model))],
            args=[self.key("replica", model) + ":"],
        )
        infos = [ReplicaInfo.from_fields(dict(zip(r[::2], r[1::2]))) for r in rows]
        return sorted(infos, key=lambda i: i.replica_id)

    def live_replicas(self, model: str) -> list[ReplicaInfo]:
        """Replicas with an unexpired heartbeat that are not marked dead, by id."""
        return [i for i in self.replicas(model) if i.state != "dead"]

    # ---- engine endpoints ------------------------------------------------------------------

    def register_engine(self, ep: EngineEndpoint, ttl_s: float | None = None) -> None:
        """Writes (or refreshes) an engine replica's endpoint with a TTL (default heartbeat_ttl_s)."""
        ttl_ms = int((ttl_s or self.heartbeat_ttl_s) * 1000)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.key("engine", ENGINE_WIRE, ep.tier, ep.replica_id), ep.to_json(), px=ttl_ms)
        pipe.sadd(self.key("engines", ENGINE_WIRE, ep.tier), ep.replica_id)
        pipe.execute()

    def remove_engine(self, tier: str, replica_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.key("engine", ENGINE_WIRE, check_name("tier", tier), replica_id))
        pipe.srem(self.key("engines", ENGINE_WIRE, tier), replica_id)
        pipe.execute()

    def engine_endpoints(self, tier: str) -> list[EngineEndpoint]:
        """The tier's engine endpoints whose TTL has not run out, by replica id (expired ones are
        dropped from the set). Two round trips."""
        members = self.key("engines", ENGINE_WIRE, check_name("tier", tier))
        ids = sorted(cast("set[str]", self.client.smembers(members)))
        if not ids:
            return []
        bodies = cast(
            "list[str | None]",
            self.client.mget([self.key("engine", ENGINE_WIRE, tier, i) for i in ids]),
        )
        expired = [i for i, b in zip(ids, bodies) if b is None]
        if expired:
            self.client.srem(members, *expired)
        return [EngineEndpoint.from_json(b) for b in bodies if b is not None]

    # ---- load ------------------------------------------------------------------------------

    def window(self, now: float | None = None) -> int:
        """The load window index of wall-clock time `now` (default: now)."""
        return int((time.time() if now is None else now) // self.load_window_s)

    def push_load(self, model: str, counts: Any, now: float | None = None) -> int:
        """Adds a [L, E] token-count matrix to the current window in ONE round trip.

        Only nonzero cells travel. The window expires load_windows_kept windows after its last
        write. Returns the number of cells sent.
        """
        arr = as_count_matrix(counts)
        layers, experts = np.nonzero(arr)
        if layers.size == 0:
            return 0
        args: list[str | int] = [int(self.load_window_s * self.load_windows_kept * 1000)]
        for li, e in zip(layers.tolist(), experts.tolist()):
            args += [f"{li},{e}", int(arr[li, e])]
        key = self.key("load", check_name("model", model), self.window(now))
        total = self.key("load_total", model)
        return int(self._push_load(keys=[key, total], args=args))

    def read_load(
        self,
        model: str,
        num_layers: int,
        num_experts: int,
        num_windows: int = 6,
        now: float | None = None,
    ) -> np.ndarray:
        """Tokens per (layer, expert) summed over the current and previous windows -> int64 [L, E]."""
        if num_layers < 1 or num_experts < 1:
            raise ValueError(
                f"num_layers and num_experts must be >= 1, got {num_layers}, {num_experts}"
            )
        if not 1 <= num_windows <= self.load_windows_kept:
            raise ValueError(
                f"num_windows must be in 1..{self.load_windows_kept} (load_windows_kept), "
                f"got {num_windows}"
            )
        w = self.window(now)
        pipe = self.client.pipeline(transaction=False)
        for i in range(num_windows):
            pipe.hgetall(self.key("load", check_name("model", model), w - i))
        out = np.zeros((num_layers, num_experts), dtype=np.int64)
        for fields in pipe.execute():
            for cell, count in fields.items():
                li, e = (int(x) for x in cell.split(","))
                if li >= num_layers or e >= num_experts:
                    raise ValueError(
                        f"load of model {model!r} has cell ({li}, {e}) outside "
                        f"[num_layers={num_layers}, num_experts={num_experts}]"
                    )
                out[li, e] += int(count)
        return out

    def read_load_total(self, model: str, num_layers: int, num_experts: int) -> np.ndarray:
        """Tokens per (layer, expert) ever pushed (a monotonic counter until Redis loses its
        memory) -> int64 [L, E]."""
        if num_layers < 1 or num_experts < 1:
            raise ValueError(
                f"num_layers and num_experts must be >= 1, got {num_layers}, {num_experts}"
            )
        fields = self.client.hgetall(self.key("load_total", check_name("model", model)))
        out = np.zeros((num_layers, num_experts), dtype=np.int64)
        for cell, count in cast(dict[str, str], fields).items():
            li, e = (int(x) for x in cell.split(","))
            if li < num_layers and e < num_experts:
                out[li, e] = int(count)
        return out

    # ---- leases ----------------------------------------------------------------------------

    def _lease_args(
        self, model: str, owner: str, ttl_s: float
    ) -> tuple[list[str], list[str | int]]:
        if not owner:
            raise ValueError("owner must be a non-empty string")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        return [self.key("lease", check_name("model", model))], [owner, int(ttl_s * 1000)]

    def acquire_lease(self, model: str, owner: str, ttl_s: float) -> bool:
        """Takes the model's lease (SET NX PX) or extends it if `owner` already holds it."""
        keys, args = self._lease_args(model, owner, ttl_s)
        return bool(self._acquire(keys=keys, args=args))

    def renew_lease(self, model: str, owner: str, ttl_s: float) -> bool:
        """Extends the lease only if `owner` holds it."""
        keys, args = self._lease_args(model, owner, ttl_s)
        return bool(self._renew(keys=keys, args=args))

    def release_lease(self, model: str, owner: str) -> bool:
        """Drops the lease only if `owner` holds it."""
        keys, args = self._lease_args(model, owner, 1.0)
        return bool(self._release(keys=keys, args=args[:1]))

    def lease_owner(self, model: str) -> str | None:
        owner = self.client.get(self.key("lease", check_name("model", model)))
        return str(owner) if owner is not None else None

    # ---- the expert controller's records ---------------------------------------------------

    def set_shard(self, model: str, replica_id: int, actor_name: str) -> None:
        """Records that the tier's controller owns shard actor `actor_name` as `replica_id`
        (written BEFORE the actor is created, so a successor finds every actor it may own)."""
        self.client.hset(
            self.key("shards", check_name("model", model)), int(replica_id), actor_name
        )

    def remove_shard(self, model: str, replica_id: int) -> None:
        self.client.hdel(self.key("shards", check_name("model", model)), str(int(replica_id)))

    def shard_directory(self, model: str) -> dict[int, str]:
        """Replica id -> actor name of every shard actor the tier's controller owns."""
        raw = cast(
            dict[str, str], self.client.hgetall(self.key("shards", check_name("model", model)))
        )
        return {int(k): v for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}

    def ack_epoch(self, model: str, engine_id: str, epoch: int) -> None:
        """An engine replica says it now dispatches on placement `epoch` (and no older one)."""
        self.client.hset(self.key("acks", check_name("model", model)), engine_id, int(epoch))

    def remove_ack(self, model: str, engine_id: str) -> None:
        self.client.hdel(self.key("acks", check_name("model", model)), engine_id)

    def read_acks(self, model: str) -> dict[str, int]:
        """Engine replica id -> the epoch it acknowledged."""
        raw = cast(
            dict[str, str], self.client.hgetall(self.key("acks", check_name("model", model)))
        )
        return {k: int(v) for k, v in raw.items()}

    def write_plan(self, record: PlanRecord) -> None:
        """Stores the autoscaler's latest plan and counts it under (mode, outcome), atomically."""
        model = check_name("model", record.model)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.key("plan", model), record.to_json())
        pipe.hincrby(self.key("plans", model), f"{record.mode},{record.outcome}", 1)
        pipe.execute()

    def read_plan(self, model: str) -> PlanRecord | None:
        body = self.client.get(self.key("plan", check_name("model", model)))
        return PlanRecord.from_json(str(body)) if body is not None else None

    def read_plan_counts(self, model: str) -> dict[tuple[str, str], int]:
        """(mode, outcome) -> plans counted since the cluster's Redis started."""
        raw = cast(
            dict[str, str], self.client.hgetall(self.key("plans", check_name("model", model)))
        )
        out: dict[tuple[str, str], int] = {}
        for field, n in raw.items():
            mode, _, outcome = field.partition(",")
            out[(mode, outcome)] = int(n)
        return out


# The background helpers live in state_sync; re-exported so `moeray.cluster.state` is the one
# import an engine or shard needs.
from moeray.cluster.state_sync import (  # noqa: E402
    EndpointAnnouncer,
    EngineRegistry,
    Heartbeater,
    LoadReporter,
    PlacementWatcher,
)

__all__ = [
    "ClusterState",
    "EndpointAnnouncer",
    "EngineRegistry",
    "EpochConflict",
    "Heartbeater",
    "LoadReporter",
    "PlacementWatcher",
    "as_count_matrix",
]
