"""SharedBreakerStorage: pybreaker driven through the Breaker adapter, sharing state via Redis.

Each `Node` is one sidecar's view: its own StateBackend (connection), its own
BreakerSync and a `Breaker` on a `SharedBreakerStorage`, all on one asyncio
loop. Most tests step the sync by hand (``sync_once``: write, then read) so
that what they check does not depend on timing; one runs the background task
and waits for the change to arrive.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from sidecar.fleet.breaker_storage import MIN_TTL, BreakerSync, SharedBreakerStorage, breaker_ttl
from sidecar.fleet.redis_client import StateBackend, redact_url
from sidecar.metrics import SidecarMetrics
from sidecar.resilience.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    Admission,
    Breaker,
)
from tests.support.redis import RedisServer, SilentServer, redis_keys

LONG = 3600.0
NAME = "10.0.0.1:9090"


class Node:
    """One sidecar's breaker on a shared storage."""

    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        name: str = NAME,
        fail_max: int = 3,
        reset_timeout: float = LONG,
        timeout: float = 2.0,
        refresh_interval: float = 0.05,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        self.state = StateBackend(
            url,
            timeout=timeout,
            refresh_interval=refresh_interval,
            key_prefix=prefix,
            metrics=metrics,
        )
        self.sync = BreakerSync(self.state)
        self.transitions: list[tuple[str, str]] = []
        self.storage: SharedBreakerStorage = self.sync.storage(name, reset_timeout)
        self.breaker = Breaker(
            name,
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            storage=self.storage,
            on_transition=self._seen,
            clock=time.time,
        )
        self.storage.observe(lambda: self.breaker.state)

    def _seen(self, _name: str, old: str, new: str, adopted: bool) -> None:
        # A replica counts the fleet's changes as its own (docs/fleet.md): never "adopted".
        assert not adopted
        self.transitions.append((old, new))

    def fail(self, times: int = 1) -> None:
        for _ in range(times):
            admission = self.breaker.admit()
            assert admission is not None
            self.breaker.record(admission, failed=True)

    def succeed(self) -> Admission:
        admission = self.breaker.admit()
        assert admission is not None
        self.breaker.record(admission, failed=False)
        return admission

    async def close(self) -> None:
        await self.sync.stop()
        await self.state.close()


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition`` held, polling on the loop; fails after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def test_two_breakers_converge_open_half_open_closed(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    async def scenario() -> None:
        a, b = Node(shared_redis.url, key_prefix), Node(shared_redis.url, key_prefix)
        try:
            await a.sync.sync_once()
            await b.sync.sync_once()
            a.fail(3)
            assert a.breaker.state == STATE_OPEN
            await a.sync.sync_once()
            assert b.breaker.state == STATE_CLOSED  # nothing read yet
            await b.sync.sync_once()
            assert b.breaker.state == STATE_OPEN
            assert b.breaker.admit() is None  # obeyed
            assert b.transitions == [(STATE_CLOSED, STATE_OPEN)]  # B's listener fired
            assert a.breaker.opened_at is not None
            assert b.breaker.opened_at is not None
            # Sub-second precision, not pybreaker's whole seconds.
            skew = abs((a.breaker.opened_at - b.breaker.opened_at).total_seconds())
            assert skew < 2e-6
            # A probes: half-open propagates.
            a.breaker.configure(
                fail_max=3, reset_timeout=0.0, success_threshold=1, half_open_max_calls=1
            )
            probe = a.breaker.admit()
            assert probe is Admission.PROBE
            await a.sync.sync_once()
            await b.sync.sync_once()
            assert b.breaker.state == STATE_HALF_OPEN
            # The probe succeeds: the close propagates.
            a.breaker.record(probe, failed=False)
            assert a.breaker.state == STATE_CLOSED
            await a.sync.sync_once()
            await b.sync.sync_once()
            assert b.breaker.state == STATE_CLOSED
            assert b.breaker.admit() is Admission.CLOSED
            assert b.transitions == [
                (STATE_CLOSED, STATE_OPEN),
                (STATE_OPEN, STATE_HALF_OPEN),
                (STATE_HALF_OPEN, STATE_CLOSED),
            ]
            assert a.transitions == b.transitions
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_the_background_task_brings_a_change_within_a_refresh_interval(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    interval = 0.1

    async def scenario() -> tuple[float, float]:
        a = Node(shared_redis.url, key_prefix, refresh_interval=interval)
        b = Node(shared_redis.url, key_prefix, refresh_interval=interval)
        await a.sync.start()
        await b.sync.start()
        try:
            a.fail(3)
            opened = await poll(lambda: b.breaker.state == STATE_OPEN, 5.0, "B open")
            a.breaker.force_close()
            closed = await poll(lambda: b.breaker.state == STATE_CLOSED, 5.0, "B closed")
            assert b.transitions == [(STATE_CLOSED, STATE_OPEN), (STATE_OPEN, STATE_CLOSED)]
            return opened, closed
        finally:
            await a.close()
            await b.close()

    opened, closed = run(scenario())
    print(
        f"\nrefresh interval {interval * 1e3:.0f} ms: B saw the open after "
        f"{opened * 1e3:.0f} ms, the close after {closed * 1e3:.0f} ms"
    )


def test_consecutive_failures_are_counted_across_the_fleet(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    async def scenario() -> None:
        a, b = Node(shared_redis.url, key_prefix), Node(shared_redis.url, key_prefix)
        try:
            a.fail(2)
            await a.sync.sync_once()
            b.fail(1)  # B has seen one failure; the fleet three
            assert b.breaker.fail_counter == 1
            await b.sync.sync_once()  # HINCRBY answers 3: B adopts the fleet's count
            assert b.breaker.fail_counter == 3
            assert b.breaker.state == STATE_CLOSED
            b.fail(1)  # the next failure anywhere opens
            assert b.breaker.state == STATE_OPEN
            await b.sync.sync_once()
            await a.sync.sync_once()
            assert a.breaker.state == STATE_OPEN
            # A success resets the fleet's count.
            a.breaker.force_close()
            a.fail(1)
            a.succeed()
            await a.sync.sync_once()
            with shared_redis.client() as client:
                assert client.hget(a.storage.key, "fail_counter") == b"0"
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_keys_ttl_names_and_two_breakers_never_collide(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    names = [NAME, NAME + "/getItem", "10.0.0.1:909", "[::1]:9090,10.0.0.2:9090"]

    async def scenario() -> None:
        nodes = [Node(shared_redis.url, key_prefix, name=n, reset_timeout=1000.0) for n in names]
        try:
            nodes[0].fail(3)  # only the first opens
            for node in nodes[1:]:
                node.fail(1)
            for node in nodes:
                await node.sync.sync_once()
            others = [Node(shared_redis.url, key_prefix, name=n) for n in names]
            for other in others:
                await other.sync.sync_once()
            states = [o.breaker.state for o in others]
            counts = [o.breaker.fail_counter for o in others]
            for other in others:
                await other.close()
            assert states == [STATE_OPEN, STATE_CLOSED, STATE_CLOSED, STATE_CLOSED]
            assert counts[1:] == [1, 1, 1]
        finally:
            for node in nodes:
                await node.close()

    run(scenario())
    keys = redis_keys(shared_redis, f"{key_prefix}:*")
    print("\n" + "\n".join(f"{k} ttl {ttl / 1000:.0f}s" for k, ttl in sorted(keys.items())))
    assert sorted(keys) == sorted(f"{key_prefix}:breaker:{{{n}}}" for n in names)
    assert breaker_ttl(1000.0) == 10_000.0
    assert breaker_ttl(1.0) == MIN_TTL
    assert all(9_990_000 < ttl <= 10_000_000 for ttl in keys.values()), keys
    with shared_redis.client() as client:
        fields = client.hgetall(f"{key_prefix}:breaker:{{{NAME}}}")
    assert fields[b"state"] == b"open"
    assert b"." in fields[b"opened_at"]


def test_a_hung_redis_never_blocks_admit_or_record(key_prefix: str) -> None:
    """Redis accepts connections and never answers; admit/record stay microseconds."""
    timeout = 0.2
    with SilentServer() as silent:

        async def scenario() -> tuple[float, int, int, StateBackend]:
            node = Node(silent.url, key_prefix, timeout=timeout, refresh_interval=0.05)
            started = time.monotonic()
            await node.sync.start()  # the initial read waits for the timeout, once
            start_took = time.monotonic() - started
            assert start_took < timeout + 1.0
            slowest = 0.0
            calls = 0
            deadline = time.monotonic() + 1.5
            try:
                while time.monotonic() < deadline:
                    t0 = time.perf_counter()
                    admission = node.breaker.admit()
                    if admission is not None:
                        node.breaker.record(admission, failed=calls % 7 == 0)
                    slowest = max(slowest, time.perf_counter() - t0)
                    calls += 1
                    if calls % 3 == 0:
                        node.breaker.force_close()  # more state changes to write
                    await asyncio.sleep(0.001)  # let the sync task run (and wait on Redis)
            finally:
                await node.close()
            return slowest, calls, node.state.errors, node.state

        slowest, calls, errors, state = run(scenario())
        print(
            f"\nhung Redis: {calls} admit/record pairs, slowest {slowest * 1e6:.0f} us; "
            f"{errors} Redis operations timed out ({timeout * 1e3:.0f} ms each) meanwhile"
        )
        assert errors >= 4  # the sync task kept trying during the measurement
        assert state.up is False
        assert slowest < timeout / 4  # one wait on Redis would take the whole timeout
        assert silent.accepted


def test_redis_down_then_restarted_empty_resynchronises(
    redis_server_fixture: RedisServer, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_fixture
    caplog.set_level(logging.INFO, logger="sidecar.fleet")
    metrics = SidecarMetrics()

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value("thrift_sidecar_" + name, labels)

    async def scenario() -> None:
        a = Node(server.url, key_prefix, timeout=0.3, metrics=metrics)
        b = Node(server.url, key_prefix, timeout=0.3)
        c = Node(server.url, key_prefix, timeout=0.3)
        try:
            for node in (a, b, c):
                await node.sync.sync_once()
            assert sample("state_backend_up") == 1
            server.stop()
            # Local state goes on: A opens on its own failures while Redis is away.
            a.fail(3)
            assert a.breaker.state == STATE_OPEN
            for _ in range(5):  # several rounds fail; one log line for the change
                for node in (a, b, c):
                    await node.sync.sync_once()
            assert a.state.up is False
            assert sample("state_backend_up") == 0
            errors = sample("state_backend_errors_total", operation="breaker_read") or 0
            assert errors >= 5
            assert b.breaker.state == STATE_CLOSED
            server.start()  # empty
            # B reads first: Redis has nothing, B fills in its (closed) state...
            await b.sync.sync_once()
            await b.sync.sync_once()
            # ...which A's open state, changed during the outage, overwrites.
            await a.sync.sync_once()
            for node in (b, c):
                await node.sync.sync_once()
            assert [n.breaker.state for n in (a, b, c)] == [STATE_OPEN] * 3
            assert sample("state_backend_up") == 1
        finally:
            for node in (a, b, c):
                await node.close()

    run(scenario())
    down = [r for r in caplog.records if "unreachable" in r.getMessage()]
    back = [r for r in caplog.records if "answers again" in r.getMessage()]
    assert len(down) == 3  # one per node (three connections), not one per operation
    assert len(back) == 3
    assert all(server.url.split("//")[1].split("/")[0] in r.getMessage() for r in down)


def test_redis_answers_again_without_a_restart_changes_made_meanwhile_win(
    redis_server_fixture: RedisServer, key_prefix: str
) -> None:
    """The other order: Redis kept the old (closed) state; A's newer open state wins."""
    server = redis_server_fixture

    async def scenario() -> None:
        a = Node(server.url, key_prefix, timeout=0.3)
        b = Node(server.url, key_prefix, timeout=0.3)
        try:
            await a.sync.sync_once()
            await b.sync.sync_once()
            with server.client() as client:  # what A can no longer reach
                client.execute_command("CLIENT", "PAUSE", "1000", "ALL")
            a.fail(3)
            await a.sync.sync_once()  # times out: Redis is paused
            assert a.state.up is False
            with server.client() as client:
                client.execute_command("CLIENT", "UNPAUSE")
            await a.sync.sync_once()
            await b.sync.sync_once()
            assert (a.breaker.state, b.breaker.state) == (STATE_OPEN, STATE_OPEN)
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_redact_url_drops_the_password() -> None:
    assert redact_url("redis://:secret@10.0.0.5:6380/2") == "redis://10.0.0.5:6380/2"
    assert redact_url("rediss://app:secret@h:6379/0?x=1") == "rediss://app@h:6379/0"
    assert redact_url("redis://[::1]:6379/0") == "redis://[::1]:6379/0"
