"""A breaker's state shared through Redis, as pybreaker sees it: `SharedBreakerStorage`.

A ``pybreaker.CircuitBreakerStorage`` whose getters and setters touch only
local fields, so ``admit`` and ``record`` never await. Each change is queued
as an operation (or a snapshot of the whole state) for the sync task
(`sidecar.fleet.breaker_sync`), which writes it and adopts the fleet's state
(`SharedState`) read back from Redis. pybreaker is imported here as well as in
`sidecar.resilience.breaker`: the storage interface is its class. Why: docs/fleet.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import pybreaker
from redis.typing import EncodableT

from sidecar.fleet.redis_client import StateBackend

STATES = (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN)
# Shortest TTL of a breaker's key, and how many reset timeouts it lasts at
# least: far longer than any state is useful, short enough that the keys of
# breakers that no sidecar uses any more go away.
MIN_TTL = 3600.0
TTL_RESET_TIMEOUTS = 10
# Pending operations kept per breaker before they are replaced by a snapshot.
MAX_OPS = 64

# Pending operations: (HINCRBY, field) or (HSET, field, value).
INCR = "incr"
SET = "set"
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


class ChangeQueue(Protocol):
    """Where a storage sends its changes (`BreakerSync`)."""

    @property
    def backend(self) -> StateBackend:
        """The Redis connection, whose health decides between operations and a snapshot."""
        ...

    def dirty(self, storage: SharedBreakerStorage) -> None:
        """``storage`` has changes to write."""
        ...


class SharedBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage: local fields, changes queued to `BreakerSync` (docs/fleet.md).

    Made by `BreakerSync.storage`; call `observe` with the adapter's state
    getter so that adopted changes fire pybreaker's listeners at once.
    """

    def __init__(self, sync: ChangeQueue, name: str, key: str, ttl: float) -> None:
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
        self._changed((SET, "state", state))

    def increment_counter(self) -> None:
        self._fail += 1
        self._changed((INCR, "fail_counter"))

    def reset_counter(self) -> None:
        self._fail = 0
        self._changed((SET, "fail_counter", "0"))

    def increment_success_counter(self) -> None:
        self._success += 1
        self._changed((INCR, "success_counter"))

    def reset_success_counter(self) -> None:
        self._success = 0
        self._changed((SET, "success_counter", "0"))

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
        self._changed((SET, "opened_at", _timestamp(value)))

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


def _timestamp(value: datetime) -> str:
    return f"{value.timestamp():.6f}"
