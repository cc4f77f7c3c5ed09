"""The prefix cache: KV of complete prompt chunks, reused by later prompts that start the same way.

    PrefixCache(capacity_bytes, chunk, base)
        chunk_keys(adapter, prompt)  the key of each complete chunk of a prompt (a hash chain)
        lookup(adapter, keys)        the cached KV of the longest run of leading chunks
        put(adapter, key, kv)        keeps one chunk's KV, evicting the least recently used
        drop(adapter)                forgets every chunk of an adapter version

An entry is keyed by (base model, adapter owner + id + version, the prompt's token ids up to the
chunk's end); the ids go in as a chain of hashes, key_i = H(key_{i-1}, tokens of chunk i), so a
key fixes the whole prefix, not only its last chunk. Because the key holds the adapter version, a
new version never reads KV computed with an old one (the reload test), and the engine drops the
old version's entries when it stops serving it (`AdapterVersions`).

Which KV may be reused, and why it is bitwise the same: only what prefill chunks wrote. Chunk i of
a prompt is computed in shapes fixed by its place (`EngineConfig.window`), from its own tokens and
the KV of chunks 0..i-1, so chunk i's KV depends on the tokens [0, (i+1)*C) and the adapter version
alone: a request that copies it gets exactly the bits it would have computed. KV that decode steps
produced (a chat's earlier answers, resent as the next prompt) was computed one token at a time in
other shapes, so it is never stored, and a prompt's partial last chunk is not either. The last
chunk of a prompt is always computed, even when its whole prompt is cached: its logits give the
first token.

Memory: entries are host (numpy) arrays, counted in bytes against `capacity_bytes`; an entry larger
than the whole budget is not kept. Eviction takes the least recently used entry; a lookup touches
the chunks it hits from the last to the first, so a prefix's later chunks go before its first ones
(a chunk is of no use once a chunk before it is gone).

Thread model: the engine thread looks up and puts; `drop` may come from the adapter watcher's
thread, so every method takes the lock.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Sequence

import numpy as np

from jaxlora.engine import ChunkKV

AdapterKey = tuple[str, str, str] | None  # ResolvedAdapter.key; None: the base model


@dataclasses.dataclass
class PrefixStats:
    lookups: int = 0  # requests that looked a prefix up
    hits: int = 0  # of them, those that found at least one chunk
    hit_tokens: int = 0  # prompt tokens served from the cache
    stored_chunks: int = 0
    evictions: int = 0
    dropped: int = 0  # entries forgotten because their adapter version is no longer served


class PrefixCache:
    def __init__(self, capacity_bytes: int, chunk: int, base: str = ""):
        self.capacity_bytes = capacity_bytes
        self.chunk = chunk
        self.base = base
        self.stats = PrefixStats()
        self._entries: collections.OrderedDict[tuple[AdapterKey, bytes], ChunkKV] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def chunk_keys(self, prompt: Sequence[int]) -> list[bytes]:
        """The key of each complete chunk of `prompt` (len(prompt) // chunk of them)."""
        keys, h = [], self.base.encode()
        ids = np.asarray(prompt, np.int64)
        for i in range(len(ids) // self.chunk):
            h = hashlib.blake2b(h + ids[i * self.chunk:(i + 1) * self.chunk].tobytes(), digest_size=16).digest()
            keys.append(h)
        return keys

    def lookup(self, adapter: AdapterKey, keys: Sequence[bytes]) -> list[ChunkKV]:
        """The KV of the longest run of leading chunks of `keys` that is cached (touched)."""
        with self._lock:
            self.stats.lookups += 1
            found = []
            for key in keys:
                kv = self._entries.get((adapter, key))
                if kv is None:
                    break
                found.append(kv)
            for key in reversed(keys[:len(found)]):
                self._entries.move_to_end((adapter, key))
            if found:
                self.stats.hits += 1
                self.stats.hit_tokens += len(found) * self.chunk
            return found

    def __contains__(self, item: tuple[AdapterKey, bytes]) -> bool:
        with self._lock:
            return item in self._entries

    def put(self, adapter: AdapterKey, key: bytes, kv: ChunkKV) -> None:
        size = _nbytes(kv)
        with self._lock:
            if (adapter, key) in self._entries or size > self.capacity_bytes:
                return
            while self._bytes + size > self.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= _nbytes(old)
                self.stats.evictions += 1
            self._entries[(adapter, key)] = kv
            self._bytes += size
            self.stats.stored_chunks += 1

    def drop(self, adapter: AdapterKey) -> None:
        """Forgets every chunk computed with `adapter` (a version no longer served)."""
        with self._lock:
            for entry in [e for e in self._entries if e[0] == adapter]:
                self._bytes -= _nbytes(self._entries.pop(entry))
                self.stats.dropped += 1

    def snapshot(self) -> dict:
        with self._lock:
            return dataclasses.asdict(self.stats) | {"bytes": self._bytes, "entries": len(self._entries),
                                                     "capacity_bytes": self.capacity_bytes}


def _nbytes(kv: ChunkKV) -> int:
    return sum(a.nbytes for a in (*kv.k, *kv.v))
