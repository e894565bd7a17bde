"""The Redis fallback store's writer: queued writes coalesced by key, applied in batches.

`RedisWriter` keeps at most one pending operation per cache key (a later put
wins), and one task applies the queue in batches of up to `BATCH_SIZE`, one
call of the Lua script (`redis_layout.SCRIPT`) per batch. The figures the
script returns (entries, bytes) are what `RedisStore.stats` reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from sidecar.fallback.redis_layout import (
    DELETE,
    ENTRY_OVERHEAD,
    PUT,
    SCRIPT,
    TOUCH,
    encode_value,
)
from sidecar.fallback.store import CachedReply
from sidecar.fleet.redis_client import CACHE_WRITE, BackendUnavailable, StateBackend, stop_task

log = logging.getLogger("sidecar.fallback")

# Most operations per script call: Redis runs a script alone, so a batch must
# be short (measured: ~1 ms for 256 puts on this class of machine).
BATCH_SIZE = 256
# Seconds the writer waits after a write is queued, to gather a batch.
WRITE_DELAY = 0.005
# Seconds `flush` and `close` wait for the writer.
CLOSE_TIMEOUT = 5.0
# LRU-end index members checked per batch for entries Redis has expired.
SWEEP = 8


class RedisWriter:
    """The write queue of one `RedisStore` and the task that applies it.

    Args:
        state: the fleet's Redis connection.
        entry_prefix: the prefix of the entries' keys.
        bookkeeping: the keys of the index, the size hash and the meta hash.
        ttl, max_entries, max_bytes, clock: as for `RedisStore`.
        queue_size: keys pending before operations on new keys are dropped.
    """

    def __init__(
        self,
        state: StateBackend,
        *,
        entry_prefix: str,
        bookkeeping: list[str],
        ttl: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float],
        queue_size: int,
    ) -> None:
        self.state = state
        self.entry_prefix = entry_prefix
        self.bookkeeping = bookkeeping
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.queue_size = queue_size
        self._clock = clock
        self._script = state.client.register_script(SCRIPT)
        self._pending: OrderedDict[str, tuple[Any, ...]] = OrderedDict()
        self._seq = 0  # operations queued so far
        self._done = 0  # operations applied (or given up) so far
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._urgent = False
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.entries = 0
        self.bytes = 0
        self.failed_writes = 0
        self.batches = 0

    def is_pending(self, key: str) -> bool:
        """True while an operation on ``key`` waits to be written."""
        return key in self._pending

    def pending(self) -> int:
        """Operations (keys) queued."""
        return len(self._pending)

    def queue(self, key: str, op: tuple[Any, ...]) -> bool:
        """Queue an operation for ``key``; False when dropped (queue full)."""
        if self._closed:
            return False
        old = self._pending.get(key)
        if old is None:
            if len(self._pending) >= self.queue_size:
                return False
            self._pending[key] = op
        elif op[0] == PUT or old[0] == TOUCH:
            self._pending[key] = op  # the later put wins; a delete or touch replaces a touch
        # else: a touch or delete after a queued put or delete: that one stands
        self._pending.move_to_end(key)
        self._seq += 1
        if self._task is None:
            self.start()
        self._wake.set()
        return True

    def start(self) -> None:
        """Start the task (once, and only on the event loop)."""
        if self._task is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not on the loop yet (a put before start): started later
            return
        self._task = loop.create_task(self._write_loop(), name="fallback-redis-writer")

    async def flush(self) -> None:
        """Wait until every write queued before this call was applied (or given up)."""
        if self._closed:
            return
        target = self._seq
        if self._done >= target:
            return
        self.start()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._urgent = True
        self._wake.set()
        try:
            await asyncio.wait_for(future, CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("fallback cache: Redis writes not done within %gs", CLOSE_TIMEOUT)

    async def stop(self) -> None:
        """Stop the task and forget what is still queued (`flush` first to write it)."""
        self._closed = True
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        for _, future in self._waiters:
            if not future.done():
                future.set_result(None)
        self._waiters.clear()
        self._pending.clear()

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
        puts = sum(1 for _, op in batch if op[0] == PUT)
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
            if op[0] == PUT:
                reply: CachedReply = op[1]
                remaining_ms = int((self.ttl - (now - reply.stored_at)) * 1000)
                if remaining_ms > 0:
                    cost = len(key) + reply.size + ENTRY_OVERHEAD
                    args += [PUT, key, encode_value(reply), remaining_ms, cost]
                else:
                    args += [DELETE, key, b"", 0, 0]
            elif op[0] == TOUCH:
                args += [TOUCH, key, b"", 0, 0]
            else:
                args += [DELETE, key, op[1], 0, 0]
        try:
            count, total = await self.state.call(
                CACHE_WRITE, lambda: self._script(keys=self.bookkeeping, args=args)
            )
        except BackendUnavailable:
            self.failed_writes += puts
            return
        self.batches += 1
        self.entries, self.bytes = int(count), int(total)
