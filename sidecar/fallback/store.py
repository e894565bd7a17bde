"""The fallback store interface, the cache key, and the in-memory LRU store.

A store maps a cache key (service, method and a hash of the raw argument
bytes) to the last good reply of that call, as the upstream wrote it. Every
backend (memory, SQLite, Redis) implements `FallbackStore`:

- ``put`` never blocks the caller: a backend with I/O queues the write and
  does it off the event loop, and may drop it under pressure (a cache is
  allowed to forget);
- ``get`` is awaited only when a fallback is needed, and must answer promptly
  (a backend with I/O bounds its own wait);
- entries older than ``ttl`` are never returned.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class CachedReply:
    """One remembered reply.

    Attributes:
        message: the whole reply message (envelope and result), unframed.
        seqid_offset: where its seqid is, to patch in the client's.
        stored_at: Unix time it was stored (wall clock: entries outlive the
            process in the SQLite and Redis stores).
    """

    message: bytes
    seqid_offset: int
    stored_at: float


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Figures for metrics and /state."""

    backend: str
    entries: int
    bytes: int
    healthy: bool = True


class FallbackStore(Protocol):
    """What every fallback backend provides."""

    backend: str

    def put(self, key: str, reply: CachedReply) -> None:
        """Remember a reply; never blocks."""

    async def get(self, key: str) -> CachedReply | None:
        """The reply for ``key`` if one younger than the TTL is known."""

    def stats(self) -> StoreStats:
        """Entry and byte counts."""

    async def close(self) -> None:
        """Flush pending writes and release resources."""


def cache_key(name: str, args: bytes | bytearray | memoryview) -> str:
    """The key of a call: its full method name and a 128-bit BLAKE2b of its argument bytes."""
    return f"{name}|{hashlib.blake2b(args, digest_size=16).hexdigest()}"


# Bytes counted per entry on top of key and message: the dict slot, the
# OrderedDict link and the CachedReply object (measured on CPython 3.11 with
# sys.getsizeof and tracemalloc, rounded up).
ENTRY_OVERHEAD = 300


class MemoryStore:
    """An LRU in this process, bounded by entry count and bytes."""

    backend = "memory"

    def __init__(
        self,
        *,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, CachedReply] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def _cost(key: str, reply: CachedReply) -> int:
        return len(key) + len(reply.message) + ENTRY_OVERHEAD

    def put(self, key: str, reply: CachedReply) -> None:
        cost = self._cost(key, reply)
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self._cost(key, old)
        self._entries[key] = reply
        self._bytes += cost
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            old_key, evicted = self._entries.popitem(last=False)
            self._bytes -= self._cost(old_key, evicted)

    def get_now(self, key: str) -> CachedReply | None:
        """`get` without awaiting: this store needs no I/O."""
        reply = self._entries.get(key)
        if reply is None:
            return None
        if self._clock() - reply.stored_at > self.ttl:
            del self._entries[key]
            self._bytes -= self._cost(key, reply)
            return None
        self._entries.move_to_end(key)
        return reply

    async def get(self, key: str) -> CachedReply | None:
        return self.get_now(key)

    def stats(self) -> StoreStats:
        return StoreStats(self.backend, len(self._entries), self._bytes)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0
