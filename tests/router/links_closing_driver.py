"""Run as a process of its own by tests/router/test_engine_links.py: rounds of one engine link
each (a bare ROUTER peer in another ZeroMQ context, as an engine replica's end), the peer gone
and the client closed at once; exits 1 when a later link can no longer connect.

    python -m tests.router.links_closing_driver ROUNDS
"""

from __future__ import annotations

import asyncio
import sys

import zmq
from moeray.router.engine_links import EngineCallError, EngineClient
from moeray.workers.engine_service import configure


async def one_round(ctx: zmq.Context[zmq.Socket[bytes]]) -> str:
    peer = ctx.socket(zmq.ROUTER)
    configure(peer)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    client = EngineClient("gone", f"127.0.0.1:{port}", "t")
    try:
        await client._connected(5.0)
        return ""
    except EngineCallError as e:
        return str(e)
    finally:
        peer.close(linger=0)  # the engine replica goes away: its link reports the drop
        await client.close()


def main() -> int:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for i in range(int(sys.argv[1])):
            failed = asyncio.run(one_round(ctx))
            if failed:
                print(f"round {i}: {failed}", flush=True)
                return 1
        return 0
    finally:
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
