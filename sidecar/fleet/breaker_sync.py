"""The task that keeps a fleet's breakers in sync through Redis: `BreakerSync`.

One task per sidecar writes the queued changes of every `SharedBreakerStorage`
in one MULTI/EXEC and, every ``state.refresh_interval``, reads each breaker's
hash back and adopts the fleet's state where this sidecar has nothing newer.
With Redis away or slow the breakers run on local state and resynchronise
when it answers. The write and read rounds: docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.typing import EncodableT, FieldT

from sidecar.fleet.redis_client import (
    BREAKER_READ,
    BREAKER_WRITE,
    BackendUnavailable,
    StateBackend,
    stop_task,
)
from sidecar.fleet.shared_breaker import (
    FILL,
    FORCE,
    INCR,
    NO_SNAPSHOT,
    Op,
    SharedBreakerStorage,
    SharedState,
    breaker_ttl,
)

log = logging.getLogger("sidecar.fleet")

# Least seconds between two write batches: a burst of failures costs a few
# round trips, not one per failure.
WRITE_GAP = 0.002


class BreakerSync:
    """The task that writes breaker changes to Redis and reads the fleet's state back.

    Args:
        backend: the Redis connection and its health.
    """

    def __init__(self, backend: StateBackend) -> None:
        self.backend = backend
        self._storages: dict[str, SharedBreakerStorage] = {}
        self._dirty: dict[str, SharedBreakerStorage] = {}
        self._wake = asyncio.Event()
        self._refresh_soon = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.writes = 0
        self.reads = 0
        self.adopted = 0

    def storage(self, name: str, reset_timeout: float) -> SharedBreakerStorage:
        """The storage of breaker ``name`` (one per name), read from Redis on the next round."""
        found = self._storages.get(name)
        if found is not None:
            return found
        key = self.backend.key("breaker", "{" + name + "}")
        storage = SharedBreakerStorage(self, name, key, breaker_ttl(reset_timeout))
        self._storages[name] = storage
        self._refresh_soon = True
        self._wake.set()
        return storage

    def storages(self) -> list[SharedBreakerStorage]:
        return list(self._storages.values())

    def dirty(self, storage: SharedBreakerStorage) -> None:
        """``storage`` has changes to write (called by the storage, on the loop)."""
        self._dirty[storage.breaker_name] = storage
        self._wake.set()

    async def start(self) -> None:
        """Read the shared state once (bounded by the timeout), then run the task."""
        await self.sync_once()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="breaker-sync")

    async def stop(self) -> None:
        """Stop the task, then try once more to write what is pending."""
        self._stopping = True
        if self._task is not None:
            await stop_task(self._task)
            self._task = None
        if self._dirty and self.backend.up is not False:
            await self._write()

    async def sync_once(self) -> None:
        """Write pending changes, then read the shared state (tests, start-up)."""
        if self._dirty:
            await self._write()
        await self._refresh()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.backend.refresh_interval
        next_refresh = loop.time() + interval
        while not self._stopping:
            try:
                if self._dirty and self.backend.up is not False:
                    written = await self._write()
                    # A refused write (Redis answered with an error) waits for the next round.
                    await asyncio.sleep(WRITE_GAP if written else interval)
                    continue
                if self._refresh_soon or loop.time() >= next_refresh:
                    self._refresh_soon = False
                    await self.sync_once()  # while Redis is down, this is the retry
                    next_refresh = loop.time() + interval
                    continue
                self._wake.clear()
                timer = loop.call_at(next_refresh, self._wake.set)  # not asyncio.timeout:
                try:  # see stop_task
                    await self._wake.wait()
                finally:
                    timer.cancel()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the sharing for good
                log.exception("breaker sync round failed")
                await asyncio.sleep(interval)

    async def _write(self) -> bool:
        """Apply every pending change; False when the batch failed (kept as snapshots)."""
        batch = list(self._dirty.values())
        self._dirty.clear()
        taken: list[tuple[SharedBreakerStorage, int, list[Op], int, int]] = []
        pipe = self.backend.client.pipeline(transaction=True)
        for s in batch:
            ops, snapshot = s.ops, s.snapshot
            s.ops, s.snapshot = [], NO_SNAPSHOT
            commands = 0
            if snapshot == FORCE:
                mapping: dict[FieldT, EncodableT] = {k: v for k, v in s.local_fields().items()}
                pipe.hset(s.key, mapping=mapping)
                commands = 1
            else:  # FILL, or before ops: HSETNX, so a key that expired or was never written
                # is whole again; the counters only in a FILL (which has no ops: a change
                # turns it into FORCE), as a missing counter reads as 0
                for field, value in s.local_fields().items():
                    if snapshot == FILL or not field.endswith("counter"):
                        pipe.hsetnx(s.key, field, value)
                        commands += 1
            for op in ops:
                if op[0] == INCR:
                    pipe.hincrby(s.key, op[1], 1)
                else:
                    pipe.hset(s.key, op[1], op[2])
            pipe.pexpire(s.key, int(s.ttl * 1000))
            taken.append((s, s.version, ops, snapshot, commands))
        try:
            results = await self.backend.call(BREAKER_WRITE, pipe.execute)
        except BackendUnavailable:
            for s, _, ops, snapshot, _ in taken:  # applied or not: write it all next time
                changed = ops or s.ops or FORCE in (snapshot, s.snapshot)
                s.snapshot = FORCE if changed else FILL
                s.ops.clear()
                self._dirty[s.breaker_name] = s
            return False
        self.writes += 1
        position = 0
        for s, version, ops, _, commands in taken:
            position += commands
            for op in ops:
                if op[0] == INCR and s.version == version and s.breaker_name not in self._dirty:
                    s.adopt_counter(op[1], int(results[position]))
                position += 1
            position += 1  # PEXPIRE
        return True

    async def _refresh(self) -> None:
        storages = list(self._storages.values())
        if not storages:
            return
        versions = [s.version for s in storages]
        pipe = self.backend.client.pipeline(transaction=False)
        for s in storages:
            pipe.hgetall(s.key)
        try:
            results = await self.backend.call(BREAKER_READ, pipe.execute)
        except BackendUnavailable:
            return
        self.reads += 1
        now = time.time()
        for s, version, fields in zip(storages, versions, results, strict=True):
            shared = SharedState.parse(fields) if fields else None
            s.shared, s.synced_at = shared, now
            if s.breaker_name in self._dirty or s.version != version:
                continue  # local changes not written yet: they win, and are written next
            if shared is None:  # expired, Redis restarted empty, or not ours: fill it in
                s.snapshot = FILL
                self.dirty(s)
                continue
            if s.adopt(shared):
                self.adopted += 1
                log.info(
                    "breaker %s: adopted the fleet's state %s from Redis",
                    s.breaker_name,
                    shared.state,
                )

    def describe(self) -> list[dict[str, Any]]:
        """Each breaker's shared side, for ``/state``."""
        return [s.describe() for s in self._storages.values()]

    def shared_views(self) -> list[tuple[str, SharedState]]:
        """(breaker name, state as Redis last held it) for the breakers read so far."""
        return [(s.breaker_name, s.shared) for s in self._storages.values() if s.shared]
