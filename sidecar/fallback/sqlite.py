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
error after start-up fails only the batch or the read at hand.

Why, and each case in detail: docs/fallback-stores.md ("SQLite").
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
from typing import Any

from sidecar.errors import ConfigError
from sidecar.fallback.store import CachedReply, MemoryStore, StoreStats

log = logging.getLogger("sidecar.fallback")

KEY_PATH = "fallback.cache.path"

# "TSFC" (thrift-sidecar fallback cache) in the file header's application_id:
# tells our files from other SQLite databases.
APPLICATION_ID = 0x54534643
# The table layout below; a file with another user_version is rebuilt.
SCHEMA_VERSION = 1

# Operations queued before more are dropped. At a few hundred bytes per reply
# this holds a few MiB, and it is about a second of writes at SQLite's
# batched insert rate on this class of machine (measured: ~40k rows/s).
QUEUE_SIZE = 10_000
# Most operations applied in one transaction: large enough that a burst costs
# few commits, small enough that a flush waits for little.
BATCH_SIZE = 1_000
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
# Bytes counted per row beyond key and message: the row's header and integer
# columns, and its entries in the three indexes, each of which repeats the
# key or the rowid (estimated from the file size per row, rounded up;
# tests/fallback/test_stores.py fails when a row costs over 25 % more).
ROW_OVERHEAD = 128

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    seqid_offset INTEGER NOT NULL,
    stored_at REAL NOT NULL,
    used_seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    message BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (used_seq, size);
CREATE INDEX IF NOT EXISTS entries_age ON entries (stored_at, size);
"""
_UPSERT = (
    "INSERT INTO entries (key, seqid_offset, stored_at, used_seq, size, message) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
    "seqid_offset = excluded.seqid_offset, stored_at = excluded.stored_at, "
    "used_seq = excluded.used_seq, size = excluded.size, message = excluded.message"
)

# Writer operations: (kind, ...) tuples.
_PUT = 0  # (_PUT, key, CachedReply)
_TOUCH = 1  # (_TOUCH, key)
_DELETE = 2  # (_DELETE, key, stored_at): only the row that was read
_FLUSH = 3  # (_FLUSH, concurrent Future)
_STOP = 4  # (_STOP, concurrent Future)

_Op = tuple[Any, ...]
_Read = tuple[str, asyncio.AbstractEventLoop, "asyncio.Future[CachedReply | None]"]


class _Damaged(Exception):
    """The file is not a readable fallback cache."""


class SqliteStore:
    """Fallback replies in an SQLite file; see docs/fallback-stores.md.

    Args:
        path: the database file; created when missing (its directory must exist).
        ttl: seconds an entry may be served after it was stored.
        max_entries: most rows kept.
        max_bytes: most bytes kept, counted as key + message + `ROW_OVERHEAD`.
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
        self.failed_writes = 0
        self.missed_reads = 0
        self._entries = 0
        self._bytes = 0
        self._seq = 0
        self._healthy = True
        self._closed = False
        self._last_warning: dict[str, float] = {}
        self._queue: queue.Queue[_Op] = queue.Queue(queue_size)
        self._reads: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._memory: MemoryStore | None = None
        try:
            self._wconn = _open(self.path, busy_timeout)
            try:
                self._entries, self._bytes, self._seq = _figures(self._wconn)
                self._in_transaction(self._trim_now)
                self._rconn = _connect(self.path, busy_timeout)
                self._rconn.execute("PRAGMA query_only = 1")
            except sqlite3.Error as exc:
                self._wconn.close()
                raise _classify(exc, self.path) from None
        except _Damaged as exc:
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
        self._writer = threading.Thread(
            target=self._write_loop, name="sidecar-fallback-writer", daemon=True
        )
        self._reader = threading.Thread(
            target=self._read_loop, name="sidecar-fallback-reader", daemon=True
        )
        self._writer.start()
        self._reader.start()

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
        if not self._enqueue((_PUT, key, reply)):
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
            self._enqueue((_DELETE, key, reply.stored_at))
            return None
        self._enqueue((_TOUCH, key))
        return reply

    def stats(self) -> StoreStats:
        """Figures kept by the writer; no I/O."""
        if self._memory is not None:
            inner = self._memory.stats()
            return StoreStats(self.backend, inner.entries, inner.bytes, healthy=False)
        return StoreStats(
            self.backend,
            self._entries,
            self._bytes,
            healthy=self._healthy,
            dropped_writes=self.dropped_writes,
            failed_writes=self.failed_writes,
            missed_reads=self.missed_reads,
        )

    def pending_writes(self) -> int:
        """Operations queued for the writer (approximate)."""
        return 0 if self._memory is not None else self._queue.qsize()

    async def flush(self) -> None:
        """Wait until every write queued before this call is in the file."""
        if self._memory is not None or self._closed:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        await asyncio.to_thread(self._queue.put, (_FLUSH, done), True, CLOSE_TIMEOUT)
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

    def _enqueue(self, op: _Op) -> bool:
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
            self._queue.put((_STOP, done), True, CLOSE_TIMEOUT)
            done.result(CLOSE_TIMEOUT)
        except (queue.Full, concurrent.futures.TimeoutError):
            log.warning(
                "%s: the fallback cache writer did not finish within %gs; queued writes are lost",
                KEY_PATH,
                CLOSE_TIMEOUT,
            )
        self._writer.join(CLOSE_TIMEOUT)
        self._reads.put(None)
        self._reader.join(CLOSE_TIMEOUT)

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

    def _trouble(self, what: str, exc: BaseException) -> None:
        self._healthy = False
        self._warn(what, f"{what} failed: {exc}")

    # -- the reader thread ---------------------------------------------------------

    def _read_loop(self) -> None:
        conn = self._rconn
        try:
            while True:
                item = self._reads.get()
                if item is None:
                    return
                key, loop, future = item
                result: CachedReply | None = None
                try:
                    row = conn.execute(
                        "SELECT message, seqid_offset, stored_at FROM entries WHERE key = ?",
                        (key,),
                    ).fetchone()
                    if row is not None:
                        result = CachedReply(bytes(row[0]), int(row[1]), float(row[2]))
                except sqlite3.Error as exc:
                    self._trouble("read", exc)
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, future, result)
        finally:
            conn.close()

    # -- the writer thread ---------------------------------------------------------

    def _write_loop(self) -> None:
        next_purge = time.monotonic() + self.purge_interval
        stopping = False
        try:
            while not stopping:
                batch: list[_Op] = []
                with contextlib.suppress(queue.Empty):
                    batch.append(self._queue.get(True, max(next_purge - time.monotonic(), 0.0)))
                while len(batch) < BATCH_SIZE:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if batch:
                    stopping = self._apply(batch)
                if time.monotonic() >= next_purge:
                    self._purge()
                    next_purge = time.monotonic() + self.purge_interval
        finally:
            self._wconn.close()

    def _apply(self, batch: list[_Op]) -> bool:
        """Apply one batch in one transaction; True when it holds the stop request."""
        puts: dict[str, CachedReply] = {}
        touches: dict[str, None] = {}
        deletes: list[tuple[str, float]] = []
        waiters: list[concurrent.futures.Future[None]] = []
        stopping = False
        for op in batch:
            kind = op[0]
            if kind == _PUT:
                touches.pop(op[1], None)
                puts.pop(op[1], None)
                puts[op[1]] = op[2]
            elif kind == _TOUCH:
                if op[1] not in puts:
                    touches.pop(op[1], None)
                    touches[op[1]] = None
            elif kind == _DELETE:
                deletes.append((op[1], op[2]))
            else:
                waiters.append(op[1])
                stopping = stopping or kind == _STOP
        try:
            if puts or touches or deletes:
                self._in_transaction(lambda: self._write(puts, touches, deletes))
                self._healthy = True
        except sqlite3.Error as exc:
            self.failed_writes += len(puts)
            self._trouble("write", exc)
        except Exception:  # a bug: keep the thread, and the cache, alive
            self.failed_writes += len(puts)
            self._healthy = False
            log.exception("fallback cache %s: unexpected error in the writer", self.path)
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return stopping

    def _in_transaction(self, work: Callable[[], None]) -> None:
        """Run ``work`` in one write transaction; on an error roll back and recount."""
        conn = self._wconn
        conn.execute("BEGIN IMMEDIATE")
        try:
            work()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                self._entries, self._bytes, _ = _figures(conn)
            raise

    def _write(
        self,
        puts: dict[str, CachedReply],
        touches: dict[str, None],
        deletes: list[tuple[str, float]],
    ) -> None:
        conn = self._wconn
        entries, nbytes = self._entries, self._bytes
        for key, stored_at in deletes:
            row = conn.execute(
                "SELECT size FROM entries WHERE key = ? AND stored_at = ?", (key, stored_at)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                entries -= 1
                nbytes -= row[0]
        for key, reply in puts.items():
            row = conn.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
            if row is not None:
                entries -= 1
                nbytes -= row[0]
            cost = len(key) + len(reply.message) + ROW_OVERHEAD
            if cost > self.max_bytes:  # can never fit; and the older reply is not the last one
                if row is not None:
                    conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                continue
            self._seq += 1
            conn.execute(
                _UPSERT,
                (key, reply.seqid_offset, reply.stored_at, self._seq, cost, reply.message),
            )
            entries += 1
            nbytes += cost
        for key in touches:
            self._seq += 1
            conn.execute("UPDATE entries SET used_seq = ? WHERE key = ?", (self._seq, key))
        self._entries, self._bytes = entries, nbytes
        self._trim_now()

    def _trim_now(self) -> None:
        """Delete least recently used rows until both bounds hold (inside a transaction)."""
        conn = self._wconn
        entries, nbytes = self._entries, self._bytes
        while entries > self.max_entries or nbytes > self.max_bytes:
            rows = conn.execute(
                "SELECT key, size FROM entries ORDER BY used_seq LIMIT ?",
                (max(entries - self.max_entries, 64),),
            ).fetchall()
            if not rows:  # the figures were off; the table is empty
                entries, nbytes = 0, 0
                break
            victims = []
            for key, size in rows:
                if entries <= self.max_entries and nbytes <= self.max_bytes:
                    break
                victims.append((key,))
                entries -= 1
                nbytes -= size
            conn.executemany("DELETE FROM entries WHERE key = ?", victims)
        self._entries, self._bytes = entries, nbytes

    def _purge(self) -> None:
        """Delete the rows older than the TTL; return free pages when many."""
        conn = self._wconn
        cutoff = self._clock() - self.ttl

        def purge() -> None:
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE stored_at < ?",
                (cutoff,),
            ).fetchone()
            if count:
                conn.execute("DELETE FROM entries WHERE stored_at < ?", (cutoff,))
                self._entries -= count
                self._bytes -= size

        try:
            self._in_transaction(purge)
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            if free * 4 > pages:
                conn.execute("PRAGMA incremental_vacuum").fetchall()
        except sqlite3.Error as exc:
            self._trouble("purge", exc)


def _settle(future: asyncio.Future[CachedReply | None], result: CachedReply | None) -> None:
    if not future.done():  # a get that timed out has cancelled it
        future.set_result(result)


def _connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    return sqlite3.connect(
        str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )


def _check_path(path: Path) -> None:
    """Refuse paths SQLite could not write, with a message that says what to change."""
    parent = path.parent
    if path.is_dir():
        raise ConfigError(
            f"{KEY_PATH}: {path} is a directory; name a file in it, e.g. {path / 'fallback.db'}"
        )
    if not parent.exists():
        raise ConfigError(f"{KEY_PATH}: directory {parent} (of {path}) does not exist")
    if not parent.is_dir():
        raise ConfigError(f"{KEY_PATH}: {parent} (in {path}) is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{KEY_PATH}: directory {parent} is not writable by this process "
            f"(SQLite creates {path.name}-wal and {path.name}-shm beside the file)"
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError(f"{KEY_PATH}: {path} is not readable and writable by this process")


def _classify(exc: sqlite3.Error, path: Path) -> Exception:
    """A damaged file (degrade to memory) or a path that cannot be used (config error)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return _Damaged(str(exc))
    return ConfigError(f"{KEY_PATH}: cannot use {path} as the fallback cache: {exc}")


def _open(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """The write connection, with the schema in place and the file proven writable.

    Raises:
        ConfigError: the path cannot be used.
        _Damaged: the file is not a readable fallback cache.
    """
    _check_path(path)
    try:
        conn = _connect(path, busy_timeout)
    except sqlite3.Error as exc:
        raise _classify(exc, path) from None
    try:
        _prepare(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise _classify(exc, path) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Check the file is ours and readable, then create or update the schema."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables):
        raise ConfigError(
            f"{KEY_PATH}: {path} is an SQLite database of something else "
            f"(application_id {app_id}, tables {', '.join(tables) or 'none'}); "
            "name a file of its own"
        )
    current = app_id == APPLICATION_ID and version == SCHEMA_VERSION
    if current:
        _figures(conn)  # reads the whole LRU index: damage shows here, before any write
    if app_id == 0:  # a new file: free pages can be returned later (only settable now)
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        log.warning("%s: %s stays in journal mode %s, not WAL", KEY_PATH, path, mode)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")  # proves the file writable (and not locked by another)
    try:
        if app_id == APPLICATION_ID and not current:
            log.info(
                "%s: %s has layout %d, not %d; rebuilding it",
                KEY_PATH,
                path,
                version,
                SCHEMA_VERSION,
            )
            conn.execute("DROP TABLE IF EXISTS entries")
        for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
            if statement.strip():
                conn.execute(statement)
        if not current:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _figures(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(rows, bytes, highest used_seq) of the table, read from the LRU index."""
    row = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(used_seq), 0) FROM entries"
    ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])
