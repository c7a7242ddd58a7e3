"""`moeray serve`, `moeray chat` and `moeray route`: the front door from the command line.

- `serve --config FILE | --demo [--grpc-port N] [--http-port N] [--host H] [--ray-address A]`:
  runs the whole stack (private redis-server unless state.redis_url is set, a local Ray instance
  unless --ray-address names a cluster to join, Serve with the moeray app),
  prints the endpoints and blocks until Ctrl-C / SIGTERM, then shuts everything down.
  `--demo` builds two small Mixtral-style checkpoints in HF format into ./.demo/ on first run
  (2 layers for the fast tier, 4 for the reasoning tier).
- `chat [--prompt TEXT] [--tier T]`: streams a chat over gRPC (interactive without --prompt).
- `route --prompt TEXT`: prints the router's decision as JSON (a dry run, nothing generated).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

DEMO_DIR = Path(".demo")


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the gRPC + OpenAI HTTP front door on a local Ray")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="YAML config file (see examples/local.yaml)")
    src.add_argument("--demo", action="store_true", help="serve two small demo MoE checkpoints")
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--host", default=None)
    p.add_argument(
        "--router-replicas",
        type=int,
        default=None,
        help="serve.router_replicas: router replicas, one per node at most",
    )
    p.add_argument(
        "--router-resource",
        default=None,
        help="serve.router_resource: custom Ray resource a router's node advertises",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="set any config field, e.g. --set tiers.0.experts.autoscale=active "
        "--set tiers.0.engine.replicas=2 (repeatable)",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    p.add_argument(
        "--ray-address",
        default=None,
        help="join this existing Ray cluster (e.g. auto or HOST:6379) instead of "
        "starting a local instance",
    )
    p.add_argument(
        "--exit-after-demo",
        action="store_true",
        help="with --demo: stop after the demo requests instead of serving until Ctrl-C",
    )
    p.set_defaults(func=_serve)

    for name, helptext in (("chat", "chat with the server over gRPC"),
                           ("route", "print the router's decision for a prompt")):  # fmt: skip
        q = sub.add_parser(name, help=helptext)
        q.add_argument("--address", default="127.0.0.1:50051", help="gRPC host:port")
        q.add_argument("--prompt", required=name == "route")
        q.add_argument("--tier", default="auto")
        if name == "chat":
            q.add_argument("--max-tokens", type=int, default=64)
            q.add_argument("--temperature", type=float, default=0.0)
        q.set_defaults(func=_chat if name == "chat" else _route)


# ---- serve -----------------------------------------------------------------------------------


def demo_config(root: Path = DEMO_DIR) -> Any:
    """Two demo tiers, built on first use: fast = 2 MoE layers, reasoning = 4 MoE layers."""
    from moeray.cluster.config import MoerayConfig
    from moeray.cluster.demo_model import build_demo_checkpoint

    paths = {"fast": root / "fast-2l", "reasoning": root / "reasoning-4l"}
    for tier, path in paths.items():
        if not (path / "config.json").is_file():
            print(f"building the {tier} demo checkpoint in {path} ...", flush=True)
            build_demo_checkpoint(
                path, preset="tiny", seed=0 if tier == "fast" else 1,
                num_layers=2 if tier == "fast" else 4,
            )  # fmt: skip
    return MoerayConfig(
        tiers=[
            {"name": "fast", "model": str(paths["fast"].resolve()),
             "description": "2-layer Mixtral-style demo model"},
            {"name": "reasoning", "model": str(paths["reasoning"].resolve()),
             "description": "4-layer Mixtral-style demo model"},
        ]
    )  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    from moeray.cluster.app import LocalStack
    from moeray.cluster.config import config_set, config_with, load_config

    config = demo_config() if args.demo else load_config(args.config)
    overrides = {k: v for k, v in (("grpc_port", args.grpc_port), ("http_port", args.http_port),
                                   ("host", args.host), ("router_replicas", args.router_replicas),
                                   ("router_resource", args.router_resource))
                 if v is not None}  # fmt: skip
    if overrides:
        config = config_with(config, "serve", overrides)
    if args.set:
        config = config_set(config, args.set)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stack = LocalStack(config, num_cpus=args.num_cpus, ray_address=args.ray_address)
    try:
        stack.start()
        ends = stack.endpoints()
        print(f"moeray is serving {', '.join(t.name for t in config.tiers)}\n"
              f"  gRPC   {ends['grpc']}  (moeray.v1.Inference, grpc.health.v1.Health, reflection)\n"
              f"  HTTP   {ends['http']}  (OpenAI API; /health, /metrics)\n"
              f"  redis  {ends['redis']}", flush=True)  # fmt: skip
        if args.demo:
            _demo_requests(ends["grpc"])
            if args.exit_after_demo:
                return 0
        print("Ctrl-C to stop.", flush=True)
        stop.wait()
    finally:
        print("shutting down ...", flush=True)
        stack.close()
    return 0


DEMO_PROMPTS = (
    "Hi! How are you today?",
    "Prove step by step that the sum of two even integers is even, then compute 17 * 23.",
)


def _demo_requests(grpc_target: str) -> None:
    """Sends the demo prompts through the front door (gRPC, tier "auto") and streams the answers,
    showing which tier the query router chose and why. The demo models are random-weight
    checkpoints, so the words are gibberish; the routing, streaming and usage are real."""
    from moeray.router.client import MoerayClient

    with MoerayClient(grpc_target, timeout=120) as client:
        for prompt in DEMO_PROMPTS:
            print(f"\n>>> {prompt}", flush=True)
            usage = None
            for delta in client.generate(prompt, max_tokens=24, temperature=0.0):
                if delta.route is not None:
                    print(f"[routed to {delta.route.tier}: {delta.route.reason}]", flush=True)
                print(delta.text, end="", flush=True)
                usage = delta.usage
            if usage is not None:
                print(
                    f"\n[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]"
                )
    print(flush=True)


# ---- chat / route ----------------------------------------------------------------------------


def _chat(args: argparse.Namespace) -> int:
    import grpc
    from moeray.v1 import inference_pb2 as pb
    from moeray.v1 import inference_pb2_grpc as pb_grpc

    history: list[Any] = []
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        prompts = [args.prompt] if args.prompt else _interactive()
        for text in prompts:
            history.append(pb.ChatMessage(role="user", content=text))
            req = pb.GenerateRequest(
                messages=pb.ChatMessages(messages=history), tier=args.tier,
                sampling=pb.SamplingParams(max_tokens=args.max_tokens,
                                           temperature=args.temperature),
            )  # fmt: skip
            reply = []
            try:
                for msg in stub.Generate(req):
                    if msg.HasField("route"):
                        print(f"[{msg.route.tier}: {msg.route.reason}]", file=sys.stderr)
                    reply.append(msg.text)
                    print(msg.text, end="", flush=True)
            except grpc.RpcError as e:
                raise ValueError(f"{e.code().name}: {e.details()}") from None
            print()
            history.append(pb.ChatMessage(role="assistant", content="".join(reply)))
    return 0


def _interactive() -> Any:
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if line.strip():
            yield line


def _route(args: argparse.Namespace) -> int:
    import grpc
    from moeray.v1 import inference_pb2 as pb
    from moeray.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            r = pb_grpc.InferenceStub(channel).Route(
                pb.RouteRequest(prompt=args.prompt, tier=args.tier), timeout=30
            )
        except grpc.RpcError as e:
            raise ValueError(f"{e.code().name}: {e.details()}") from None
    decision = {"tier": r.route.tier, "score": round(r.route.score, 4), "reason": r.route.reason,
                "fallback": r.route.fallback, "features": dict(r.features)}  # fmt: skip
    print(json.dumps(decision, indent=2))
    return 0
