"""What an engine replica of a tier asks Ray for: a pure function of the tier's config.

`engine_actor_options(tier)` gives the `ray_actor_options` of a tier's engine deployment:
the CPUs and GPUs of `tiers[].num_cpus` / `num_gpus`, and a `runtime_env` whose environment
variables size torch's thread pools and, for a tier with expert shards, stop idle OpenMP
workers from spinning (`workers/cpu_tuning.cpu_process_env`): those must be set before the replica's process imports
torch, which only its creator can do. Whatever else the app puts in the runtime_env (e.g.
logging setup) is merged by the caller.
"""

from __future__ import annotations

import math
import os
from typing import Any

from moeray.cluster.config import TierConfig
from moeray.workers.cpu_tuning import cpu_process_env


def engine_threads(tier: TierConfig) -> int:
    """torch intra-op threads of one engine replica: its whole reserved CPUs; with none
    reserved (num_cpus 0, the laptop default), every core of the machine.

    FOOTGUN: without this, Ray gives a zero-CPU actor OMP_NUM_THREADS=1, one torch thread."""
    if tier.num_cpus >= 1:
        return math.floor(tier.num_cpus)
    return os.cpu_count() or 1


def engine_actor_options(tier: TierConfig) -> dict[str, Any]:
    """Ray actor options of one engine replica of `tier`: num_cpus, num_gpus, the tier's custom
    resource (one unit: one replica per unit a node advertises), runtime_env."""
    options: dict[str, Any] = {
        "num_cpus": tier.num_cpus,
        "num_gpus": tier.num_gpus,
        "runtime_env": {
            # an engine with expert shards waits on them every layer: no spinning meanwhile
            "env_vars": cpu_process_env(
                engine_threads(tier), waits_on_peers=tier.experts.shards > 0
            )
        },
    }
    if tier.resource:
        options["resources"] = {tier.resource: 1}
    return options
