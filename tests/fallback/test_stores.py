"""Every fallback store backend passes the same tests; then what only SQLite has.

The conformance tests take the `store` fixture, parametrized over `BACKENDS`.
A new backend (Redis) joins them with one entry there: a factory that builds
the store on a fake clock, and its per-entry cost (what it counts against
``max_bytes``). Every backend's ``flush`` makes earlier puts (and the LRU
touches of earlier gets) visible, so the tests ``settle()`` after writing
instead of waiting.

Figures worth reporting (memory growth, file size) are printed; ``pytest -s``
shows them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import queue
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from sidecar.errors import ConfigError
from sidecar.fallback import sqlite as sqlite_module
from sidecar.fallback.key import cache_key
from sidecar.fallback.sqlite import SqliteStore
from sidecar.fallback.sqlite_file import open_file
from sidecar.fallback.sqlite_writer import PUT, STOP, TOUCH, Op, SqliteWriter
from sidecar.fallback.store import (
    ENTRY_OVERHEAD,
    CachedReply,
    FallbackStore,
    MemoryStore,
    StoreStats,
)
from tests.support.wait import wait_until

MiB = 1 << 20
T0 = 1_700_000_000.0


class FakeClock:
    """Unix time that moves only when told."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Backend:
    """How to build one backend for the conformance tests."""

    make: Callable[..., FallbackStore]
    overhead: int  # bytes counted per entry on top of key, message and arguments


BACKENDS: dict[str, Backend] = {
    "memory": Backend(
        lambda tmp, clock, **bounds: MemoryStore(clock=clock, **bounds), ENTRY_OVERHEAD
    ),
    "sqlite": Backend(
        lambda tmp, clock, **bounds: SqliteStore(tmp / "fallback.db", clock=clock, **bounds),
        sqlite_module.ROW_OVERHEAD,
    ),
}


@dataclass
class Harness:
    """A store driven from synchronous test code on one event loop."""

    store: FallbackStore
    clock: FakeClock
    overhead: int
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def put(
        self, key: str, message: bytes, stored_at: float | None = None, args: bytes = b""
    ) -> None:
        at = self.clock.now if stored_at is None else stored_at
        self.store.put(key, CachedReply(message, 4, at, args))

    def get(self, key: str) -> CachedReply | None:
        return self.loop.run_until_complete(self.store.get(key))

    def settle(self) -> None:
        self.loop.run_until_complete(self.store.flush())

    def stats(self) -> StoreStats:
        return self.store.stats()

    def cost(self, key: str, message: bytes, args: bytes = b"") -> int:
        return len(key) + len(message) + len(args) + self.overhead

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.store.close())
        finally:
            self.loop.close()


MakeHarness = Callable[..., Harness]


@pytest.fixture(params=sorted(BACKENDS))
def make_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MakeHarness]:
    """Builds a store of the parametrized backend: ``make_harness(ttl=, max_entries=, ...)``."""
    backend = BACKENDS[request.param]
    made: list[Harness] = []

    def make(*, ttl: float = 600.0, max_entries: int = 1000, max_bytes: int = 64 * MiB) -> Harness:
        clock = FakeClock()
        store = backend.make(tmp_path, clock, ttl=ttl, max_entries=max_entries, max_bytes=max_bytes)
        harness = Harness(store, clock, backend.overhead)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def key(n: int, name: str = "getItem") -> str:
    return cache_key(name, n.to_bytes(8, "big", signed=True))


def message(n: int, size: int = 64) -> bytes:
    """A reply-like message: distinct per n, ``size`` bytes."""
    head = b"\x80\x01\x00\x02\x00\x00\x00\x07getItem" + n.to_bytes(4, "big")
    return (head + bytes(range(256)) * (size // 256 + 1))[:size]


# -- the cache key ------------------------------------------------------------------


def test_cache_key_tells_services_methods_and_arguments_apart() -> None:
    args = b"\x0a\x00\x01" + (7).to_bytes(8, "big") + b"\x00"
    keys = {
        cache_key("getItem", args),
        cache_key("Interop:getItem", args),
        cache_key("Echo:getItem", args),
        cache_key("getItem", args[:-1] + b"\x01"),
        cache_key("listItems", args),
    }
    assert len(keys) == 5
    assert cache_key("Interop:getItem", args) == cache_key("Interop:getItem", bytearray(args))
    assert cache_key("Interop:getItem", memoryview(args)) == cache_key("Interop:getItem", args)


def test_cache_key_is_the_same_in_every_process() -> None:
    """Unseeded xxh3-128: SQLite files and a fleet's Redis hold keys made by other processes."""
    args = b"\x0a\x00\x01" + (7).to_bytes(8, "big") + b"\x00"
    script = (
        f"from sidecar.fallback.key import cache_key; print(cache_key('Interop:getItem', {args!r}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert other.stdout.strip() == cache_key("Interop:getItem", args)
    assert cache_key("getItem", b"") == "getItem|99aa06d3014798d86001c324468d497f"


def test_cache_keys_of_names_that_are_not_utf8_are_text_and_never_shared() -> None:
    """Every backend takes keys as UTF-8 text (SQLite, Redis, the workers' wire)."""
    names = ["get\udcff", "get\\xff", "get\\\udcff", "get\udcc3", "getcafé", "getItem"]
    keys = [cache_key(name, b"args") for name in names]
    for key in keys:
        key.encode("utf-8")
    assert len(set(keys)) == len(names)
    assert keys[0] == "get\\xff|" + keys[-1].split("|")[1] + "|raw"
    assert keys[4] == "getcafé|" + keys[-1].split("|")[1]  # UTF-8 names: keys as before


# -- conformance: every backend -------------------------------------------------------


def test_round_trip(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.put(key(1), message(1))
    h.settle()
    got = h.get(key(1))
    assert got == CachedReply(message(1), 4, T0)
    assert h.get(key(2)) is None


def test_a_reply_to_a_name_that_is_not_utf8_comes_back_byte_for_byte(
    make_harness: MakeHarness,
) -> None:
    raw = b"\x80\x01\x00\x02\x00\x00\x00\x04get\xff\x00\x00\x00\x07\x00"
    name = "get\udcff"
    h = make_harness()
    h.put(key(1, name), raw, args=b"a")
    h.settle()
    assert h.get(key(1, name)) == CachedReply(raw, 4, T0, b"a")
    assert h.get(key(1, "get\\xff")) is None
    assert h.stats().entries == 1


def test_arguments_are_kept_and_counted_against_max_bytes(make_harness: MakeHarness) -> None:
    args = bytes(range(256)) * 8  # 2 KiB of arguments beside a 100-byte reply
    probe = make_harness()
    each = probe.cost(key(1), message(1, 100), args)
    assert each == probe.cost(key(1), message(1, 100)) + len(args)
    h = make_harness(max_bytes=2 * each + each // 2)
    h.put(key(1), message(1, 100), args=args)
    h.put(key(2), message(2, 100), args=args)
    h.settle()
    got = h.get(key(1))
    assert got == CachedReply(message(1, 100), 4, T0, args)
    assert got is not None
    assert got.answers(memoryview(args))
    assert not got.answers(args[1:])
    assert (h.stats().entries, h.stats().bytes) == (2, 2 * each)
    h.put(key(3), message(3, 100), args=args)  # the arguments push the least used one out
    h.settle()
    assert h.get(key(2)) is None
    assert (h.stats().entries, h.stats().bytes) == (2, 2 * each)
    # A reply that fits on its own but not with its arguments is not kept.
    size = 2 * each + each // 2 - len(key(4)) - h.overhead - len(args) // 2
    bound = 2 * each + each // 2
    assert h.cost(key(4), message(4, size)) < bound < h.cost(key(4), message(4, size), args)
    h.put(key(4), message(4, size), args=args)
    h.settle()
    assert h.get(key(4)) is None


def test_overwrite_keeps_only_the_last_reply(make_harness: MakeHarness) -> None:
    h = make_harness()
    h.put(key(1), message(1, 100))
    h.clock.now += 5
    h.put(key(1), message(2, 300))
    h.settle()
    got = h.get(key(1))
    assert got is not None
    assert (got.message, got.stored_at) == (message(2, 300), T0 + 5)
    stats = h.stats()
    assert (stats.entries, stats.bytes) == (1, h.cost(key(1), message(2, 300)))


def test_ttl_entry_older_than_ttl_is_never_returned(make_harness: MakeHarness) -> None:
    h = make_harness(ttl=10.0)
    h.put(key(1), message(1))
    h.put(key(2), message(2), stored_at=T0 - 11)  # already too old when stored
    h.settle()
    assert h.get(key(2)) is None
    h.clock.now = T0 + 10  # exactly ttl old: still served
    assert h.get(key(1)) is not None
    h.clock.now = T0 + 10.001
    assert h.get(key(1)) is None
    h.clock.now = T0 + 5  # a clock that steps back does not revive a forgotten entry
    h.settle()
    wait_until(lambda: h.get(key(1)) is None and h.stats().entries == 0, timeout=5.0)
    assert h.stats().bytes == 0


def test_fresh_put_after_expiry_is_served(make_harness: MakeHarness) -> None:
    h = make_harness(ttl=10.0)
    h.put(key(1), message(1))
    h.clock.now = T0 + 20
    h.settle()
    assert h.get(key(1)) is None
    h.put(key(1), message(9))
    h.settle()
    got = h.get(key(1))
    assert got is not None
    assert got.message == message(9)


def test_lru_eviction_by_entries(make_harness: MakeHarness) -> None:
    h = make_harness(max_entries=3)
    for n in (1, 2, 3):
        h.put(key(n), message(n))
    h.settle()
    assert h.get(key(1)) is not None  # 1 is now the most recently used
    h.settle()
    h.put(key(4), message(4))
    h.settle()
    assert h.get(key(2)) is None
    assert [h.get(key(n)) is not None for n in (1, 3, 4)] == [True, True, True]
    assert h.stats().entries == 3


def test_lru_eviction_by_bytes(make_harness: MakeHarness) -> None:
    probe = make_harness()
    each = probe.cost(key(1), message(1, 200))
    h = make_harness(max_bytes=3 * each + each // 2)
    for n in (1, 2, 3):
        h.put(key(n), message(n, 200))
    h.settle()
    assert h.stats().bytes == 3 * each
    assert h.get(key(1)) is not None
    h.settle()
    h.put(key(4), message(4, 200))
    h.settle()
    assert h.get(key(2)) is None
    assert [h.get(key(n)) is not None for n in (1, 3, 4)] == [True, True, True]
    assert h.stats().bytes == 3 * each
    # A bigger reply pushes out as many old ones as it needs.
    h.put(key(5), message(5, 200 + each))
    h.settle()
    assert h.get(key(5)) is not None
    assert h.stats().bytes <= 3 * each + each // 2
    assert h.stats().entries == 2


def test_reply_larger_than_max_bytes_is_not_kept_and_drops_the_old_one(
    make_harness: MakeHarness,
) -> None:
    h = make_harness(max_bytes=2000)
    h.put(key(1), message(1, 100))
    h.put(key(2), message(2, 100))
    h.settle()
    h.put(key(1), message(1, 5000))
    h.settle()
    assert h.get(key(1)) is None  # neither the huge one nor the stale one
    assert h.get(key(2)) is not None
    assert h.stats().entries == 1


def test_stats_count_entries_and_bytes(make_harness: MakeHarness) -> None:
    h = make_harness()
    assert (h.stats().entries, h.stats().bytes) == (0, 0)
    sizes = [10, 100, 1000]
    for n, size in enumerate(sizes):
        h.put(key(n), message(n, size))
    h.settle()
    stats = h.stats()
    assert stats.backend in BACKENDS
    assert stats.healthy
    assert stats.entries == 3
    assert stats.bytes == sum(h.cost(key(n), message(n, s)) for n, s in enumerate(sizes))


def test_close_is_idempotent_and_the_store_forgets_quietly_after(
    make_harness: MakeHarness,
) -> None:
    h = make_harness()
    h.put(key(1), message(1))
    h.loop.run_until_complete(h.store.close())
    h.loop.run_until_complete(h.store.close())
    h.put(key(2), message(2))  # no error: a closed cache just forgets
    assert h.get(key(2)) is None


@pytest.mark.one_build(
    "the stores are none of the compiled modules (tests/test_native.py keeps it so): "
    "100,000 puts a store, about 8 s each, cost the same in either suite"
)
@pytest.mark.parametrize(
    ("max_entries", "max_bytes", "size"),
    [(20_000, 256 * MiB, 256), (100_000, 8 * MiB, 256)],
    ids=["entries-bound", "bytes-bound"],
)
def test_100k_distinct_keys_stay_within_bounds(
    make_harness: MakeHarness, max_entries: int, max_bytes: int, size: int
) -> None:
    """100,000 distinct keys: the store holds at most the bounds; memory grows accordingly."""
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    h = make_harness(max_entries=max_entries, max_bytes=max_bytes)
    total = 100_000
    started = time.perf_counter()
    for chunk in range(0, total, 1000):
        for n in range(chunk, chunk + 1000):
            h.put(key(n), message(n, size))
        h.settle()  # keeps the SQLite write queue from dropping: every key is written
        stats = h.stats()
        assert stats.entries <= max_entries
        assert stats.bytes <= max_bytes
    elapsed = time.perf_counter() - started
    gc.collect()
    rss_after = process.memory_info().rss
    stats = h.stats()
    assert stats.dropped_writes == 0
    each = h.cost(key(0), message(0, size))
    expected = min(max_entries, max_bytes // each)
    assert stats.entries == expected
    assert stats.bytes == expected * each
    # The most recent keys are the ones kept.
    assert h.get(key(total - 1)) is not None
    assert h.get(key(total - expected)) is not None
    assert h.get(key(total - expected - 1)) is None
    assert h.get(key(0)) is None
    growth = rss_after - rss_before
    print(
        f"\n{stats.backend} {total} puts of {size}B, bounds {max_entries} entries / "
        f"{max_bytes / MiB:.0f} MiB: kept {stats.entries} entries, {stats.bytes / MiB:.1f} MiB "
        f"counted; RSS growth {growth / MiB:.1f} MiB; {total / elapsed:,.0f} puts/s"
    )
    assert growth < 2 * min(max_bytes, stats.bytes) + 50 * MiB


def test_memory_store_accounting_covers_what_python_allocates() -> None:
    """ENTRY_OVERHEAD is not an underestimate: traced allocations <= counted bytes."""
    store = MemoryStore(ttl=600, max_entries=10_000, max_bytes=1 << 30)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20_000):  # half are evicted: the bound is by entries
            store.put(key(n), CachedReply(bytes(message(n, 300)), 4, time.time()))
        traced = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = store.stats().bytes
    print(f"\nmemory store: {traced / 10_000:.0f} B/entry traced, {counted / 10_000:.0f} counted")
    assert store.stats().entries == 10_000
    assert traced <= counted


# -- SQLite only ------------------------------------------------------------------------


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def sqlite_store(path: Path, **kwargs: Any) -> SqliteStore:
    options: dict[str, Any] = {"ttl": 600.0, "max_entries": 1000, "max_bytes": 64 * MiB}
    options.update(kwargs)
    return SqliteStore(path, **options)


async def fill(store: SqliteStore, count: int, size: int = 64, start: int = 0) -> None:
    for n in range(start, start + count):
        store.put(key(n), CachedReply(message(n, size), 4, time.time()))
    await store.flush()


def write_batch(path: Path, ops: list[Op], max_entries: int) -> list[str]:
    """Run a writer over ``ops``, all taken as one batch; the keys left, least recent first."""
    pending: queue.Queue[Op] = queue.Queue()
    for op in [*ops, (STOP, concurrent.futures.Future())]:
        pending.put(op)
    writer = SqliteWriter(
        open_file(path, 5.0),
        path,
        pending,
        ttl=600.0,
        max_entries=max_entries,
        max_bytes=64 * MiB,
        clock=time.time,
        purge_interval=600.0,
        warn=lambda what, text: None,
    )
    writer.run()  # in this thread: returns after the STOP
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT key FROM entries ORDER BY used_seq")]


def test_sqlite_reads_before_a_store_in_one_batch_leave_the_store_most_recent(
    tmp_path: Path,
) -> None:
    """Reads of a and b, then c stored, all in one batch of the writer: c is the most
    recently used, so the bound of two evicts a (the batch was once applied stores
    first, which made c the oldest and evicted the reply just stored)."""
    path = tmp_path / "fallback.db"
    a, b, c = key(1), key(2), key(3)

    def put(k: str, n: int) -> Op:
        return (PUT, k, CachedReply(message(n), 4, time.time(), b"args"))

    assert write_batch(path, [put(a, 1), put(b, 2)], max_entries=2) == [a, b]
    left = write_batch(path, [(TOUCH, a), (TOUCH, b), put(c, 3)], max_entries=2)
    assert left == [b, c]


def test_sqlite_survives_reopening_with_lru_order(tmp_path: Path) -> None:
    path = tmp_path / "fallback.db"

    async def first() -> None:
        store = sqlite_store(path)
        await fill(store, 5)
        assert await store.get(key(0)) is not None  # 0 becomes the most recently used
        store.put(key(99), CachedReply(message(99), 4, time.time()))  # no flush: close does it
        await store.close()

    async def second() -> None:
        store = sqlite_store(path, max_entries=3)  # a smaller bound trims the oldest at start
        try:
            assert store.stats().entries == 3
            found = [n for n in (0, 1, 2, 3, 4, 99) if await store.get(key(n)) is not None]
            assert found == [0, 4, 99]
            got = await store.get(key(99))
            assert got is not None
            assert got.message == message(99)
        finally:
            await store.close()

    run(first())
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 6
    run(second())


def test_sqlite_purges_expired_rows_without_reads(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "fallback.db"
    store = sqlite_store(path, ttl=10.0, clock=clock, purge_interval=0.02)
    for n in range(50):
        store.put(key(n), CachedReply(message(n, 2000), 4, clock.now))
    run(store.flush())
    assert store.stats().entries == 50
    clock.now += 11
    wait_until(lambda: store.stats().entries == 0, timeout=5.0, message="purge")
    assert store.stats().bytes == 0
    run(store.close())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 0


@pytest.mark.parametrize("case", ["missing-dir", "parent-is-file", "path-is-dir"])
def test_sqlite_unusable_path_is_a_config_error(tmp_path: Path, case: str) -> None:
    if case == "missing-dir":
        path = tmp_path / "nowhere" / "fallback.db"
    elif case == "parent-is-file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "fallback.db"
    else:
        path = tmp_path / "adir"
        path.mkdir()
    with pytest.raises(ConfigError) as raised:
        sqlite_store(path)
    assert str(raised.value).startswith("fallback.cache.path: ")
    assert str(path.parent if case != "path-is-dir" else path) in str(raised.value)


def test_sqlite_file_of_another_application_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
    with pytest.raises(ConfigError, match=r"^fallback\.cache\.path: .*something else"):
        sqlite_store(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # left untouched
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]


def damage_garbage(path: Path) -> None:
    path.write_bytes(b"this is not a database\n" * 1000)


def damage_pages(path: Path) -> None:
    """A real cache whose pages after the first (the schema) are overwritten."""

    async def write() -> None:
        store = sqlite_store(path)
        await fill(store, 200, size=500)
        await store.close()

    run(write())
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[page:] = b"\xa5" * (len(data) - page)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [damage_garbage, damage_pages], ids=["garbage", "pages"])
def test_sqlite_damaged_file_degrades_to_memory_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "fallback.db"
    damage(path)
    before = path.read_bytes()
    caplog.set_level(logging.WARNING, logger="sidecar.fallback")
    store = sqlite_store(path)

    async def scenario() -> None:
        assert store.degraded
        await fill(store, 3)
        got = await store.get(key(2))
        assert got is not None
        assert got.message == message(2)
        stats = store.stats()
        assert (stats.backend, stats.entries, stats.healthy) == ("sqlite", 3, False)
        await store.close()

    run(scenario())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    text = warnings[0].getMessage()
    assert "fallback.cache.path" in text
    assert str(path) in text
    assert "memory" in text
    assert path.read_bytes() == before  # left for inspection


def test_sqlite_old_layout_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "fallback.db"

    async def write() -> None:
        store = sqlite_store(path)
        await fill(store, 3)
        await store.close()

    run(write())
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 0")
        conn.commit()
    store = sqlite_store(path)
    try:
        assert not store.degraded
        assert store.stats().entries == 0
    finally:
        run(store.close())


def test_sqlite_put_never_blocks_and_full_queue_drops_and_counts(tmp_path: Path) -> None:
    """Another connection holds the write lock: the writer waits, puts do not."""
    path = tmp_path / "fallback.db"
    store = sqlite_store(path, queue_size=8, busy_timeout=30.0)
    loop = asyncio.new_event_loop()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        loop.run_until_complete(fill(store, 1, start=10_000))  # to read while writes are stuck
        locker.execute("BEGIN EXCLUSIVE")
        store.put(key(0), CachedReply(message(0), 4, time.time()))
        # The writer takes it and then waits for the lock.
        wait_until(lambda: store.pending_writes() == 0, message="writer took the put")
        slowest = 0.0
        for n in range(1, 2001):
            started = time.perf_counter()
            store.put(key(n), CachedReply(message(n), 4, time.time()))
            slowest = max(slowest, time.perf_counter() - started)
        dropped = store.stats().dropped_writes
        # At most the queue, and one batch taken in a race, got in; the rest was dropped.
        assert dropped >= 2000 - 8 - sqlite_module.BATCH_SIZE
        assert store.pending_writes() <= 8
        # Reads go on while the writer is stuck (WAL).
        started = time.perf_counter()
        assert loop.run_until_complete(store.get(key(10_000))) is not None
        read = time.perf_counter() - started
        print(
            f"\nwrite lock held elsewhere: slowest put {slowest * 1e6:.0f} us, "
            f"{dropped} of 2000 dropped, a read took {read * 1e3:.1f} ms"
        )
        assert slowest < 1.0  # a put that waited for the lock would take 30 s
        locker.execute("ROLLBACK")
        loop.run_until_complete(store.flush())
        stats = store.stats()
        assert stats.failed_writes == 0
        assert stats.entries == 1 + 2001 - stats.dropped_writes
        assert loop.run_until_complete(store.get(key(0))) is not None
    finally:
        locker.close()
        loop.run_until_complete(store.close())
        loop.close()


def test_sqlite_write_error_fails_the_batch_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "fallback.db"
    store = sqlite_store(path, busy_timeout=0.05)
    locker = sqlite3.connect(path, isolation_level=None)
    caplog.set_level(logging.WARNING, logger="sidecar.fallback")
    try:

        async def scenario() -> None:
            locker.execute("BEGIN EXCLUSIVE")
            store.put(key(1), CachedReply(message(1), 4, time.time()))
            await store.flush()
            stats = store.stats()
            assert (stats.failed_writes, stats.healthy, stats.entries) == (1, False, 0)
            locker.execute("ROLLBACK")
            store.put(key(2), CachedReply(message(2), 4, time.time()))
            await store.flush()
            stats = store.stats()
            assert (stats.failed_writes, stats.healthy, stats.entries) == (1, True, 1)
            assert await store.get(key(1)) is None
            assert await store.get(key(2)) is not None
            await store.close()

        run(scenario())
    finally:
        locker.close()
    assert any("write failed" in r.getMessage() for r in caplog.records)


def test_sqlite_failed_read_stays_unhealthy_through_good_writes(tmp_path: Path) -> None:
    """A good write batch does not hide failing reads: healthy again only when a read works."""
    store = sqlite_store(tmp_path / "fallback.db")
    run(fill(store, 1))
    # What the reader thread reports when SQLite fails a read ("disk I/O error").
    store._writer.trouble("read", sqlite3.OperationalError("disk I/O error"))
    run(fill(store, 1, start=1))  # a write batch that succeeds
    stats = store.stats()
    assert (stats.healthy, stats.entries) == (False, 2)
    assert dict(stats.errors) == {"read": 1, "write": 0, "purge": 0, "file": 0, "reopen": 0}
    # The writer has the reader try a read (once a second); it works: healthy again.
    wait_until(lambda: store.stats().healthy, timeout=10.0, message="a read worked")
    assert run(store.get(key(1))) is not None
    run(store.close())


def test_sqlite_read_slower_than_get_timeout_is_a_miss(tmp_path: Path) -> None:
    store = sqlite_store(tmp_path / "fallback.db", get_timeout=0.0)

    async def scenario() -> None:
        await fill(store, 1)
        assert await store.get(key(0)) is None
        assert store.stats().missed_reads == 1
        # The reader's late answer to the abandoned read is ignored, and it keeps serving.
        store.get_timeout = 5.0
        assert await store.get(key(0)) is not None
        await store.close()

    run(scenario())


def test_sqlite_file_size_per_row_matches_row_overhead(tmp_path: Path) -> None:
    """ROW_OVERHEAD is what a row costs in the file beyond its key and message."""
    path = tmp_path / "fallback.db"

    async def write() -> None:
        store = sqlite_store(path, max_entries=100_000)
        for start in range(0, 5000, 1000):
            await fill(store, 1000, size=300, start=start)
        await store.close()

    run(write())
    per_row = os.path.getsize(path) / 5000 - len(key(0)) - 300
    print(f"\nsqlite file: {per_row:.0f} B per row beyond key and message")
    assert per_row <= sqlite_module.ROW_OVERHEAD * 1.25
