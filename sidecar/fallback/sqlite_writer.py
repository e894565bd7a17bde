"""The SQLite fallback store's writer: queued puts, touches and deletes in batched transactions.

`SqliteWriter` runs on the store's writer thread with the write connection:
it applies each batch of queued operations in one transaction, keeps the LRU
within ``max_entries`` and ``max_bytes``, purges expired rows, and keeps the
figures (rows, bytes) that `SqliteStore.stats` reports without I/O. Once a
second, and after a failed write, it checks that the file at the path is
still the one it has open; when it was deleted or replaced it opens a fresh
file there and hands the reader a new connection (docs/fallback-stores.md).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.errors import ConfigError
from sidecar.fallback.sqlite_file import (
    Damaged,
    FileIdentity,
    connect,
    figures,
    file_identity,
    open_file,
)
from sidecar.fallback.sqlite_health import StoreHealth
from sidecar.fallback.store import CachedReply

log = logging.getLogger("sidecar.fallback")

# Most operations applied in one transaction: large enough that a burst costs
# few commits, small enough that a flush waits for little.
BATCH_SIZE = 1_000
# Bytes counted per row beyond key, message and arguments: the row's header and integer
# columns, and its entries in the three indexes, each of which repeats the
# key or the rowid (estimated from the file size per row, rounded up;
# tests/fallback/test_stores.py fails when a row costs over 25 % more).
ROW_OVERHEAD = 128
# Seconds between two checks that the file at the path is the one open (a
# stat call), and between two tries to open a fresh one while it is gone.
CHECK_INTERVAL = 1.0

_UPSERT = (
    "INSERT INTO entries (key, seqid_offset, stored_at, used_seq, size, message, args) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
    "seqid_offset = excluded.seqid_offset, stored_at = excluded.stored_at, "
    "used_seq = excluded.used_seq, size = excluded.size, message = excluded.message, "
    "args = excluded.args"
)

# Writer operations: (kind, ...) tuples.
PUT = 0  # (PUT, key, CachedReply)
TOUCH = 1  # (TOUCH, key)
DELETE = 2  # (DELETE, key, stored_at): only the row that was read
FLUSH = 3  # (FLUSH, concurrent Future)
STOP = 4  # (STOP, concurrent Future)

Op = tuple[Any, ...]


class SqliteWriter:
    """The writer thread's side of `SqliteStore`: the write connection and its figures.

    Args:
        conn: the write connection (`sqlite_file.open_file`); closed when `run` ends.
        path: the file, for messages.
        ops: the queue the store fills; `run` applies it until a `STOP`.
        ttl, max_entries, max_bytes, clock: as for `SqliteStore`.
        purge_interval: seconds between purges of expired rows.
        warn: logs a warning about a kind of trouble, rate-limited by the store.
        busy_timeout: as for `SqliteStore`, for a fresh file opened at the path.
        health: where failures are flagged and counted (shared with the reader).
        wake_reader: makes the reader thread try a read (a probe) soon.
        release_reader: makes the reader close its connection, and waits for it.

    Raises:
        sqlite3.Error: the figures could not be read or the bounds not applied.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        ops: queue.Queue[Op],
        *,
        ttl: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float],
        purge_interval: float,
        warn: Callable[[str, str], None],
        busy_timeout: float = 5.0,
        health: StoreHealth | None = None,
        wake_reader: Callable[[], None] = lambda: None,
        release_reader: Callable[[], None] = lambda: None,
    ) -> None:
        self.conn = conn
        self.path = path
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.purge_interval = purge_interval
        self._ops = ops
        self._clock = clock
        self._warn = warn
        self.busy_timeout = busy_timeout
        self.health = health if health is not None else StoreHealth()
        self._wake_reader = wake_reader
        self._release_reader = release_reader
        # What the path named when the file was opened: a change means deleted or replaced.
        self.identity: FileIdentity | None = file_identity(path)
        # The reader's connection; replaced when a fresh file is opened (the reader switches).
        self.reader_conn: sqlite3.Connection | None = None
        self.failed_writes = 0
        self.entries, self.bytes, self._seq = figures(conn)
        self._in_transaction(self._trim_now)

    @property
    def healthy(self) -> bool:
        return self.health.healthy

    def trouble(self, what: str, exc: BaseException) -> None:
        """An SQLite error in ``what`` (read, write, purge): flagged, counted and logged."""
        self.health.failed(what)
        self._warn(what, f"{what} failed: {exc}")

    def check_file(self) -> None:
        """Open a fresh file when the one open is no longer the file at the path."""
        health = self.health
        if not health.file_lost:
            now = file_identity(self.path)
            if now == self.identity:
                if health.read_failed:
                    self._wake_reader()  # healthy again once a read works
                return
            health.failed("file")
            health.read_failed = True
            how = "deleted" if now is None else "replaced"
            self._warn(
                "file",
                f"the file was {how} while open (what is written to it now is lost); "
                "opening the file at the path afresh",
            )
        self._reopen()

    def _reopen(self) -> None:
        """Close the lost file, then open the file at the path (created when missing).

        Both connections to the lost file are closed first: the last one to
        close removes the ``-wal`` and ``-shm`` files at the path, which belong
        to it and must not be read as the new file's.
        """
        if self.reader_conn is not None:
            self.reader_conn = None
            self._release_reader()  # returns once the reader has closed its connection
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()
        reader = None
        try:
            conn = open_file(self.path, self.busy_timeout)
            try:
                reader = connect(self.path, self.busy_timeout)
                reader.execute("PRAGMA query_only = 1")
                self.conn = conn
                self.entries, self.bytes, self._seq = figures(conn)
                self._in_transaction(self._trim_now)
            except sqlite3.Error:
                conn.close()
                if reader is not None:
                    reader.close()
                raise
        except (ConfigError, Damaged, sqlite3.Error) as exc:
            self.health.failed("reopen")
            self._warn(
                "reopen",
                f"cannot open a fresh file ({exc}); retrying every {CHECK_INTERVAL:g}s, "
                "fallback replies are neither stored nor served meanwhile",
            )
            return
        self.identity = file_identity(self.path)
        self.health.read_failed = True  # until the reader has read the new file
        self.reader_conn = reader
        self.health.write_failed = False
        self.health.file_lost = False
        self._wake_reader()
        log.warning(
            "fallback cache %s: opened the file at the path afresh (%d entries in it); "
            "replies stored in the lost file are gone",
            self.path,
            self.entries,
        )

    def run(self) -> None:
        """The writer thread: apply batches and purge until a `STOP`, then close the file."""
        next_purge = time.monotonic() + self.purge_interval
        next_check = time.monotonic() + CHECK_INTERVAL
        stopping = False
        try:
            while not stopping:
                batch: list[Op] = []
                wait = min(next_purge, next_check) - time.monotonic()
                with contextlib.suppress(queue.Empty):
                    batch.append(self._ops.get(True, max(wait, 0.0)))
                while len(batch) < BATCH_SIZE:
                    try:
                        batch.append(self._ops.get_nowait())
                    except queue.Empty:
                        break
                if batch:
                    stopping = self._apply(batch)
                if time.monotonic() >= next_check:
                    self.check_file()
                    next_check = time.monotonic() + CHECK_INTERVAL
                if time.monotonic() >= next_purge:
                    if not self.health.file_lost:
                        self._purge()
                    next_purge = time.monotonic() + self.purge_interval
        finally:
            self.conn.close()

    def _apply(self, batch: list[Op]) -> bool:
        """Apply one batch in one transaction; True when it holds the stop request."""
        # Each key stored or read in the batch, in the order of its last use: a
        # reply to store, or None for a read. The LRU order is taken from it.
        uses: dict[str, CachedReply | None] = {}
        deletes: list[tuple[str, float]] = []
        waiters: list[concurrent.futures.Future[None]] = []
        stopping = False
        for op in batch:
            kind = op[0]
            if kind == PUT:
                uses.pop(op[1], None)
                uses[op[1]] = op[2]
            elif kind == TOUCH:
                uses[op[1]] = uses.pop(op[1], None)  # a reply stored earlier in the batch stays
            elif kind == DELETE:
                deletes.append((op[1], op[2]))
            else:
                waiters.append(op[1])
                stopping = stopping or kind == STOP
        puts = sum(reply is not None for reply in uses.values())
        try:
            if self.health.file_lost:  # nowhere to write until a fresh file is open
                self.failed_writes += puts
            elif uses or deletes:
                self._in_transaction(lambda: self._write(uses, deletes))
                self.health.write_failed = False
        except sqlite3.Error as exc:
            self.failed_writes += puts
            self.trouble("write", exc)
            self.check_file()  # the file may be gone: SQLite says no more than "I/O error"
        except Exception:  # a bug: keep the thread, and the cache, alive
            self.failed_writes += puts
            self.health.failed("write")
            log.exception("fallback cache %s: unexpected error in the writer", self.path)
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return stopping

    def _in_transaction(self, work: Callable[[], None]) -> None:
        """Run ``work`` in one write transaction; on an error roll back and recount."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            work()
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            with contextlib.suppress(sqlite3.Error):
                self.entries, self.bytes, _ = figures(conn)
            raise

    def _write(self, uses: dict[str, CachedReply | None], deletes: list[tuple[str, float]]) -> None:
        """Apply a batch: deletes, then stores and reads, numbered in the order of their use."""
        conn = self.conn
        entries, nbytes = self.entries, self.bytes
        for key, stored_at in deletes:
            row = conn.execute(
                "SELECT size FROM entries WHERE key = ? AND stored_at = ?", (key, stored_at)
            ).fetchone()
            if row is not None:
                conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                entries -= 1
                nbytes -= row[0]
        for key, reply in uses.items():
            if reply is None:  # read: now the most recently used
                self._seq += 1
                conn.execute("UPDATE entries SET used_seq = ? WHERE key = ?", (self._seq, key))
                continue
            row = conn.execute("SELECT size FROM entries WHERE key = ?", (key,)).fetchone()
            if row is not None:
                entries -= 1
                nbytes -= row[0]
            cost = len(key) + reply.size + ROW_OVERHEAD
            if cost > self.max_bytes:  # can never fit; and the older reply is not the last one
                if row is not None:
                    conn.execute("DELETE FROM entries WHERE key = ?", (key,))
                continue
            self._seq += 1
            conn.execute(
                _UPSERT,
                (
                    key,
                    reply.seqid_offset,
                    reply.stored_at,
                    self._seq,
                    cost,
                    reply.message,
                    reply.args,
                ),
            )
            entries += 1
            nbytes += cost
        self.entries, self.bytes = entries, nbytes
        self._trim_now()

    def _trim_now(self) -> None:
        """Delete least recently used rows until both bounds hold (inside a transaction)."""
        conn = self.conn
        entries, nbytes = self.entries, self.bytes
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
        self.entries, self.bytes = entries, nbytes

    def _purge(self) -> None:
        """Delete the rows older than the TTL; return free pages when many."""
        conn = self.conn
        cutoff = self._clock() - self.ttl

        def purge() -> None:
            count, size = conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM entries WHERE stored_at < ?",
                (cutoff,),
            ).fetchone()
            if count:
                conn.execute("DELETE FROM entries WHERE stored_at < ?", (cutoff,))
                self.entries -= count
                self.bytes -= size

        try:
            self._in_transaction(purge)
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            if free * 4 > pages:
                conn.execute("PRAGMA incremental_vacuum").fetchall()
        except sqlite3.Error as exc:
            self.trouble("purge", exc)
