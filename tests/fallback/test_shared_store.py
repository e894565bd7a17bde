"""The shared fallback store: workers' `SharedStore` talking to a supervisor's `StoreHost`.

First the conformance tests of ``tests/fallback/test_stores.py``, run
unchanged against a `SharedStore` whose host serves a `MemoryStore` on the
same loop (as ``test_redis_store.py`` runs them against Redis); then what
only the shared store has. Real Unix sockets in ``tmp_path`` and a real
`MemoryStore` behind the host; those tests run on asyncio's loop and on
uvloop (the sidecar's). Nothing sleeps to wait: tests await the store's own
answers or poll a condition with a deadline (`until`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from sidecar.fallback import shared_host
from sidecar.fallback import shared_wire as wire
from sidecar.fallback.shared import SharedStore
from sidecar.fallback.shared_host import StoreHost
from sidecar.fallback.store import ENTRY_OVERHEAD, CachedReply, FallbackStore, MemoryStore
from tests.fallback import test_stores as conformance
from tests.fallback.store_suite import (  # noqa: F401  (collected here, on this file's make_harness)
    test_conformance,
    test_conformance_100k_distinct_keys_stay_within_bounds,
    test_every_conformance_check_runs_here,
)

MiB = 1 << 20
Run = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture
def make_harness(tmp_path: Path) -> Iterator[Callable[..., conformance.Harness]]:
    """Like test_stores' ``make_harness``: a SharedStore, its host and MemoryStore on one loop."""
    made: list[tuple[conformance.Harness, StoreHost]] = []

    def make(
        *, ttl: float = 600.0, max_entries: int = 1000, max_bytes: int = 64 * MiB
    ) -> conformance.Harness:
        clock = conformance.FakeClock()
        path = tmp_path / f"store-{len(made)}.sock"
        target = MemoryStore(ttl=ttl, max_entries=max_entries, max_bytes=max_bytes, clock=clock)
        host = StoreHost(target, path)
        store = SharedStore(path, ttl=ttl, backend_name="memory", clock=clock)
        harness = conformance.Harness(store, clock, ENTRY_OVERHEAD)
        made.append((harness, host))
        harness.loop.run_until_complete(host.start())
        harness.loop.run_until_complete(store.start())
        return harness

    yield make
    for harness, host in made:
        harness.loop.run_until_complete(harness.store.close())
        harness.loop.run_until_complete(host.close())
        harness.close()


# -- the shared store only ------------------------------------------------------------


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's coroutine on a fresh loop of the parametrized kind."""
    factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop

    def go(coro: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(coro, 30))

    return go


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition`` on the loop until it is true; TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.005)


def memory(ttl: float = 600.0, clock: Callable[[], float] = time.time) -> MemoryStore:
    return MemoryStore(ttl=ttl, max_entries=100_000, max_bytes=256 * MiB, clock=clock)


def reply(n: int, size: int = 300, age: float = 0.0) -> CachedReply:
    message = bytes([n % 256]) * size
    return CachedReply(message, 4 + n % 7, time.time() - age, f"args-{n}".encode())


def key(n: int) -> str:
    return f"Svc:get|{n:032x}"


def worker(path: Path, **options: Any) -> SharedStore:
    settings: dict[str, Any] = {"ttl": 600.0, "backend_name": "memory"}
    settings.update(options)
    return SharedStore(path, **settings)


class HeldStore(MemoryStore):
    """A memory store some of whose calls wait until ``release`` is set (the subclass says)."""

    def __init__(self) -> None:
        super().__init__(ttl=600.0, max_entries=1000, max_bytes=64 * MiB)
        self.release = asyncio.Event()


@dataclass
class Site:
    """A host serving ``target`` at ``path``, and the workers' stores that talk to it."""

    path: Path
    target: MemoryStore
    host: StoreHost
    stores: list[SharedStore]

    @property
    def store(self) -> SharedStore:
        return self.stores[0]


@contextlib.asynccontextmanager
async def hosted(
    tmp_path: Path,
    target: MemoryStore | None = None,
    *,
    workers: int = 1,
    start: bool = True,
    **options: Any,
) -> AsyncIterator[Site]:
    """A started `StoreHost` over ``target`` (by default a fresh `memory()`) at
    ``tmp_path/store.sock`` and ``workers`` worker stores made with ``options`` (started
    unless ``start`` is false). On the way out a `HeldStore` is released, then the
    workers and the host (``site.host``, whichever it is by then) are closed."""
    path = tmp_path / "store.sock"
    target = memory() if target is None else target
    host = StoreHost(target, path)
    await host.start()
    site = Site(path, target, host, [worker(path, **options) for _ in range(workers)])
    try:
        if start:
            for store in site.stores:
                await store.start()
        yield site
    finally:
        if isinstance(target, HeldStore):
            target.release.set()
        for store in site.stores:
            await store.close()
        await site.host.close()


def test_a_shared_store_is_a_fallback_store(tmp_path: Path) -> None:
    store: FallbackStore = worker(tmp_path / "s")  # mypy checks the protocol here
    assert store.backend == "memory"
    assert store.stats().healthy is False  # not started: the host is not reached


def test_a_put_through_one_worker_is_got_by_another(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with hosted(tmp_path, workers=2) as site:
            a, b = site.stores
            sent = CachedReply(
                b"\x80\x01\x00\x02" + bytes(range(256)) * 4, 13, time.time() - 1.5, b"xy"
            )
            bare = CachedReply(b"m", 0, time.time(), b"")  # no arguments
            large = CachedReply(os.urandom(200_000), 9, time.time(), os.urandom(70_000))
            a.put(key(1), sent)
            a.put(key(2), bare)
            a.put(key(4), large)  # read by the host field by field, not whole
            await a.flush()
            got = await b.get(key(1))
            assert got is not None
            assert (got.message, got.seqid_offset, got.stored_at, got.args) == (
                sent.message,
                sent.seqid_offset,
                sent.stored_at,
                sent.args,
            )
            assert await b.get(key(2)) == bare
            assert await b.get(key(4)) == large
            assert await b.get(key(3)) is None  # unknown
            assert b.stats().missed_reads == 0  # a "none" answer is not a miss
            assert site.host.served == 2

    run(scenario())


def test_the_socket_is_private_and_removed_on_close(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        path = tmp_path / "store.sock"
        host = StoreHost(memory(), path)
        await host.start()
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode)
        assert stat.S_IMODE(mode) == 0o600
        with pytest.raises(OSError, match="already listens"):
            await StoreHost(memory(), path).start()  # a live host's socket is kept
        assert path.exists()
        await host.close()
        assert not path.exists()

    run(scenario())


def test_a_stale_socket_is_replaced_and_other_files_are_not(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        import socket

        path = tmp_path / "store.sock"
        left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        left.bind(str(path))  # a crashed host's file: bound, nobody listening
        left.close()
        host = StoreHost(memory(), path)
        await host.start()
        await host.close()

        regular = tmp_path / "not-a-socket"
        regular.write_text("keep me")
        with pytest.raises(OSError, match="in use"):
            await StoreHost(memory(), regular).start()
        assert regular.read_text() == "keep me"

    run(scenario())


def test_entries_older_than_the_ttl_are_not_returned(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        now = [time.time()]
        target = memory(ttl=600.0, clock=lambda: now[0])
        # The worker's TTL is shorter than the host's: checked there too.
        async with hosted(tmp_path, target, ttl=60.0) as site:
            store = site.store
            store.put(key(1), reply(1, age=30))
            store.put(key(2), reply(2, age=90))
            await store.flush()
            assert await store.get(key(1)) is not None
            assert await store.get(key(2)) is None  # the host has it; too old for the worker
            assert site.host.store.stats().entries == 2
            now[0] += 600  # the host's own TTL
            assert await store.get(key(1)) is None
            assert store.stats().missed_reads == 0

    run(scenario())


def test_two_workers_putting_at_once_lose_nothing(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        sent = {n: reply(n) for n in range(2000)}

        async def puts(store: SharedStore, base: int) -> None:
            for n in range(base, base + 1000):
                store.put(key(n), sent[n])
                if n % 100 == 0:
                    await asyncio.sleep(0)  # let the other worker and the writers run

        async with hosted(tmp_path, workers=2) as site:
            a, b = site.stores
            target = site.target
            await asyncio.gather(puts(a, 0), puts(b, 1000))
            await asyncio.gather(a.flush(), b.flush())
            assert target.stats().entries == 2000
            assert all(target.get_now(key(n)) == sent[n] for n in range(2000))
            assert a.stats().dropped_writes == b.stats().dropped_writes == 0
            assert a.stats().entries == 2000 or b.stats().entries == 2000  # the flush answers

    run(scenario())


class StalledStore(HeldStore):
    """A memory store whose gets wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def get(self, key: str) -> CachedReply | None:
        self.waiting += 1
        await self.release.wait()
        return self.get_now(key)


def test_a_get_from_a_stalled_host_is_a_bounded_miss(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        target = StalledStore()
        target.put(key(1), reply(1))
        async with hosted(tmp_path, target, get_timeout=0.2) as site:
            store = site.store
            started = time.monotonic()
            assert await store.get(key(1)) is None
            elapsed = time.monotonic() - started
            assert target.waiting == 1  # it reached the host's store, which stalled
            assert 0.15 <= elapsed < 1.0  # the bound, on a busy 2-core machine
            assert store.stats().missed_reads == 1
            target.release.set()  # the late answer arrives and is ignored
            assert await store.get(key(1)) == target.get_now(key(1))
            assert store.stats().missed_reads == 1

    run(scenario())


class SlowFlushStore(HeldStore):
    """A memory store whose flush waits until ``release`` is set."""

    async def flush(self) -> None:
        await self.release.wait()


def test_flush_waits_for_the_hosts_flush(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        target = SlowFlushStore()
        async with hosted(tmp_path, target) as site:
            store = site.store
            store.put(key(1), reply(1))
            flushing = asyncio.ensure_future(store.flush())
            await until(lambda: target.get_now(key(1)) is not None)  # put applied...
            await asyncio.sleep(0)
            assert not flushing.done()  # ...but the host's flush has not returned
            target.release.set()
            await flushing

    run(scenario())


def test_a_full_queue_drops_and_counts(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with hosted(tmp_path, start=False, queue_size=10) as site:
            store, target = site.store, site.target
            for n in range(15):  # not started: nothing leaves the queue
                store.put(key(n), reply(n))
            assert store.stats().dropped_writes == 5
            await store.start()
            await store.flush()
            assert [n for n in range(15) if target.get_now(key(n))] == list(range(10))
            store.put(key(20), reply(20))  # room again
            await store.flush()
            assert target.get_now(key(20)) is not None
            assert store.stats().dropped_writes == 5

    run(scenario())


def test_the_store_survives_the_host_going_away_and_coming_back(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with hosted(tmp_path, queue_size=3) as site:
            store, target = site.store, site.target
            store.put(key(1), reply(1))
            await store.flush()
            assert store.stats().healthy
            await site.host.close()
            await until(lambda: not store.stats().healthy)

            started = time.monotonic()
            assert await store.get(key(1)) is None
            assert time.monotonic() - started < 0.05  # at once, not after get_timeout
            assert store.stats().missed_reads == 1
            for n in range(2, 7):  # queued for later; the queue holds 3
                store.put(key(n), reply(n))
            assert store.stats().dropped_writes == 2

            site.host = StoreHost(target, site.path)
            await site.host.start()
            await until(lambda: store.stats().healthy)
            await store.flush()
            assert [n for n in range(2, 7) if target.get_now(key(n))] == [2, 3, 4]
            assert await store.get(key(1)) is not None
            assert store.connections == 2

    run(scenario())


BAD_FRAMES = {
    "unknown-op": wire.HEADER.pack(0, 99, 1),
    "too-large": wire.HEADER.pack(wire.MAX_FRAME_BYTES + 1, wire.GET, 1),
    "put-fields-disagree": wire.HEADER.pack(wire.PUT_HEAD.size + 3, wire.PUT, 0)
    + wire.PUT_HEAD.pack(10, 0, 0.0, 0, 0)
    + b"abc",
    "stats-with-a-body": wire.HEADER.pack(2, wire.STATS, 1) + b"xx",
    "key-not-utf8": wire.HEADER.pack(2, wire.GET, 1) + b"\xff\xfe",
}


@pytest.mark.parametrize("frame", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_a_malformed_frame_closes_only_its_connection(
    run: Run, tmp_path: Path, frame: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with hosted(tmp_path) as site:
            store = site.store
            reader, writer = await asyncio.open_unix_connection(site.path)
            writer.write(frame)
            assert await asyncio.wait_for(reader.read(), 5.0) == b""  # closed by the host
            writer.close()
            assert site.host.bad_frames == 1
            store.put(key(1), reply(1))
            await store.flush()
            assert await store.get(key(1)) is not None
            assert store.stats().healthy
            assert store.connections == 1  # never lost its own

    run(scenario())
    assert sum("closing a worker connection" in r.getMessage() for r in caplog.records) == 1


def test_stats_are_the_hosts_after_a_refresh(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        target = memory()
        for n in range(3):
            target.put(key(n), reply(n))
        async with hosted(tmp_path, target, stats_interval=0.05) as site:
            store = site.store
            await until(lambda: store.stats().entries == 3)
            for n in range(3, 8):  # behind the worker's back: only a refresh shows them
                target.put(key(n), reply(n))
            await until(lambda: store.stats().entries == 8)
            stats = store.stats()
            assert (stats.backend, stats.bytes, stats.healthy) == (
                "memory",
                target.stats().bytes,
                True,
            )

    run(scenario())


def test_close_delivers_the_puts_still_queued(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with hosted(tmp_path) as site:
            store, target = site.store, site.target
            for n in range(500):
                store.put(key(n), reply(n))
            await store.close()
            assert target.stats().entries == 500
            assert store.stats().failed_writes == 0
            assert await store.get(key(1)) is None  # closed

    run(scenario())


def test_requests_in_flight_end_when_the_host_goes_away(run: Run, tmp_path: Path) -> None:
    async def scenario() -> None:
        target = StalledStore()
        async with hosted(tmp_path, target, get_timeout=20.0) as site:
            store = site.store
            getting = asyncio.ensure_future(store.get(key(1)))
            await until(lambda: target.waiting == 1)
            started = time.monotonic()
            await site.host.close()
            assert await getting is None
            assert time.monotonic() - started < 5.0  # far less than get_timeout
            assert store.stats().missed_reads == 1

    run(scenario())


class CountingStore(MemoryStore):
    """A memory store that counts its gets."""

    def __init__(self) -> None:
        super().__init__(ttl=600.0, max_entries=1000, max_bytes=64 * MiB)
        self.gets = 0

    async def get(self, key: str) -> CachedReply | None:
        self.gets += 1
        return self.get_now(key)


def test_a_connection_that_does_not_read_its_answers_is_closed(
    run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_host, "MAX_UNREAD_BYTES", 256 << 10)

    async def scenario() -> None:
        target = CountingStore()
        target.put(key(1), CachedReply(bytes(100_000), 4, time.time(), b""))
        async with hosted(tmp_path, target) as site:
            host = site.host
            _, writer = await asyncio.open_unix_connection(site.path)
            raw_key = key(1).encode()
            for n in range(1, 500):  # 50 MB of answers, never read
                writer.write(wire.HEADER.pack(len(raw_key), wire.GET, n) + raw_key)
                await until(lambda n=n: target.gets >= n or host.bad_frames)
                if host.bad_frames:
                    break
            assert host.bad_frames == 1
            assert n < 100  # closed long before the loop ran out
            writer.close()
            assert await site.store.get(key(1)) is not None  # the reading worker is served

    run(scenario())
