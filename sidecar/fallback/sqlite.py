"""The SQLite fallback store: cached replies in a file that outlives the process.

One file (``fallback.cache.path``) in WAL mode, one row per cache key. Two
threads own all the file I/O, so the event loop never waits on the disk: the
writer applies queued puts, touches and deletes in batched transactions and
keeps the LRU within ``max_entries`` and ``max_bytes``; the reader answers each
``get`` within ``get_timeout``, else it is a miss. A full queue drops writes
and counts them. ``close`` writes what is queued, so the next process starts
with what this one stored. One file belongs to one sidecar process.

Failures: a path that cannot be used is a `ConfigError` at start-up; a damaged
file makes the store keep entries in memory (``healthy=False``); an SQLite
error after start-up fails only the batch or the read at hand; a file deleted
or replaced while open is noticed within a second and a fresh one opened at
the path. ``healthy`` is False from a failure until a read works again (and
for a failed write, until a write does); failures are counted by operation.

Why, and each case in detail: docs/fallback-stores.md ("SQLite").
The file's opening and schema: `sidecar.fallback.sqlite_file`; the writer
thread: `sidecar.fallback.sqlite_writer`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sidecar.fallback.sqlite_file import KEY_PATH, Damaged, classify, connect, open_file
from sidecar.fallback.sqlite_health import StoreHealth
from sidecar.fallback.sqlite_writer import (
    BATCH_SIZE,
    DELETE,
    FLUSH,
    PUT,
    ROW_OVERHEAD,
    STOP,
    TOUCH,
    Op,
    SqliteWriter,
)
from sidecar.fallback.store import CachedReply, MemoryStore, StoreStats

__all__ = ["BATCH_SIZE", "ROW_OVERHEAD", "SqliteStore"]

log = logging.getLogger("sidecar.fallback")

# Operations queued before more are dropped. At a few hundred bytes per reply
# this holds a few MiB, and it is about a second of writes at SQLite's
# batched insert rate on this class of machine (measured: ~40k rows/s).
QUEUE_SIZE = 10_000
# Reads waiting for the reader thread before further gets answer "no reply".
MAX_PENDING_READS = 1_000
# Seconds a get waits for the reader: far above a primary-key lookup (tens of
# microseconds), far below any per-try timeout a client would tolerate.
GET_TIMEOUT = 0.25
# SQLite's busy timeout, seconds: how long a write waits for a lock held by
# another connection (at start-up: another process on the same file).
BUSY_TIMEOUT = 5.0
# Seconds `close` and `flush` wait for the writer before giving up.
CLOSE_TIMEOUT = 10.0
# Least seconds between two warnings about the same kind of trouble.
WARNING_INTERVAL = 60.0

_Read = tuple[str, asyncio.AbstractEventLoop, "asyncio.Future[CachedReply | None]"]
# Put on the reader's queue for a read that only tells whether reading works.
_PROBE = "probe"


class SqliteStore:
    """Fallback replies in an SQLite file; see docs/fallback-stores.md.

    Args:
        path: the database file; created when missing (its directory must exist).
        ttl: seconds an entry may be served after it was stored.
        max_entries: most rows kept.
        max_bytes: most bytes kept, counted as key + message + arguments + `ROW_OVERHEAD`.
        clock: Unix time, for the TTL (entries outlive the process).
        queue_size: writes queued before more are dropped.
        get_timeout: seconds a get waits for the reader thread.
        purge_interval: seconds between purges of expired rows; default
            half the TTL, at most a minute.
        busy_timeout: seconds a write waits for another connection's lock.

    Raises:
        ConfigError: the path cannot be used (see docs/fallback-stores.md).
    """

    backend = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.time,
        queue_size: int = QUEUE_SIZE,
        get_timeout: float = GET_TIMEOUT,
        purge_interval: float | None = None,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.get_timeout = get_timeout
        self.purge_interval = (
            purge_interval if purge_interval is not None else min(60.0, max(ttl / 2, 0.01))
        )
        self._clock = clock
        self.dropped_writes = 0
        self.missed_reads = 0
        self._closed = False
        self._last_warning: dict[str, float] = {}
        self._queue: queue.Queue[Op] = queue.Queue(queue_size)
        self._reads: queue.SimpleQueue[_Read | str | threading.Event | None] = queue.SimpleQueue()
        self._memory: MemoryStore | None = None
        self._health = StoreHealth()
        try:
            wconn = open_file(self.path, busy_timeout)
            try:
                self._writer = SqliteWriter(
                    wconn,
                    self.path,
                    self._queue,
                    ttl=ttl,
                    max_entries=max_entries,
                    max_bytes=max_bytes,
                    clock=clock,
                    purge_interval=self.purge_interval,
                    warn=self._warn,
                    busy_timeout=busy_timeout,
                    health=self._health,
                    wake_reader=lambda: self._reads.put(_PROBE),
                    release_reader=self._release_reader,
                )
                self._rconn = connect(self.path, busy_timeout)
                self._rconn.execute("PRAGMA query_only = 1")
                self._writer.reader_conn = self._rconn
            except sqlite3.Error as exc:
                wconn.close()
                raise classify(exc, self.path) from None
        except Damaged as exc:
            log.warning(
                "%s: %s is not a usable fallback cache (%s); keeping fallback replies in "
                "memory until restart (the file is left as it is: delete it to start afresh)",
                KEY_PATH,
                self.path,
                exc,
            )
            self._memory = MemoryStore(
                ttl=ttl, max_entries=max_entries, max_bytes=max_bytes, clock=clock
            )
            return
        self._writer_thread = threading.Thread(
            target=self._writer.run, name="sidecar-fallback-writer", daemon=True
        )
        self._reader_thread = threading.Thread(
            target=self._read_loop, name="sidecar-fallback-reader", daemon=True
        )
        self._writer_thread.start()
        self._reader_thread.start()

    # -- the interface (event loop thread) -------------------------------------------

    @property
    def degraded(self) -> bool:
        """True when the file was unusable and entries are kept in memory instead."""
        return self._memory is not None

    def put(self, key: str, reply: CachedReply) -> None:
        """Queue the write; never blocks (dropped and counted when the queue is full)."""
        if self._memory is not None:
            self._memory.put(key, reply)
            return
        if not self._enqueue((PUT, key, reply)):
            self.dropped_writes += 1

    async def get(self, key: str) -> CachedReply | None:
        """The stored reply if one younger than the TTL is there; waits at most ``get_timeout``."""
        if self._memory is not None:
            return self._memory.get_now(key)
        if self._closed:
            return None
        if self._reads.qsize() >= MAX_PENDING_READS:
            self.missed_reads += 1
            self._warn("busy", "too many reads waiting for the disk; answering without the cache")
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CachedReply | None] = loop.create_future()
        self._reads.put((key, loop, future))
        try:
            reply = await asyncio.wait_for(future, self.get_timeout)
        except TimeoutError:
            self.missed_reads += 1
            self._warn("slow", f"a read took longer than {self.get_timeout:g}s; treated as a miss")
            return None
        if reply is None:
            return None
        if self._clock() - reply.stored_at > self.ttl:
            self._enqueue((DELETE, key, reply.stored_at))
            return None
        self._enqueue((TOUCH, key))
        return reply

    def stats(self) -> StoreStats:
        """Figures kept by the writer; no I/O."""
        if self._memory is not None:
            inner = self._memory.stats()
            return StoreStats(self.backend, inner.entries, inner.bytes, healthy=False)
        writer = self._writer
        return StoreStats(
            self.backend,
            writer.entries,
            writer.bytes,
            healthy=self._health.healthy,
            dropped_writes=self.dropped_writes,
            failed_writes=writer.failed_writes,
            missed_reads=self.missed_reads,
            errors=self._health.errors(),
        )

    def pending_writes(self) -> int:
        """Operations queued for the writer (approximate)."""
        return 0 if self._memory is not None else self._queue.qsize()

    async def flush(self) -> None:
        """Wait until every write queued before this call is in the file."""
        if self._memory is not None or self._closed:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        await asyncio.to_thread(self._queue.put, (FLUSH, done), True, CLOSE_TIMEOUT)
        await asyncio.wait_for(asyncio.wrap_future(done), CLOSE_TIMEOUT)

    async def close(self) -> None:
        """Apply the queued writes, stop both threads and close the file."""
        if self._memory is not None:
            await self._memory.close()
            return
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    def _enqueue(self, op: Op) -> bool:
        """Queue an operation for the writer; False when it was dropped."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._warn("full", "the write queue is full; dropping writes until the disk keeps up")
            return False
        return True

    def _shutdown(self) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            self._queue.put((STOP, done), True, CLOSE_TIMEOUT)
            done.result(CLOSE_TIMEOUT)
        except (queue.Full, concurrent.futures.TimeoutError):
            log.warning(
                "%s: the fallback cache writer did not finish within %gs; queued writes are lost",
                KEY_PATH,
                CLOSE_TIMEOUT,
            )
        self._writer_thread.join(CLOSE_TIMEOUT)
        self._reads.put(None)
        self._reader_thread.join(CLOSE_TIMEOUT)

    def _warn(self, kind: str, text: str) -> None:
        """Log a warning about ``kind`` of trouble at most once per `WARNING_INTERVAL`."""
        now = time.monotonic()
        last = self._last_warning.get(kind)
        if last is not None and now - last < WARNING_INTERVAL:
            return
        self._last_warning[kind] = now
        log.warning(
            "fallback cache %s: %s (repeats of this are not logged for %gs)",
            self.path,
            text,
            WARNING_INTERVAL,
        )

    # -- the reader thread ---------------------------------------------------------

    def _release_reader(self) -> None:
        """(Writer thread) Have the reader close its connection; wait until it has."""
        released = threading.Event()
        self._reads.put(released)
        released.wait(CLOSE_TIMEOUT)

    def _read_loop(self) -> None:
        conn: sqlite3.Connection | None = self._rconn
        writer, health = self._writer, self._health
        try:
            while True:
                item = self._reads.get()
                if item is None:
                    return
                fresh = writer.reader_conn  # None while the file is lost
                if fresh is not conn:
                    if conn is not None:
                        with contextlib.suppress(sqlite3.Error):
                            conn.close()
                    conn = fresh
                if isinstance(item, threading.Event):  # the writer waits for the release
                    item.set()
                    continue
                key, loop, future = ("", None, None) if isinstance(item, str) else item
                result: CachedReply | None = None
                if conn is not None:
                    try:
                        row = conn.execute(
                            "SELECT message, seqid_offset, stored_at, args FROM entries "
                            "WHERE key = ?",
                            (key,),
                        ).fetchone()
                        if row is not None:
                            result = CachedReply(
                                bytes(row[0]), int(row[1]), float(row[2]), bytes(row[3])
                            )
                        if conn is writer.reader_conn and not health.file_lost:
                            health.read_failed = False
                    except sqlite3.Error as exc:
                        writer.trouble("read", exc)
                if loop is not None and future is not None:
                    with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                        loop.call_soon_threadsafe(_settle, future, result)
        finally:
            for each in {conn, writer.reader_conn}:  # a fresh one the reader never used too
                if each is not None:
                    with contextlib.suppress(sqlite3.Error):
                        each.close()


def _settle(future: asyncio.Future[CachedReply | None], result: CachedReply | None) -> None:
    if not future.done():  # a get that timed out has cancelled it
        future.set_result(result)
