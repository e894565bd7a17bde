"""Breaker state shared by a fleet through Redis, without I/O on the hot path.

`SharedBreakerStorage` is a ``pybreaker.CircuitBreakerStorage`` whose getters
and setters touch only local fields, so ``admit`` and ``record`` never await.
Each change is queued, and one `BreakerSync` task per sidecar writes the
changes of every breaker in one MULTI/EXEC and, every
``state.refresh_interval``, reads each breaker's hash back and adopts the
fleet's state where this sidecar has nothing newer. One hash per breaker,
``{key_prefix}:breaker:{<name>}``, with a TTL. With Redis away or slow the
breakers run on local state and resynchronise when it answers. pybreaker is
imported here as well as in `sidecar.resilience.breaker`: the storage
interface is its class.

Why not pybreaker's ``CircuitRedisStorage``, the write and read rounds, the
keys and the failure behaviour: docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pybreaker
from redis.typing import EncodableT, FieldT

from sidecar.fleet.redis_client import (
    BREAKER_READ,
    BREAKER_WRITE,
    BackendUnavailable,
    StateBackend,
    stop_task,
)

log = logging.getLogger("sidecar.fleet")

STATES = (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN)
# Shortest TTL of a breaker's key, and how many reset timeouts it lasts at
# least: far longer than any state is useful, short enough that the keys of
# breakers that no sidecar uses any more go away.
MIN_TTL = 3600.0
TTL_RESET_TIMEOUTS = 10
# Pending operations kept per breaker before they are replaced by a snapshot.
MAX_OPS = 64
# Least seconds between two write batches: a burst of failures costs a few
# round trips, not one per failure.
WRITE_GAP = 0.002

# Pending operations: (HINCRBY, field) or (HSET, field, value).
_INCR = "incr"
_SET = "set"
Op = tuple[str, ...]
# Snapshots: none; fill the fields Redis lacks (HSETNX); overwrite (HSET).
NO_SNAPSHOT, FILL, FORCE = 0, 1, 2


def breaker_ttl(reset_timeout: float) -> float:
    """Seconds a breaker's key lives after its last write."""
    return max(MIN_TTL, TTL_RESET_TIMEOUTS * reset_timeout)


@dataclass(frozen=True, slots=True)
class SharedState:
    """A breaker's state as Redis holds it."""

    state: str
    fail_counter: int
    success_counter: int
    opened_at: float | None

    @classmethod
    def parse(cls, fields: dict[bytes, bytes]) -> SharedState | None:
        """From HGETALL; None when missing or not written by us."""
        try:
            state = fields[b"state"].decode()
            if state not in STATES:
                return None
            opened = fields.get(b"opened_at")
            return cls(
                state,
                int(fields.get(b"fail_counter", b"0")),
                int(fields.get(b"success_counter", b"0")),
                float(opened) if opened else None,
            )
        except (KeyError, ValueError, UnicodeDecodeError):
            return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "fail_counter": self.fail_counter,
            "success_counter": self.success_counter,
            "opened_at": (
                datetime.fromtimestamp(self.opened_at, UTC).isoformat() if self.opened_at else None
            ),
        }


class SharedBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage: local fields, changes queued to `BreakerSync` (docs/fleet.md).

    Made by `BreakerSync.storage`; call `observe` with the adapter's state
    getter so that adopted changes fire pybreaker's listeners at once.
    """

    def __init__(self, sync: BreakerSync, name: str, key: str, ttl: float) -> None:
        super().__init__("redis")
        self.breaker_name = name
        self.key = key
        self.ttl = ttl
        self._sync = sync
        self._state: str = pybreaker.STATE_CLOSED
        self._fail = 0
        self._success = 0
        self._opened_at: datetime | None = None
        self.ops: list[Op] = []
        self.snapshot = NO_SNAPSHOT  # write the whole local state next time (FILL, FORCE)
        self.version = 0  # bumped by every local change
        self._muted = False
        self._observer: Callable[[], object] | None = None
        self.shared: SharedState | None = None  # last read from Redis
        self.synced_at: float | None = None

    def observe(self, observer: Callable[[], object]) -> None:
        """Call ``observer`` (the adapter's ``state``) after adopting a new state."""
        self._observer = observer

    # -- pybreaker's interface: local fields only --------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self._changed((_SET, "state", state))

    def increment_counter(self) -> None:
        self._fail += 1
        self._changed((_INCR, "fail_counter"))

    def reset_counter(self) -> None:
        self._fail = 0
        self._changed((_SET, "fail_counter", "0"))

    def increment_success_counter(self) -> None:
        self._success += 1
        self._changed((_INCR, "success_counter"))

    def reset_success_counter(self) -> None:
        self._success = 0
        self._changed((_SET, "success_counter", "0"))

    @property
    def counter(self) -> int:
        return self._fail

    @property
    def success_counter(self) -> int:
        return self._success

    @property
    def opened_at(self) -> datetime | None:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self._opened_at = value
        self._changed((_SET, "opened_at", _timestamp(value)))

    # -- used by BreakerSync ---------------------------------------------------------

    def _changed(self, op: Op) -> None:
        if self._muted:
            return
        self.version += 1
        if self.snapshot or self._sync.backend.up is False or len(self.ops) >= MAX_OPS:
            self.snapshot = FORCE
            self.ops.clear()
        else:
            self.ops.append(op)
        self._sync.dirty(self)

    def local_fields(self) -> dict[str, EncodableT]:
        """The whole local state, as written by a snapshot."""
        fields: dict[str, EncodableT] = {
            "state": self._state,
            "fail_counter": str(self._fail),
            "success_counter": str(self._success),
        }
        if self._opened_at is not None:
            fields["opened_at"] = _timestamp(self._opened_at)
        return fields

    def adopt_counter(self, field: str, value: int) -> None:
        """The fleet's count, as HINCRBY returned it."""
        if field == "fail_counter":
            self._fail = value
        else:
            self._success = value

    def adopt(self, shared: SharedState) -> bool:
        """Take the shared state as the local one; True when the state changed."""
        changed = shared.state != self._state
        self._muted = True
        try:
            self._state = shared.state
            self._fail = shared.fail_counter
            self._success = shared.success_counter
            if shared.opened_at is not None:
                self._opened_at = datetime.fromtimestamp(shared.opened_at, UTC)
            if changed and self._observer is not None:
                self._observer()  # pybreaker notices: listeners, counter resets (muted)
        finally:
            self._muted = False
        return changed

    def describe(self) -> dict[str, Any]:
        """The shared side of this breaker, for ``/state``."""
        return {
            "name": self.breaker_name,
            "key": self.key,
            "shared": self.shared.as_dict() if self.shared else None,
            "synced_at": (
                datetime.fromtimestamp(self.synced_at, UTC).isoformat() if self.synced_at else None
            ),
            "pending_write": bool(self.ops) or self.snapshot != NO_SNAPSHOT,
        }


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
                if op[0] == _INCR:
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
                if op[0] == _INCR and s.version == version and s.breaker_name not in self._dirty:
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


def _timestamp(value: datetime) -> str:
    return f"{value.timestamp():.6f}"
