"""The Redis fallback store: cached replies shared by every sidecar of a fleet.

Two tiers: a `MemoryStore` in this process (L1, same TTL and bounds) answers
what it can, and Redis behind it holds the fleet's replies, so a reply cached
through sidecar A is served as a fallback by sidecar B. ``put`` writes L1 and
queues the Redis write (bounded: dropped and counted when full); one writer
task (`sidecar.fallback.redis_writer`) applies the queue in batches, one Lua
script call per batch (`sidecar.fallback.redis_layout`), which also keeps each
upstream's entries within ``max_entries`` and ``max_bytes`` (LRU). ``get``
after an L1 miss does one GET bounded by ``state.timeout``; a slow, failing or
down Redis is a miss, never a wait. ``stats`` do no I/O. Limits: one Redis (or
one Cluster slot per upstream); set Redis's ``maxmemory`` for a hard cap on its
memory.

Why, the keys and value layout, the bounds and the constants:
docs/fallback-stores.md ("Redis").
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sidecar.fallback.redis_layout import (
    DELETE,
    ENTRY_OVERHEAD,
    HEADER,
    PUT,
    TOUCH,
    decode_value,
    encode_value,
    same_reply,
)
from sidecar.fallback.redis_writer import RedisWriter
from sidecar.fallback.store import ENTRY_OVERHEAD as L1_ENTRY_OVERHEAD
from sidecar.fallback.store import CachedReply, MemoryStore, StoreStats
from sidecar.fleet.redis_client import (
    CACHE_READ,
    MAX_CONCURRENT_READS,
    BackendUnavailable,
    StateBackend,
)

__all__ = ["ENTRY_OVERHEAD", "RedisStore", "decode_value", "encode_value"]

# Writes queued before puts of new keys are dropped (about a second of
# distinct-key puts at a busy sidecar's rate, a few MiB).
QUEUE_SIZE = 10_000
# Seconds during which a reply identical to the one before it (seqid aside)
# is not written to Redis again: a hot call with a steady answer costs one
# Redis write per second, not one per call. Redis's copy is then at most this
# much older (it expires that much sooner); at most a tenth of the TTL.
REWRITE_INTERVAL = 1.0


class _L1(MemoryStore):
    """The local tier: a MemoryStore whose entries never cost less than Redis's."""

    def peek(self, key: str) -> CachedReply | None:
        """The entry for ``key``, expired or not, without touching the LRU order."""
        return self._entries.get(key)

    @staticmethod
    def _cost(key: str, reply: CachedReply) -> int:
        return len(key) + reply.size + max(L1_ENTRY_OVERHEAD, ENTRY_OVERHEAD)


class RedisStore:
    """Fallback replies in Redis behind a local LRU; see docs/fallback-stores.md.

    Args:
        state: the fleet's Redis connection (not closed by the store unless
            ``owns_state``).
        namespace: the upstream's name; part of every key.
        ttl: seconds an entry may be served after it was stored.
        max_entries: most entries kept, in L1 and in Redis (per upstream).
        max_bytes: most bytes kept, counted as key + message + arguments + overhead.
        clock: Unix time, for the TTL (entries outlive the process).
        queue_size: writes queued before puts of new keys are dropped.
        owns_state: close ``state`` on `close` (a store used on its own).
    """

    backend = "redis"

    def __init__(
        self,
        state: StateBackend,
        *,
        namespace: str,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        queue_size: int = QUEUE_SIZE,
        owns_state: bool = False,
    ) -> None:
        self.state = state
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self._clock = clock
        self._owns_state = owns_state
        self._l1 = _L1(ttl=ttl, max_entries=max_entries, max_bytes=max_bytes, clock=clock)
        tag = "{" + namespace + "}"
        self.entry_prefix = state.key("fallback", tag) + ":"
        self.bookkeeping = [
            state.key("fallback-index", tag),
            state.key("fallback-sizes", tag),
            state.key("fallback-meta", tag),
        ]
        self._writer = RedisWriter(
            state,
            entry_prefix=self.entry_prefix,
            bookkeeping=self.bookkeeping,
            ttl=ttl,
            max_entries=max_entries,
            max_bytes=max_bytes,
            clock=clock,
            queue_size=queue_size,
        )
        self._reading = 0
        self._closed = False
        self.dropped_writes = 0
        self.missed_reads = 0
        self.skipped_writes = 0
        self._rewrite_interval = min(REWRITE_INTERVAL, ttl / 10)

    # -- the interface (event loop thread) -------------------------------------------

    def put(self, key: str, reply: CachedReply) -> None:
        """Remember in L1 and queue the Redis write; never blocks."""
        if self._closed:
            return
        previous = self._l1.peek(key)
        if (
            previous is not None
            and not self._writer.is_pending(key)
            and 0 <= reply.stored_at - previous.stored_at < self._rewrite_interval
            and same_reply(previous, reply)
        ):
            # The same reply as L1's, which went to Redis less than the interval ago:
            # keep that copy (L1 and Redis stay alike), only mark it used.
            self._l1.get_now(key)
            self.skipped_writes += 1
            return
        self._l1.put(key, reply)
        if self._clock() - reply.stored_at >= self.ttl:  # too old already: forget older ones
            self._writer.queue(key, (DELETE, b""))
        elif not self._writer.queue(key, (PUT, reply)):
            self.dropped_writes += 1

    async def get(self, key: str) -> CachedReply | None:
        """L1, else Redis within ``state.timeout``; None when neither has a fresh reply."""
        if self._closed:
            return None
        self._writer.start()
        reply = self._l1.get_now(key)
        if reply is not None:
            self._writer.queue(key, (TOUCH,))
            return reply
        if self.state.up is False or self._reading >= MAX_CONCURRENT_READS:
            self.missed_reads += 1
            return None
        self._reading += 1
        try:
            raw = await self.state.call(
                CACHE_READ, lambda: self.state.client.get(self.entry_prefix + key)
            )
        except BackendUnavailable:
            self.missed_reads += 1
            return None
        finally:
            self._reading -= 1
        if not isinstance(raw, bytes) or self._closed:  # None: not there
            return None
        reply = decode_value(raw)
        if reply is None:
            self._writer.queue(key, (DELETE, bytes(raw[: HEADER.size])))
            return None
        if self._clock() - reply.stored_at > self.ttl:
            self._writer.queue(key, (DELETE, bytes(raw[: HEADER.size])))
            return None
        self._l1.put(key, reply)
        self._writer.queue(key, (TOUCH,))
        return reply

    def stats(self) -> StoreStats:
        """Redis figures for this upstream as the last batch left them; no I/O."""
        writer = self._writer
        return StoreStats(
            self.backend,
            writer.entries,
            writer.bytes,
            healthy=self.state.up is not False,
            dropped_writes=self.dropped_writes,
            failed_writes=writer.failed_writes,
            missed_reads=self.missed_reads,
        )

    def pending_writes(self) -> int:
        """Operations queued for the writer."""
        return self._writer.pending()

    @property
    def batches(self) -> int:
        """Script calls that Redis answered."""
        return self._writer.batches

    async def start(self) -> None:
        """Start the writer (also started by the first get or flush)."""
        self._writer.start()

    async def flush(self) -> None:
        """Wait until every write queued before this call was applied (or given up)."""
        if self._closed:
            return
        await self._writer.flush()

    async def close(self) -> None:
        """Apply the queued writes (bounded), stop the writer, forget L1."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        await self._writer.stop()
        await self._l1.close()
        if self._owns_state:
            await self.state.close()
