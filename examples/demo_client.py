"""Talks to a running `moeray serve` over both front doors: gRPC (streaming) and OpenAI HTTP.

moeray serve --demo            # in one terminal
python examples/demo_client.py # in another
"""

from __future__ import annotations

import argparse

import grpc
import openai
from moeray.v1 import inference_pb2 as pb
from moeray.v1 import inference_pb2_grpc as pb_grpc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grpc", default="127.0.0.1:50051")
    ap.add_argument("--http", default="http://127.0.0.1:8000/v1")
    args = ap.parse_args()

    with grpc.insecure_channel(args.grpc) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for prompt in ("Hi! Translate 'cat' into French.",
                       "Prove step by step that there are infinitely many primes."):  # fmt: skip
            req = pb.GenerateRequest(
                prompt=prompt, sampling=pb.SamplingParams(max_tokens=24, temperature=0)
            )
            for msg in stub.Generate(req, timeout=120):
                if msg.HasField("route"):
                    print(f"\n[{msg.route.tier}, score {msg.route.score:.2f}] {prompt}")
                print(msg.text, end="", flush=True)
        print()

    client = openai.OpenAI(base_url=args.http, api_key="unused")
    print("models:", [m.id for m in client.models.list()])
    stream = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "What is a mixture of experts?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
