"""--set PATH=VALUE reaches every config field (the CLI's side of the one-to-one mapping), and a
bad path or value is one error naming it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from moeray.cluster.config import ConfigError, MoerayConfig, config_set

BASE = MoerayConfig(tiers=[{"name": "fast", "model": "/m"}, {"name": "reasoning", "model": "/r"}])


def test_sets_nested_fields_lists_and_flow_values() -> None:
    cfg = config_set(BASE, [
        "tiers.1.experts.autoscale=active", "tiers.0.engine.autoscaling.enabled=true",
        "router.prefix_routing=false", "serve.router_resource=moeray_router",
        "tiers.0.engine.max_model_len=2048", "state.redis_url=redis://h:1/0",
        "tiers.1.experts.shards=2",
    ])  # fmt: skip
    assert cfg.tiers[1].experts.autoscale == "active" and cfg.tiers[1].experts.shards == 2
    assert cfg.tiers[0].engine.autoscaling.enabled and cfg.tiers[0].engine.max_model_len == 2048
    assert not cfg.router.prefix_routing and cfg.serve.router_resource == "moeray_router"
    assert cfg.state.redis_url == "redis://h:1/0"
    assert BASE.router.prefix_routing  # the original is untouched


@pytest.mark.parametrize(
    ("assignment", "named"),
    [
        ("router.nope=1", "router.nope is not a config field"),
        ("tiers.5.dtype=auto", "tiers.5 is not an index"),
        ("serve.grpc_port", "expected PATH=VALUE"),
        ("serve.grpc_port=99999", "serve.grpc_port"),
        ("tiers.0.experts.autoscale=sometimes", "tiers.0.experts.autoscale"),
        ("router.threshold=[1", "router.threshold: the value is not valid YAML"),
    ],
)
def test_bad_assignments_name_the_path(assignment: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace("[", r"\[")):
        config_set(BASE, [assignment])


def test_serve_cli_refuses_a_bad_set_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tiers: [{name: fast, model: /m}]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "moeray.cluster.cli", "serve", "--config", str(cfg),
         "--set", "router.bogus=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("router.bogus is not a config field")
