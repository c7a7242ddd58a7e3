"""Prefix-aware routing: which engine replica most likely holds a request's prompt prefix in its KV
cache, kept approximately in the router (as SGLang's router keeps an approximate radix tree).

The router holds no tokenizer, so prefixes are keyed on what it sees: the prompt text (or the
chat turns, serialized with their roles) in chunks of CHUNK_CHARS characters, or prompt token ids
in chunks of CHUNK_IDS. Chunk i's key hashes chunk i and the key of chunk i-1, so equal keys mean
equal prefixes (up to a 128-bit hash). After routing a request, the router records its keys as
held by the replica it chose; a later request that shares a prefix walks its keys and finds the
replica that served the longest shared prefix. The view is bounded (LRU over `capacity` keys) and
forgets a replica that leaves, so it costs no Redis traffic and no engine round trip. Engines may
have evicted a prefix since; then the request simply prefills it again (tokens never depend on
where a request runs).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection

from moeray.workers.io_struct import GenerateRequest

CHUNK_CHARS = 64
CHUNK_IDS = 16
#: Chunks of a prompt looked at (long documents: only their head decides).
MAX_CHUNKS = 256


def prefix_keys(request: GenerateRequest) -> list[bytes]:
    """Chained keys of the request's full prompt chunks (a partial last chunk has none)."""
    if request.prompt_token_ids is not None:
        ids = request.prompt_token_ids[: CHUNK_IDS * MAX_CHUNKS]
        chunks = [
            b"".join(t.to_bytes(4, "little") for t in ids[i : i + CHUNK_IDS])
            for i in range(0, len(ids) - CHUNK_IDS + 1, CHUNK_IDS)
        ]
    else:
        if request.messages is not None:
            text = "".join(f"\x1e{m.role}\x1f{m.content}" for m in request.messages)
        else:
            text = request.prompt or ""
        text = text[: CHUNK_CHARS * MAX_CHUNKS]
        chunks = [
            text[i : i + CHUNK_CHARS].encode("utf-8", "surrogatepass")
            for i in range(0, len(text) - CHUNK_CHARS + 1, CHUNK_CHARS)
        ]
    keys, parent = [], b"moeray-prefix"
    for chunk in chunks:
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        keys.append(parent)
    return keys


class PrefixAffinity:
    """key -> the replica id that last served a request with that prefix (LRU, bounded)."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def match(self, keys: list[bytes], replicas: Collection[str]) -> tuple[str | None, int]:
        """(the replica among `replicas` that holds the longest prefix of keys, its length in
        chunks); (None, 0) when no replica holds even the first chunk."""
        best, depth = None, 0
        for i, key in enumerate(keys):
            owner = self._owner.get(key)
            if owner is None:
                break
            if owner in replicas:
                best, depth = owner, i + 1
        return best, depth

    def record(self, keys: list[bytes], replica_id: str) -> None:
        """The replica now holds these prefixes (the most recent use moves them to the end)."""
        for key in keys:
            self._owner[key] = replica_id
            self._owner.move_to_end(key)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        """Drops every key held by a replica that left."""
        for key in [k for k, r in self._owner.items() if r == replica_id]:
            del self._owner[key]
