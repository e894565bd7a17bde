"""Breaker state shared by a fleet through Redis, without I/O on the hot path.

`SharedBreakerStorage` (`sidecar.fleet.shared_breaker`) is the pybreaker
storage every breaker uses in fleet mode: local fields only, changes queued.
`BreakerSync` (`sidecar.fleet.breaker_sync`) is the one task per sidecar that
writes the changes of every breaker in one MULTI/EXEC and reads the fleet's
state back every ``state.refresh_interval``. One hash per breaker,
``{key_prefix}:breaker:{<name>}``, with a TTL (`breaker_ttl`). This module
re-exports both. Why not pybreaker's ``CircuitRedisStorage``, the write and
read rounds, the keys and the failure behaviour: docs/fleet.md.
"""

from sidecar.fleet.breaker_sync import WRITE_GAP, BreakerSync
from sidecar.fleet.shared_breaker import (
    MAX_OPS,
    MIN_TTL,
    STATES,
    TTL_RESET_TIMEOUTS,
    SharedBreakerStorage,
    SharedState,
    breaker_ttl,
)

__all__ = [
    "MAX_OPS",
    "MIN_TTL",
    "STATES",
    "TTL_RESET_TIMEOUTS",
    "WRITE_GAP",
    "BreakerSync",
    "SharedBreakerStorage",
    "SharedState",
    "breaker_ttl",
]
