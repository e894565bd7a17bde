"""The Redis connection a fleet shares, and whether Redis is answering.

`StateBackend` owns one ``redis.asyncio`` client (a connection pool) for the
breaker storage and the fallback cache of one sidecar. Every operation goes
through `StateBackend.call`: bounded by ``state.timeout``, with no retries of
its own; a failure is counted (``state_backend_errors_total{operation}``) and
raised as `BackendUnavailable`. ``up`` is True while operations succeed, False
after one failed (a Redis error answer does not count: Redis answered), None
before the first; one log line per change, never one per call. Callers skip
Redis while it is down; background writers try it once per refresh interval.

Why: docs/fleet.md ("The Redis connection").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from sidecar.metrics import SidecarMetrics

log = logging.getLogger("sidecar.fleet")

T = TypeVar("T")

# Label values of state_backend_errors_total{operation}.
BREAKER_WRITE = "breaker_write"
BREAKER_READ = "breaker_read"
CACHE_READ = "cache_read"
CACHE_WRITE = "cache_write"
OPERATIONS = (BREAKER_WRITE, BREAKER_READ, CACHE_READ, CACHE_WRITE)

# Connections in the pool: the breaker sync task and the cache writer use one
# each; cache reads are limited to `MAX_CONCURRENT_READS` by the store, so
# redis-py's own limit ("Too many connections") is never what refuses a read.
MAX_CONCURRENT_READS = 32
POOL_SIZE = MAX_CONCURRENT_READS + 4


class BackendUnavailable(Exception):
    """A Redis operation failed or took longer than ``state.timeout``."""


def redact_url(url: str) -> str:
    """The URL without its password or query (``redis://user@host:6379/0``), for /state and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class StateBackend:
    """One Redis for a sidecar's shared state; see the module docstring and docs/fleet.md.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` URL (``state.redis_url``).
        timeout: seconds one operation may take (``state.timeout``).
        refresh_interval: seconds between reads of the shared breaker state.
        key_prefix: first part of every key written (``state.key_prefix``).
        metrics: where errors and up/down are counted; None in unit tests.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        refresh_interval: float,
        key_prefix: str,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.url = redact_url(url)
        self.timeout = timeout
        self.refresh_interval = refresh_interval
        self.key_prefix = key_prefix
        self._metrics = metrics
        # Socket timeouts are a backstop only: `call` bounds each operation.
        socket_timeout = max(timeout * 4, 1.0)
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=POOL_SIZE,
            health_check_interval=0,
        )
        self.up: bool | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.changed_at: float | None = None
        self._next_probe = 0.0  # monotonic time a caller may try a Redis known to be down
        if metrics is not None:
            for operation in OPERATIONS:
                metrics.state_backend_errors.labels(operation)

    def key(self, *parts: str) -> str:
        """``{key_prefix}:part:part...``."""
        return ":".join((self.key_prefix, *parts))

    def may_try(self) -> bool:
        """Should a background writer try Redis now?

        Yes while Redis is not known to be down; when it is, once per
        ``refresh_interval`` (that attempt is the probe that notices it is
        back). Client-facing reads do not probe: they skip Redis while it is
        down.
        """
        if self.up is not False:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + self.refresh_interval
        return True

    async def call(self, operation: str, command: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation within ``timeout``.

        Args:
            operation: the label it is counted under when it fails (`OPERATIONS`).
            command: makes the awaitable (a client command, ``pipeline.execute``).

        Raises:
            BackendUnavailable: it failed or timed out (already counted and logged).
        """
        # The command runs as a task of its own and is cancelled when late, rather
        # than under asyncio.timeout: in Python 3.11 that can swallow a
        # cancellation of the caller arriving as the deadline expires.
        task: asyncio.Future[T] = asyncio.ensure_future(command())
        try:
            done, _ = await asyncio.wait([task], timeout=self.timeout)
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_retrieve)
            raise
        try:
            if not done:
                task.cancel()  # redis-py drops a connection whose command was cancelled
                task.add_done_callback(_retrieve)
                raise TimeoutError(f"no answer within {self.timeout:g}s")
            result = task.result()
        except ResponseError as exc:  # Redis answered: an error, not an outage
            self._count(operation, exc)
            raise BackendUnavailable(str(exc)) from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self._count(operation, exc)
            self._set_up(False, exc)
            raise BackendUnavailable(str(exc) or type(exc).__name__) from exc
        self._set_up(True, None)
        return result

    def _count(self, operation: str, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{operation}: {_describe(exc)}"
        self.last_error_at = time.time()
        if self._metrics is not None:
            self._metrics.state_backend_errors.labels(operation).inc()

    def _set_up(self, up: bool, exc: BaseException | None) -> None:
        if self.up is up:
            return
        before = self.up
        self.up = up
        self._next_probe = time.monotonic() + self.refresh_interval
        self.changed_at = time.time()
        if self._metrics is not None:
            self._metrics.state_backend_up.set(1 if up else 0)
        if up:
            if before is None:
                log.info("shared state: connected to %s", self.url)
            else:
                log.info("shared state: %s answers again; resynchronising breaker state", self.url)
        else:
            log.warning(
                "shared state: %s unreachable (%s); carrying on with local state "
                "(logged again when it answers)",
                self.url,
                _describe(exc) if exc is not None else "?",
            )

    def describe(self) -> dict[str, Any]:
        """Figures for ``/state``."""
        return {
            "backend": "redis",
            "url": self.url,
            "up": self.up,
            "errors_total": self.errors,
            "last_error": self.last_error,
            "last_error_at": _iso(self.last_error_at),
            "since": _iso(self.changed_at),
            "timeout_seconds": self.timeout,
            "refresh_interval_seconds": self.refresh_interval,
            "key_prefix": self.key_prefix,
        }

    async def close(self) -> None:
        """Close every connection of the pool."""
        await self.client.aclose()


async def stop_task(task: asyncio.Task[None], limit: float = 5.0) -> None:
    """Cancel a background task and wait for it to end, cancelling again if need be.

    In Python 3.11 ``asyncio.timeout`` and ``wait_for`` can swallow a
    cancellation that arrives as their deadline expires (it becomes a
    TimeoutError that the task handles as a Redis failure, and it carries on;
    seen here before `StateBackend.call` stopped using them, and library code
    may still do it), so one ``cancel()`` is not always enough. Gives up after
    ``limit`` seconds.
    """
    deadline = time.monotonic() + limit
    while not task.done() and time.monotonic() < deadline:
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning("background task %s ended with %r", task.get_name(), task.exception())
    elif not task.done():
        log.warning("background task %s did not stop within %gs", task.get_name(), limit)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned command's outcome as seen (no "never retrieved" warnings)."""
    if not task.cancelled():
        task.exception()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"
