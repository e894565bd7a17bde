"""Fleet mode: sidecars in front of the same upstream share state through Redis.

``state.redis_url`` turns it on. Then every breaker uses a
`SharedBreakerStorage` (`breaker_storage`), kept in sync with Redis by a
background task, and with ``fallback.cache.backend: redis`` the fallback cache
is a `sidecar.fallback.redis.RedisStore`, shared by the fleet. Nothing on a
call's path awaits Redis except a fallback lookup that missed the local cache,
bounded by ``state.timeout``; when Redis is away the sidecar carries on with
local state (`redis_client`).

`Fleet` is what the app holds: the Redis connection (`StateBackend`) and the
breaker sync task, started and stopped with the sidecar. The Redis client is
imported only when fleet mode is on (it adds about 0.1 s to start-up).
Why and how: docs/fleet.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics

if TYPE_CHECKING:
    from sidecar.fleet.breaker_storage import SharedBreakerStorage
    from sidecar.fleet.redis_client import StateBackend

__all__ = ["Fleet", "make_fleet"]


class Fleet:
    """The shared state of one sidecar: its Redis connection and breaker sync task."""

    def __init__(self, backend: StateBackend) -> None:
        from sidecar.fleet.breaker_storage import BreakerSync

        self.backend = backend
        self.breakers = BreakerSync(backend)

    def breaker_storage(self, name: str, reset_timeout: float) -> SharedBreakerStorage:
        """The pybreaker storage for breaker ``name``."""
        return self.breakers.storage(name, reset_timeout)

    async def start(self) -> None:
        """Read the shared breaker state once (bounded), then keep it in sync."""
        await self.breakers.start()

    async def stop(self) -> None:
        """Write what is pending (bounded), stop the task, close the connections."""
        try:
            await self.breakers.stop()
        finally:
            await self.backend.close()

    def describe(self) -> dict[str, Any]:
        """The ``shared_state`` part of ``/state``."""
        return {
            **self.backend.describe(),
            "enabled": True,
            "breaker_reads": self.breakers.reads,
            "breaker_writes": self.breakers.writes,
            "breaker_states_adopted": self.breakers.adopted,
            "breakers": self.breakers.describe(),
        }


def make_fleet(config: SidecarConfig, metrics: SidecarMetrics | None = None) -> Fleet | None:
    """The fleet's shared state when ``state.redis_url`` is set, else None (local mode)."""
    state = config.state
    if state.redis_url is None:
        return None
    from sidecar.fleet.redis_client import StateBackend

    backend = StateBackend(
        state.redis_url,
        timeout=state.timeout,
        refresh_interval=state.refresh_interval,
        key_prefix=state.key_prefix,
        metrics=metrics,
    )
    return Fleet(backend)
