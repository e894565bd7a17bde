"""The Redis fallback store: cached replies shared by every sidecar of a fleet.

Two tiers: a `MemoryStore` in this process (L1, same TTL and bounds) answers
what it can, and Redis behind it holds the fleet's replies, so a reply cached
through sidecar A is served as a fallback by sidecar B. ``put`` writes L1 and
queues the Redis write (bounded: dropped and counted when full); one writer
task applies the queue in batches, one Lua script call (`_SCRIPT`) per batch,
which also keeps each upstream's entries within ``max_entries`` and
``max_bytes`` (LRU). ``get`` after an L1 miss does one GET bounded by
``state.timeout``; a slow, failing or down Redis is a miss, never a wait.
``stats`` do no I/O. Limits: one Redis (or one Cluster slot per upstream);
set Redis's ``maxmemory`` for a hard cap on its memory.

Why, the keys and value layout, the bounds and the constants:
docs/fallback-stores.md ("Redis").
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sidecar.fallback.store import ENTRY_OVERHEAD as L1_ENTRY_OVERHEAD
from sidecar.fallback.store import CachedReply, MemoryStore, StoreStats
from sidecar.fleet.redis_client import (
    CACHE_READ,
    CACHE_WRITE,
    MAX_CONCURRENT_READS,
    BackendUnavailable,
    StateBackend,
    stop_task,
)

log = logging.getLogger("sidecar.fallback")

# The value: layout byte (1), stored_at (float64, big-endian), seqid offset
# (uint32), then the message: 13 bytes on top of it.
LAYOUT = 1
_HEADER = struct.Struct(">BdI")
# Bytes counted per entry beyond key and message: the value's header, the key
# prefix and the upstream name in the key, the index and size-hash entries
# that repeat the cache key, and Redis's object headers and allocator slack.
# Measured with INFO used_memory over 10,000 entries on Redis 7.0 with the
# default key prefix: 460-530 bytes for messages of 64 B to 4 KiB
# (tests/fleet/test_redis_store.py measures it again for 300 B messages, prints
# it, and fails when it exceeds this by more than 10 %). L1 counts at least as
# much per entry (`_L1`), so that it evicts no later than Redis does.
ENTRY_OVERHEAD = 512

# Writes queued before puts of new keys are dropped (about a second of
# distinct-key puts at a busy sidecar's rate, a few MiB).
QUEUE_SIZE = 10_000
# Most operations per script call: Redis runs a script alone, so a batch must
# be short (measured: ~1 ms for 256 puts on this class of machine).
BATCH_SIZE = 256
# Seconds the writer waits after a write is queued, to gather a batch.
WRITE_DELAY = 0.005
# Seconds `flush` and `close` wait for the writer.
CLOSE_TIMEOUT = 5.0
# LRU-end index members checked per batch for entries Redis has expired.
SWEEP = 8
# Seconds during which a reply identical to the one before it (seqid aside)
# is not written to Redis again: a hot call with a steady answer costs one
# Redis write per second, not one per call. Redis's copy is then at most this
# much older (it expires that much sooner); at most a tenth of the TTL.
REWRITE_INTERVAL = 1.0

# Queued operations by cache key.
_PUT = "P"  # (_PUT, CachedReply)
_TOUCH = "T"  # (_TOUCH,)
_DELETE = "D"  # (_DELETE, prefix): delete when the value starts with prefix (b"": always)

_SCRIPT = """
local idx, sizes, meta = KEYS[1], KEYS[2], KEYS[3]
local prefix = ARGV[1]
local max_entries = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local keep_ms = tonumber(ARGV[4])
local sweep = tonumber(ARGV[5])
local total = tonumber(redis.call('HGET', meta, 'bytes') or '0')
local function forget(member)
  local size = redis.call('HGET', sizes, member)
  if size then
    total = total - tonumber(size)
    redis.call('HDEL', sizes, member)
  end
  redis.call('ZREM', idx, member)
  redis.call('DEL', prefix .. member)
end
for i = 6, #ARGV, 5 do
  local kind, member = ARGV[i], ARGV[i + 1]
  if kind == 'P' then
    forget(member)
    local cost = tonumber(ARGV[i + 4])
    if cost <= max_bytes then
      local seq = redis.call('HINCRBY', meta, 'seq', 1)
      redis.call('SET', prefix .. member, ARGV[i + 2], 'PX', ARGV[i + 3])
      redis.call('ZADD', idx, seq, member)
      redis.call('HSET', sizes, member, cost)
      total = total + cost
    end
  elseif kind == 'T' then
    if redis.call('EXISTS', prefix .. member) == 1 then
      if redis.call('ZSCORE', idx, member) then
        redis.call('ZADD', idx, redis.call('HINCRBY', meta, 'seq', 1), member)
      end
    else
      forget(member)
    end
  else
    local value = redis.call('GET', prefix .. member)
    local head = ARGV[i + 2]
    if not value or string.sub(value, 1, #head) == head then
      forget(member)
    end
  end
end
local count = redis.call('ZCARD', idx)
for _, member in ipairs(redis.call('ZRANGE', idx, 0, sweep - 1)) do
  if redis.call('EXISTS', prefix .. member) == 0 then
    forget(member)
    count = count - 1
  end
end
while count > max_entries or (count > 0 and total > max_bytes) do
  local popped = redis.call('ZRANGE', idx, 0, 0)
  forget(popped[1])
  count = count - 1
end
if count == 0 then
  total = 0
end
redis.call('HSET', meta, 'bytes', total)
redis.call('PEXPIRE', idx, keep_ms)
redis.call('PEXPIRE', sizes, keep_ms)
redis.call('PEXPIRE', meta, keep_ms)
return {count, total}
"""


def encode_value(reply: CachedReply) -> bytes:
    """The Redis value of a reply (layout: `_HEADER`)."""
    return _HEADER.pack(LAYOUT, reply.stored_at, reply.seqid_offset) + reply.message


def _same_reply(a: CachedReply, b: CachedReply) -> bool:
    """Same message bytes apart from the seqid (which the upstream pool chose)."""
    offset = a.seqid_offset
    if offset != b.seqid_offset or len(a.message) != len(b.message):
        return False
    x, y = memoryview(a.message), memoryview(b.message)
    return x[:offset] == y[:offset] and x[offset + 4 :] == y[offset + 4 :]


def decode_value(raw: bytes) -> CachedReply | None:
    """A reply from its Redis value; None if it is not one of ours."""
    if len(raw) < _HEADER.size:
        return None
    layout, stored_at, offset = _HEADER.unpack_from(raw)
    message = raw[_HEADER.size :]
    if layout != LAYOUT or offset + 4 > len(message):
        return None
    return CachedReply(message, offset, stored_at)


class _L1(MemoryStore):
    """The local tier: a MemoryStore whose entries never cost less than Redis's."""

    def peek(self, key: str) -> CachedReply | None:
        """The entry for ``key``, expired or not, without touching the LRU order."""
        return self._entries.get(key)

    @staticmethod
    def _cost(key: str, reply: CachedReply) -> int:
        return len(key) + len(reply.message) + max(L1_ENTRY_OVERHEAD, ENTRY_OVERHEAD)


class RedisStore:
    """Fallback replies in Redis behind a local LRU; see docs/fallback-stores.md.

    Args:
        state: the fleet's Redis connection (not closed by the store unless
            ``owns_state``).
        namespace: the upstream's name; part of every key.
        ttl: seconds an entry may be served after it was stored.
        max_entries: most entries kept, in L1 and in Redis (per upstream).
        max_bytes: most bytes kept, counted as key + message + overhead.
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
        self._script = state.client.register_script(_SCRIPT)
        self._pending: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._seq = 0  # operations queued so far
        self._done = 0  # operations applied (or given up) so far
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._urgent = False
        self._writer: asyncio.Task[None] | None = None
        self._reading = 0
        self._closed = False
        self._entries = 0
        self._bytes = 0
        self.dropped_writes = 0
        self.failed_writes = 0
        self.missed_reads = 0
        self.skipped_writes = 0
        self.batches = 0
        self._rewrite_interval = min(REWRITE_INTERVAL, ttl / 10)

    # -- the interface (event loop thread) -------------------------------------------

    def put(self, key: str, reply: CachedReply) -> None:
        """Remember in L1 and queue the Redis write; never blocks."""
        if self._closed:
            return
        previous = self._l1.peek(key)
        if (
            previous is not None
            and key not in self._pending
            and 0 <= reply.stored_at - previous.stored_at < self._rewrite_interval
            and _same_reply(previous, reply)
        ):
            # The same reply as L1's, which went to Redis less than the interval ago:
            # keep that copy (L1 and Redis stay alike), only mark it used.
            self._l1.get_now(key)
            self.skipped_writes += 1
            return
        self._l1.put(key, reply)
        if self._clock() - reply.stored_at >= self.ttl:  # too old already: forget older ones
            self._queue(key, (_DELETE, b""))
        elif not self._queue(key, (_PUT, reply)):
            self.dropped_writes += 1

    async def get(self, key: str) -> CachedReply | None:
        """L1, else Redis within ``state.timeout``; None when neither has a fresh reply."""
        if self._closed:
            return None
        self._start_writer()
        reply = self._l1.get_now(key)
        if reply is not None:
            self._queue(key, (_TOUCH,))
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
            self._queue(key, (_DELETE, bytes(raw[: _HEADER.size])))
            return None
        if self._clock() - reply.stored_at > self.ttl:
            self._queue(key, (_DELETE, bytes(raw[: _HEADER.size])))
            return None
        self._l1.put(key, reply)
        self._queue(key, (_TOUCH,))
        return reply

    def stats(self) -> StoreStats:
        """Redis figures for this upstream as the last batch left them; no I/O."""
        return StoreStats(
            self.backend,
            self._entries,
            self._bytes,
            healthy=self.state.up is not False,
            dropped_writes=self.dropped_writes,
            failed_writes=self.failed_writes,
            missed_reads=self.missed_reads,
        )

    def pending_writes(self) -> int:
        """Operations queued for the writer."""
        return len(self._pending)

    async def start(self) -> None:
        """Start the writer (also started by the first get or flush)."""
        self._start_writer()

    async def flush(self) -> None:
        """Wait until every write queued before this call was applied (or given up)."""
        if self._closed:
            return
        target = self._seq
        if self._done >= target:
            return
        self._start_writer()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._urgent = True
        self._wake.set()
        try:
            await asyncio.wait_for(future, CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("fallback cache: Redis writes not done within %gs", CLOSE_TIMEOUT)

    async def close(self) -> None:
        """Apply the queued writes (bounded), stop the writer, forget L1."""
        if self._closed:
            return
        await self.flush()
        self._closed = True
        if self._writer is not None:
            await stop_task(self._writer)
            self._writer = None
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()
        self._pending.clear()
        await self._l1.close()
        if self._owns_state:
            await self.state.close()

    # -- the writer --------------------------------------------------------------------

    def _queue(self, key: str, op: tuple[Any, ...]) -> bool:
        """Queue an operation for ``key``; False when dropped (queue full)."""
        if self._closed:
            return False
        old = self._pending.get(key)
        if old is None:
            if len(self._pending) >= self.queue_size:
                return False
            self._pending[key] = op
        elif op[0] == _PUT or old[0] == _TOUCH:
            self._pending[key] = op  # the later put wins; a delete or touch replaces a touch
        # else: a touch or delete after a queued put or delete: that one stands
        self._pending.move_to_end(key)
        self._seq += 1
        if self._writer is None:
            self._start_writer()
        self._wake.set()
        return True

    def _start_writer(self) -> None:
        if self._writer is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop yet (a put before start): started later
            return
        self._writer = loop.create_task(self._write_loop(), name="fallback-redis-writer")

    async def _write_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if not self._urgent and len(self._pending) < BATCH_SIZE:
                await asyncio.sleep(WRITE_DELAY)
            self._urgent = False
            while self._pending:
                batch = [
                    self._pending.popitem(last=False)
                    for _ in range(min(BATCH_SIZE, len(self._pending)))
                ]
                try:
                    await self._apply(batch)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug must not stop the writer
                    log.exception("fallback cache: Redis batch failed")
            self._done = self._seq
            still = []
            for target, future in self._waiters:
                if target <= self._done:
                    if not future.done():
                        future.set_result(None)
                else:
                    still.append((target, future))
            self._waiters = still

    async def _apply(self, batch: list[tuple[str, tuple[Any, ...]]]) -> None:
        puts = sum(1 for _, op in batch if op[0] == _PUT)
        if not self.state.may_try():  # down: tried again once per refresh interval
            self.failed_writes += puts
            return
        now = self._clock()
        args: list[Any] = [
            self.entry_prefix,
            self.max_entries,
            self.max_bytes,
            max(1, int(self.ttl * 1000)),
            SWEEP,
        ]
        for key, op in batch:
            if op[0] == _PUT:
                reply: CachedReply = op[1]
                remaining_ms = int((self.ttl - (now - reply.stored_at)) * 1000)
                if remaining_ms > 0:
                    cost = len(key) + len(reply.message) + ENTRY_OVERHEAD
                    args += [_PUT, key, encode_value(reply), remaining_ms, cost]
                else:
                    args += [_DELETE, key, b"", 0, 0]
            elif op[0] == _TOUCH:
                args += [_TOUCH, key, b"", 0, 0]
            else:
                args += [_DELETE, key, op[1], 0, 0]
        try:
            count, total = await self.state.call(
                CACHE_WRITE, lambda: self._script(keys=self.bookkeeping, args=args)
            )
        except BackendUnavailable:
            self.failed_writes += puts
            return
        self.batches += 1
        self._entries, self._bytes = int(count), int(total)
