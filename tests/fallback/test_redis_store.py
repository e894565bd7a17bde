"""The Redis fallback store: the stores' conformance tests, then what only Redis has.

The conformance tests are those of ``tests/fallback/test_stores.py``, run
here unchanged against `RedisStore` (each function that takes
``make_harness`` is called with a harness that builds Redis stores on a fake
clock). Redis-only: a reply put through one store is served by another (two
sidecars), two upstreams never share entries, every key has a TTL, Redis
down or hung (puts never block, reads are bounded misses, recovery), the
queue bound, the value layout, and the memory an entry really takes in Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sidecar.fallback import redis as redis_module
from sidecar.fallback.redis import RedisStore, decode_value, encode_value
from sidecar.fallback.store import CachedReply
from sidecar.fleet.redis_client import StateBackend
from tests.fallback import test_stores as conformance
from tests.fallback.store_suite import (  # noqa: F401  (collected here, on this file's make_harness)
    test_conformance,
    test_conformance_100k_distinct_keys_stay_within_bounds,
    test_every_conformance_check_runs_here,
)
from tests.support.redis import RedisServer, SilentServer, redis_keys

MiB = 1 << 20
T0 = conformance.T0
UPSTREAM = "127.0.0.1:9091"
key = conformance.key
message = conformance.message


def backend(url: str, prefix: str, timeout: float = 2.0) -> StateBackend:
    """A StateBackend; the generous default timeout is for a shared, busy machine."""
    return StateBackend(url, timeout=timeout, refresh_interval=0.1, key_prefix=prefix)


@pytest.fixture
def make_harness(
    shared_redis: RedisServer, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., conformance.Harness]]:
    """Like test_stores' ``make_harness``, for Redis stores (each under a prefix of its own)."""
    # Registered for the checks that look a backend's name up (the stores are made below).
    monkeypatch.setitem(
        conformance.BACKENDS,
        "redis",
        conformance.Backend(lambda *a, **k: None, redis_module.ENTRY_OVERHEAD),
    )
    made: list[conformance.Harness] = []
    numbers = itertools.count()

    def make(
        *, ttl: float = 600.0, max_entries: int = 1000, max_bytes: int = 64 * MiB
    ) -> conformance.Harness:
        clock = conformance.FakeClock()
        state = backend(shared_redis.url, f"{key_prefix}-{next(numbers)}")
        store = RedisStore(
            state,
            namespace=UPSTREAM,
            ttl=ttl,
            max_entries=max_entries,
            max_bytes=max_bytes,
            clock=clock,
            owns_state=True,
        )
        harness = conformance.Harness(store, clock, redis_module.ENTRY_OVERHEAD)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


# -- Redis only -----------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def store_on(state: StateBackend, **kwargs: Any) -> RedisStore:
    options: dict[str, Any] = {
        "namespace": UPSTREAM,
        "ttl": 600.0,
        "max_entries": 1000,
        "max_bytes": 64 * MiB,
        "owns_state": True,
    }
    options.update(kwargs)
    return RedisStore(state, **options)


def test_a_reply_put_through_one_sidecar_is_served_by_another(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    async def scenario() -> None:
        a = store_on(backend(shared_redis.url, key_prefix))
        b = store_on(backend(shared_redis.url, key_prefix))
        try:
            reply = CachedReply(message(7, 300), 4, time.time() - 30)
            a.put(key(7), reply)
            await a.flush()
            assert b.stats().entries == 0  # b has seen nothing: L1 empty, no batch yet
            got = await b.get(key(7))
            assert got == reply
            assert await b.get(key(8)) is None
            await b.flush()  # b's touch: b's figures are now the shared ones
            assert (b.stats().entries, b.stats().bytes) == (1, a.stats().bytes)
        finally:
            await a.close()
            await b.close()

    run(scenario())


def test_two_upstreams_never_share_entries(shared_redis: RedisServer, key_prefix: str) -> None:
    """Same method, same arguments, two upstreams: two entries, each served to its own."""

    async def scenario() -> None:
        one = store_on(backend(shared_redis.url, key_prefix), namespace="10.0.0.1:9090")
        two = store_on(backend(shared_redis.url, key_prefix), namespace="10.0.0.1:909")
        try:
            one.put(key(1), CachedReply(message(1), 4, time.time()))
            two.put(key(1), CachedReply(message(2), 4, time.time()))
            await one.flush()
            await two.flush()
            fresh_one = store_on(backend(shared_redis.url, key_prefix), namespace="10.0.0.1:9090")
            fresh_two = store_on(backend(shared_redis.url, key_prefix), namespace="10.0.0.1:909")
            got_one, got_two = await fresh_one.get(key(1)), await fresh_two.get(key(1))
            await fresh_one.close()
            await fresh_two.close()
            assert got_one is not None
            assert got_two is not None
            assert (got_one.message, got_two.message) == (message(1), message(2))
            assert (one.stats().entries, two.stats().entries) == (1, 1)
        finally:
            await one.close()
            await two.close()

    run(scenario())
    keys = redis_keys(shared_redis, f"{key_prefix}:*")
    print("\n" + "\n".join(sorted(keys)))
    assert len(keys) == 8  # per upstream: the entry, index, sizes, meta
    for tag in ("{10.0.0.1:9090}", "{10.0.0.1:909}"):
        assert sum(tag in k for k in keys) == 4


def test_every_key_has_a_ttl_and_an_entry_expires_when_its_reply_is_ttl_old(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    ttl = 600.0

    async def scenario() -> None:
        store = store_on(backend(shared_redis.url, key_prefix), ttl=ttl)
        try:
            store.put(key(1), CachedReply(message(1), 4, time.time() - 100))  # 100 s old
            for n in range(2, 20):
                store.put(key(n), CachedReply(message(n), 4, time.time()))
            await store.flush()
            store._l1._entries.clear()  # read back through Redis: touches
            for n in range(1, 25):
                await store.get(key(n))
            await store.flush()
        finally:
            await store.close()

    run(scenario())
    keys = redis_keys(shared_redis, f"{key_prefix}:*")
    assert len(keys) == 19 + 3
    assert all(0 < pttl <= ttl * 1000 for pttl in keys.values()), keys
    old = next(pttl for k, pttl in keys.items() if k.endswith(key(1)))
    assert old <= (ttl - 100) * 1000  # Redis drops it when the reply is ttl old


def test_redis_down_puts_never_block_reads_miss_at_once_then_it_recovers(
    redis_server_fixture: RedisServer, key_prefix: str
) -> None:
    server = redis_server_fixture
    state = backend(server.url, key_prefix, timeout=0.5)

    async def scenario() -> None:
        store = store_on(state)
        try:
            store.put(key(1), CachedReply(message(1), 4, time.time()))
            await store.flush()
            assert store.stats().healthy
            server.stop()
            # A local hit never touches Redis.
            assert await store.get(key(1)) is not None
            # The first write finds Redis gone; then writes and reads skip it.
            store.put(key(2), CachedReply(message(2), 4, time.time()))
            await store.flush()
            assert state.up is False
            assert not store.stats().healthy
            slowest_put = slowest_get = 0.0
            for n in range(3, 200):
                started = time.perf_counter()
                store.put(key(n), CachedReply(message(n), 4, time.time()))
                slowest_put = max(slowest_put, time.perf_counter() - started)
                started = time.perf_counter()
                assert await store.get(key(10_000 + n)) is None
                slowest_get = max(slowest_get, time.perf_counter() - started)
            await store.flush()
            stats = store.stats()
            print(
                f"\nRedis down: slowest put {slowest_put * 1e6:.0f} us, slowest get "
                f"{slowest_get * 1e6:.0f} us; failed writes {stats.failed_writes}, "
                f"missed reads {stats.missed_reads}, backend errors {state.errors}"
            )
            assert stats.missed_reads == 197
            assert stats.failed_writes >= 2
            assert state.errors >= 1
            assert slowest_get < state.timeout  # none of them waited for Redis
            server.start()

            async def written_again() -> bool:
                store.put(key(500), CachedReply(message(500), 4, time.time()))
                await store.flush()
                return store.stats().healthy

            deadline = time.monotonic() + 10
            while not await written_again():
                assert time.monotonic() < deadline, "Redis back, but the store never wrote again"
                await asyncio.sleep(0.05)
            assert state.up is True
            other = store_on(backend(server.url, key_prefix))
            got = await other.get(key(500))
            await other.close()
            assert got is not None
        finally:
            await store.close()

    run(scenario())


def test_hung_redis_bounds_reads_by_the_timeout_and_never_blocks_puts(key_prefix: str) -> None:
    timeout = 0.2
    with SilentServer() as silent:
        state = backend(silent.url, key_prefix, timeout=timeout)

        async def scenario() -> tuple[float, float]:
            store = store_on(state)
            try:
                started = time.perf_counter()
                assert await store.get(key(1)) is None
                first = time.perf_counter() - started
                started = time.perf_counter()
                assert await store.get(key(2)) is None  # known down now: no wait at all
                second = time.perf_counter() - started
                slowest_put = 0.0
                for n in range(100):
                    started = time.perf_counter()
                    store.put(key(n), CachedReply(message(n), 4, time.time()))
                    slowest_put = max(slowest_put, time.perf_counter() - started)
                await store.flush()
                print(
                    f"\nhung Redis: first read {first * 1e3:.0f} ms (timeout "
                    f"{timeout * 1e3:.0f} ms), next read {second * 1e6:.0f} us, slowest put "
                    f"{slowest_put * 1e6:.0f} us"
                )
                assert timeout * 0.9 <= first < timeout + 1.0
                assert store.stats().missed_reads == 2
                assert state.up is False
                return second, slowest_put
            finally:
                await store.close()

        second, slowest_put = run(scenario())
        assert second < timeout / 2
        assert slowest_put < timeout / 2
        assert silent.accepted  # it really was connected to, and said nothing


def test_full_queue_drops_new_keys_and_counts(shared_redis: RedisServer, key_prefix: str) -> None:
    store = store_on(backend(shared_redis.url, key_prefix), queue_size=8)
    for n in range(20):  # no loop running: nothing is written yet
        store.put(key(n), CachedReply(message(n), 4, time.time()))
    store.put(key(3), CachedReply(message(99), 4, time.time()))  # a queued key still updates
    assert store.pending_writes() == 8
    assert store.stats().dropped_writes == 12

    async def scenario() -> None:
        await store.flush()
        assert store.stats().entries == 8
        store._l1._entries.clear()
        got = await store.get(key(3))
        assert got is not None
        assert got.message == message(99)
        assert await store.get(key(15)) is None
        await store.close()

    run(scenario())


def test_value_layout_round_trip_and_foreign_values_are_misses(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    args = b"\x0a\x00\x01" + (5).to_bytes(8, "big") + b"\x00"
    reply = CachedReply(message(5, 100), 4, 1_700_000_000.123456, args)
    raw = encode_value(reply)
    assert len(raw) == 17 + len(args) + 100
    assert decode_value(raw) == reply
    assert decode_value(encode_value(reply._replace(args=b""))) == reply._replace(args=b"")
    assert decode_value(b"\x01" + raw[1:]) is None  # another layout (1: no arguments kept)
    assert decode_value(raw[:16]) is None
    assert decode_value(raw[:17] + args[:-1]) is None  # cut inside the arguments

    async def scenario() -> None:
        store = store_on(backend(shared_redis.url, key_prefix))
        try:
            with shared_redis.client() as client:
                client.set(store.entry_prefix + key(1), b"not a reply", px=60_000)
            assert await store.get(key(1)) is None
            await store.flush()
            with shared_redis.client() as client:
                assert not client.exists(store.entry_prefix + key(1))
        finally:
            await store.close()

    run(scenario())


def test_memory_an_entry_takes_in_redis_is_what_entry_overhead_counts(
    redis_server_fixture: RedisServer, key_prefix: str
) -> None:
    """ENTRY_OVERHEAD (what stats and max_bytes count) is not an underestimate, within 10%.

    On a Redis of its own: the keys other tests leave in a shared one move the
    points where Redis grows its keyspace tables, and with them the figure.
    """
    n, size = 5000, 300
    server = redis_server_fixture

    async def scenario() -> float:
        store = store_on(backend(server.url, "thrift-sidecar-" + key_prefix), max_entries=n)
        try:
            with server.client() as client:
                before = client.info("memory")["used_memory"]
            for start in range(0, n, 1000):
                for i in range(start, start + 1000):
                    store.put(key(i), CachedReply(message(i, size), 4, time.time()))
                await store.flush()
            with server.client() as client:
                after = client.info("memory")["used_memory"]
            assert store.stats().entries == n
            return (after - before) / n - len(key(0)) - size
        finally:
            await store.close()

    per_entry = run(scenario())
    print(
        f"\nRedis memory per entry beyond key and message: {per_entry:.0f} B "
        f"(ENTRY_OVERHEAD {redis_module.ENTRY_OVERHEAD})"
    )
    assert per_entry <= redis_module.ENTRY_OVERHEAD * 1.1


def test_a_steady_reply_is_written_once_per_rewrite_interval(
    shared_redis: RedisServer, key_prefix: str
) -> None:
    """A hot call whose answer does not change costs one Redis write per interval."""
    clock = conformance.FakeClock()

    def reply(seqid: int, body: bytes = b"steady") -> CachedReply:
        msg = b"\x80\x01\x00\x02\x00\x00\x00\x07getItem" + seqid.to_bytes(4, "big") + body
        return CachedReply(msg, 15, clock.now)

    async def scenario() -> None:
        store = store_on(backend(shared_redis.url, key_prefix), clock=clock)
        try:
            store.put(key(1), reply(1))
            await store.flush()
            first = store.batches
            for seqid in range(2, 102):  # the same answer, other seqids, 0.5 s later
                clock.now = T0 + 0.5
                store.put(key(1), reply(seqid))
            await store.flush()
            assert (store.batches, store.skipped_writes) == (first, 100)
            got = await store.get(key(1))
            assert got is not None
            assert got.stored_at == T0  # L1 keeps the copy Redis has
            store.put(key(1), reply(200, b"changed"))  # a new answer is written at once
            await store.flush()
            assert store.batches == first + 1  # (the get's touch went with it)
            clock.now = T0 + 1.6  # past the interval: the steady answer is written again
            store.put(key(1), reply(300, b"changed"))
            await store.flush()
            assert store.batches == first + 2
            store._l1._entries.clear()
            got = await store.get(key(1))
            assert got is not None
            assert got.stored_at == T0 + 1.6
        finally:
            await store.close()

    run(scenario())
