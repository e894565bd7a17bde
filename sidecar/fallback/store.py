"""The fallback store interface, the cache key, and the in-memory LRU store.

A store maps a cache key (service, method and an xxh3-128 hash of the raw
argument bytes) to the last good reply of that call, as the upstream wrote
it, with the argument bytes it answered: the hash is fast, not collision
resistant, so a reply is served only to a call with the same arguments. Every
backend implements `FallbackStore`: `MemoryStore` here,
`sidecar.fallback.sqlite.SqliteStore` (a file that survives restarts) and
`sidecar.fallback.redis.RedisStore` (shared by a fleet). Why each is built as
it is: docs/fallback-stores.md.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol


class CachedReply(NamedTuple):
    """One remembered reply.

    A named tuple: made on every cacheable call, and a tuple is the cheapest
    immutable record to make.

    Attributes:
        message: the whole reply message (envelope and result), unframed.
        seqid_offset: where its seqid is, to patch in the client's.
        stored_at: Unix time it was stored (wall clock: entries outlive the
            process in the SQLite and Redis stores).
        args: the argument bytes of the call it answered; served only to a
            call whose argument bytes are equal (`answers`).
    """

    message: bytes
    seqid_offset: int
    stored_at: float
    args: bytes = b""

    def answers(self, args: bytes | bytearray | memoryview) -> bool:
        """Whether this is the reply to a call with these argument bytes."""
        return self.args == args

    @property
    def size(self) -> int:
        """Bytes of message and arguments, as the stores count them against ``max_bytes``."""
        return len(self.message) + len(self.args)


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Figures for metrics and /state.

    Attributes:
        backend: ``memory``, ``sqlite`` or ``redis``.
        entries: replies held.
        bytes: their size as the backend counts it against ``max_bytes``.
        healthy: False while the backend is failing or has fallen back to memory.
        dropped_writes: puts dropped because the write queue was full.
        failed_writes: puts lost to backend errors.
        missed_reads: gets answered "none" because the backend was too slow or busy.
        errors: (operation, failures so far) of the backend's own operations
            (the SQLite store's: read, write, purge, file, reopen); empty for
            backends that do not count them.
    """

    backend: str
    entries: int
    bytes: int
    healthy: bool = True
    dropped_writes: int = 0
    failed_writes: int = 0
    missed_reads: int = 0
    errors: tuple[tuple[str, int], ...] = ()


class FallbackStore(Protocol):
    """What every fallback backend provides, and the contract it keeps.

    - ``put`` never blocks the caller: a backend with I/O queues the write and
      does it off the event loop, and may drop it under pressure (a cache is
      allowed to forget);
    - ``get`` is awaited only when a fallback is needed, and must answer
      promptly (a backend with I/O bounds its own wait, and a slow or failing
      backend answers None: no cached reply);
    - entries older than ``ttl`` are never returned;
    - ``stats`` is called on the event loop and does no I/O;
    - ``flush`` waits until the puts made before it are visible to ``get``
      (tests, shutdown); ``close`` flushes, then releases what the store holds.
    """

    backend: str
    ttl: float

    def put(self, key: str, reply: CachedReply) -> None:
        """Remember a reply; never blocks."""

    async def get(self, key: str) -> CachedReply | None:
        """The reply for ``key`` if one younger than the TTL is known."""

    def stats(self) -> StoreStats:
        """Entry and byte counts; no I/O."""

    async def flush(self) -> None:
        """Wait until every put made before this call is visible to `get`."""

    async def close(self) -> None:
        """Flush pending writes and release resources."""


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
        self._closed = False

    @staticmethod
    def _cost(key: str, reply: CachedReply) -> int:
        return len(key) + reply.size + ENTRY_OVERHEAD

    def put(self, key: str, reply: CachedReply) -> None:
        if self._closed:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= self._cost(key, old)
        cost = self._cost(key, reply)
        if cost > self.max_bytes:  # can never fit; and the older reply is not the last one
            return
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

    async def flush(self) -> None:
        """Nothing to wait for: puts are applied at once."""

    async def close(self) -> None:
        self._closed = True
        self._entries.clear()
        self._bytes = 0
