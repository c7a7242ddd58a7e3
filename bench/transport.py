"""Router <-> engine transport candidates, measured the same way: grpc.aio vs ZeroMQ (pyzmq).

What issue 9 asks to choose by measurement: an internal grpc.aio service or pyzmq + msgspec (as
vLLM's V1 engine core). A server process answers each request with M msgspec-encoded deltas
(grpc.aio: a unary-stream call; ZeroMQ: a ROUTER socket answering a DEALER, the shape
workers/engine_service.py uses); the client sends N sequential requests and reports the round
trip p50 / p99 and both processes' CPU time per request (from /proc). Bodies are the same msgspec
structs in both, so only the transport differs. Prints one JSON object per line.

    python bench/transport.py --requests 2000 --deltas 1 64 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import time
from typing import Any

import msgspec

WARMUP = 200


class Req(msgspec.Struct):
    call: int
    prompt: str
    deltas: int


class Delta(msgspec.Struct):
    call: int
    token_ids: list[int]
    text: str
    finish_reason: str | None


encode = msgspec.msgpack.Encoder().encode
decode_req = msgspec.msgpack.Decoder(Req).decode
decode_delta = msgspec.msgpack.Decoder(Delta).decode


def _deltas(req: Req) -> list[Delta]:
    last = req.deltas - 1
    return [Delta(req.call, [7], "tok", "length" if i == last else None) for i in range(req.deltas)]


def _grpc_server(port: int, ready: Any) -> None:
    import grpc

    async def generate(req: Req, _: Any) -> Any:
        for d in _deltas(req):
            yield d

    async def main() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=decode_req, response_serializer=encode
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Engine", {"Generate": handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(main())


def _zmq_server(port: int, ready: Any) -> None:
    import zmq
    import zmq.asyncio

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(f"tcp://127.0.0.1:{port}")
        ready.set()
        while True:
            peer, body = await sock.recv_multipart()
            for d in _deltas(decode_req(body)):
                await sock.send_multipart([peer, encode(d)])

    asyncio.run(main())


async def _grpc_client(port: int, n: int, deltas: int) -> list[float]:
    import grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_stream(
        "/bench.Engine/Generate", request_serializer=encode, response_deserializer=decode_delta
    )
    times = []
    for i in range(n + WARMUP):
        start = time.perf_counter()
        got = [d async for d in call(Req(i, "hello world", deltas), timeout=10)]
        assert len(got) == deltas and got[-1].finish_reason == "length"
        times.append(time.perf_counter() - start)
    await channel.close()
    return times[WARMUP:]


async def _zmq_client(port: int, n: int, deltas: int) -> list[float]:
    import zmq
    import zmq.asyncio

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    calls: dict[int, asyncio.Queue[Delta]] = {}

    async def read() -> None:
        while True:
            d = decode_delta(await sock.recv())
            calls[d.call].put_nowait(d)

    reader = asyncio.create_task(read())
    times = []
    for i in range(n + WARMUP):
        start = time.perf_counter()
        queue = calls[i] = asyncio.Queue()
        await sock.send(encode(Req(i, "hello world", deltas)))
        got = [await queue.get()]
        while got[-1].finish_reason is None:
            got.append(await queue.get())
        del calls[i]
        assert len(got) == deltas
        times.append(time.perf_counter() - start)
    reader.cancel()
    ctx.destroy(linger=0)
    return times[WARMUP:]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(transport: str, n: int, deltas: int) -> dict[str, Any]:
    port, ready = _free_port(), mp.Event()
    target = _grpc_server if transport == "grpc.aio" else _zmq_server
    server = mp.Process(target=target, args=(port, ready), daemon=True)
    server.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"the {transport} server did not start")
        client = _grpc_client if transport == "grpc.aio" else _zmq_client
        server_cpu, client_cpu = _cpu_s(server.pid or 0), time.process_time()
        times = sorted(asyncio.run(asyncio.wait_for(client(port, n, deltas), 600)))
        client_cpu = time.process_time() - client_cpu
        server_cpu = _cpu_s(server.pid or 0) - server_cpu
    finally:
        server.kill()
        server.join(10)
    per = 1e3 / (n + WARMUP)
    return {
        "transport": transport,
        "deltas": deltas,
        "requests": n,
        "p50_ms": round(times[len(times) // 2] * 1e3, 3),
        "p99_ms": round(times[int(0.99 * (len(times) - 1))] * 1e3, 3),
        "client_cpu_ms": round(client_cpu * per, 3),
        "server_cpu_ms": round(server_cpu * per, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--deltas", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    machine = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    for rnd in range(args.rounds):
        for deltas in args.deltas:
            n = max(50, args.requests // deltas)
            for transport in ("grpc.aio", "zmq"):
                print(
                    json.dumps({"round": rnd, **run(transport, n, deltas), **machine}), flush=True
                )


if __name__ == "__main__":
    main()
