"""A fallback store shared by the workers of one sidecar (``workers: N``): the worker's end.

The configured store (memory or SQLite) lives in the supervisor behind a
`sidecar.fallback.shared_host.StoreHost`; each worker uses a `SharedStore`
that talks to it over one Unix stream socket. ``put`` queues (bounded:
dropped and counted when full) and one writer task sends the queue in
batches; ``get`` is one request answered within ``get_timeout`` or a miss;
``stats`` are the host's figures as last fetched (every ``stats_interval``)
and this worker's counters, no I/O; ``flush`` is a barrier that the host
answers after applying every earlier put. A lost connection is retried with
a bounded backoff; meanwhile gets are misses and puts wait in the queue.

The frames: `sidecar.fallback.shared_wire`. Why and the constants:
docs/fallback-stores.md ("Shared by workers").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable

from sidecar.fallback.shared_wire import (
    FLUSH,
    GET,
    HEADER,
    MAX_FRAME_BYTES,
    MAX_KEY_BYTES,
    PUT_HEAD,
    STATS,
    WireError,
    parse_stats,
    put_frame,
    read_header,
    read_reply,
)
from sidecar.fallback.store import CachedReply, StoreStats
from sidecar.fleet.redis_client import stop_task

log = logging.getLogger("sidecar.fallback")

# -- the worker's side --------------------------------------------------------------------

# Puts queued before further puts are dropped (as the other stores': about a
# second of distinct-key puts at a busy sidecar's rate, a few MiB).
QUEUE_SIZE = 10_000
# Frames written before the writer waits for the socket to take them.
BATCH_SIZE = 256
# Seconds a get waits for the host (as the SQLite store's reads).
GET_TIMEOUT = 0.25
# Gets waiting for the host before further gets are misses.
MAX_PENDING_READS = 1000
# Seconds between reconnection attempts: doubled from the first to the last.
RECONNECT_DELAYS = (0.05, 1.0)
# Seconds a connection attempt may take (a Unix socket answers at once or not at all).
CONNECT_TIMEOUT = 1.0
# Seconds `flush` waits for the barrier, and `close` for its flush.
FLUSH_TIMEOUT = 5.0
CLOSE_TIMEOUT = 2.0

_Item = tuple[bytes, CachedReply] | asyncio.Future[CachedReply | None]


class SharedStore:
    """The worker's end of a `StoreHost`: a `FallbackStore` over a Unix socket.

    Call `start` from the worker's start-up (on its loop): it connects. A
    put, get or flush made on the loop without it starts the tasks too (a
    get is then a miss: the connection is not up yet).

    Args:
        path: the host's socket.
        ttl: seconds an entry may be served after it was stored (checked again here).
        backend_name: the host's store (``memory``, ``sqlite``), reported as ``backend``.
        get_timeout: seconds a get waits before it is a miss.
        queue_size: puts queued before further puts are dropped.
        stats_interval: seconds between two fetches of the host's figures.
        clock: Unix time, for the TTL.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        ttl: float,
        backend_name: str,
        get_timeout: float = GET_TIMEOUT,
        queue_size: int = QUEUE_SIZE,
        stats_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        self.ttl = ttl
        self.backend = backend_name
        self.get_timeout = get_timeout
        self.queue_size = queue_size
        self.stats_interval = stats_interval
        self._clock = clock
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_puts = 0
        self._wake = asyncio.Event()
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[CachedReply | None]] = {}  # gets
        self._barriers: dict[int, asyncio.Future[CachedReply | None]] = {}  # flushes, stats
        self._stats_asked = False  # a STATS request is unanswered
        self._last_id = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._attempted: asyncio.Event | None = None
        self._closed = False
        self._host_healthy = True
        self._warned_backend = False
        self.entries = 0
        self.bytes = 0
        self.dropped_writes = 0
        self.failed_writes = 0
        self.missed_reads = 0
        self.connections = 0  # made so far (reconnections are the rest)

    # -- the interface ---------------------------------------------------------------

    def put(self, key: str, reply: CachedReply) -> None:
        """Queue the put for the host; dropped and counted when the queue is full."""
        if self._closed:
            return
        raw = key.encode()
        if (
            self._queued_puts >= self.queue_size
            or len(raw) > MAX_KEY_BYTES
            or PUT_HEAD.size + len(raw) + reply.size > MAX_FRAME_BYTES
        ):
            self.dropped_writes += 1
            return
        self._queue.append((raw, reply))
        self._queued_puts += 1
        self._wake.set()
        if not self._tasks:
            with contextlib.suppress(RuntimeError):  # no loop yet: sent once started
                self._ensure_started()

    async def get(self, key: str) -> CachedReply | None:
        """The host's reply for ``key`` within ``get_timeout``; None if none, stale or late."""
        if self._closed:
            return None
        self._ensure_started()
        writer = self._writer
        if writer is None or len(self._pending) >= MAX_PENDING_READS:
            self.missed_reads += 1
            return None
        future: asyncio.Future[CachedReply | None] = asyncio.get_running_loop().create_future()
        request_id = self._send(writer, GET, key.encode(), self._pending, future)
        handle = asyncio.get_running_loop().call_later(self.get_timeout, self._expire, future)
        try:
            reply = await future
        finally:
            handle.cancel()
            self._pending.pop(request_id, None)
        if reply is None or self._clock() - reply.stored_at > self.ttl:
            return None
        return reply

    def stats(self) -> StoreStats:
        """The host's entries and bytes as last fetched, this worker's counters; no I/O."""
        return StoreStats(
            self.backend,
            self.entries,
            self.bytes,
            healthy=self._writer is not None and self._host_healthy,
            dropped_writes=self.dropped_writes,
            failed_writes=self.failed_writes,
            missed_reads=self.missed_reads,
        )

    async def start(self) -> None:
        """Start the tasks and wait (at most `CONNECT_TIMEOUT`) for the first connection attempt.

        The host not being there is not an error: the store keeps trying.
        """
        self._ensure_started()
        assert self._attempted is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._attempted.wait(), CONNECT_TIMEOUT)

    async def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait until the host has applied every put made before this call.

        Returns early (those puts may be lost) when the connection breaks, the
        store is closed, or after ``timeout`` seconds (logged).
        """
        if self._closed:
            return
        self._ensure_started()
        future: asyncio.Future[CachedReply | None] = asyncio.get_running_loop().create_future()
        self._queue.append(future)
        self._wake.set()
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            log.warning("fallback cache: the store host did not answer a flush within %gs", timeout)

    async def close(self) -> None:
        """Flush (within `CLOSE_TIMEOUT`, if connected), stop the tasks, drop what is left."""
        if self._closed:
            return
        if self._writer is not None:
            await self.flush(CLOSE_TIMEOUT)
        self._closed = True
        for task in self._tasks:
            await stop_task(task)
        self._tasks.clear()
        self.failed_writes += self._queued_puts
        self._forget_queue()

    # -- the tasks -------------------------------------------------------------------

    def _ensure_started(self) -> None:
        if self._tasks or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._attempted = asyncio.Event()
        self._tasks = [
            loop.create_task(self._connect_loop(), name="fallback-shared-store"),
            loop.create_task(self._stats_loop(), name="fallback-shared-stats"),
        ]

    async def _connect_loop(self) -> None:
        """Connect, run the connection until it breaks, wait, again."""
        assert self._attempted is not None
        delay, longest = RECONNECT_DELAYS
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.path), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                self._attempted.set()
                if delay == RECONNECT_DELAYS[0]:  # the first failure in a row
                    log.warning("fallback cache: cannot reach the store host: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, longest)
                continue
            delay = RECONNECT_DELAYS[0]
            self.connections += 1
            if self.connections > 1:
                log.info("fallback cache: reconnected to the store host")
            failed = False
            try:
                await self._serve(reader, writer)
            except Exception:  # a bug must not end the store: log, drop the connection, retry
                log.exception("fallback cache: the store host connection failed")
                failed = True
            finally:
                self._writer = None
                self._fail_pending()
                writer.transport.abort()  # what is unsent is lost either way; close() could linger
            if failed:
                await asyncio.sleep(longest)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Write queued frames until the connection is lost (the reader task then wakes us)."""
        assert self._attempted is not None
        read_task = asyncio.get_running_loop().create_task(
            self._read_loop(reader), name="fallback-shared-reader"
        )
        self._writer = writer
        self._attempted.set()
        self._request_stats(writer)
        try:
            while not read_task.done():
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                pieces: list[bytes] = []  # one writelines per batch: one writev on uvloop
                for _ in range(min(BATCH_SIZE, len(self._queue))):
                    item = self._queue.popleft()
                    if isinstance(item, tuple):
                        self._queued_puts -= 1
                        pieces += put_frame(*item)
                    elif not item.done():
                        writer.writelines(pieces)  # the puts before the barrier go first
                        pieces = []
                        self._send(writer, FLUSH, b"", self._barriers, item)
                writer.writelines(pieces)
                await writer.drain()
        except OSError as exc:
            log.warning("fallback cache: the store host connection broke: %s", exc)
        finally:
            await stop_task(read_task)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        """Resolve the requests the host answers, until it closes or breaks the format."""
        try:
            while True:
                length, op, request_id = await read_header(reader)
                if op == GET:
                    reply = await read_reply(reader, length)
                    future = self._pending.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result(reply)
                elif op in (STATS, FLUSH):
                    self._take_stats(await reader.readexactly(length))
                    if op == STATS:
                        self._stats_asked = False
                    future = self._barriers.pop(request_id, None)
                    if future is not None and not future.done():
                        future.set_result(None)
                else:
                    raise WireError(f"op {op} is not an answer")
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("fallback cache: the store host closed the connection")
        except WireError as exc:
            log.warning("fallback cache: bad frame from the store host (%s); reconnecting", exc)
        finally:
            self._wake.set()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.stats_interval)
            if self._writer is not None:
                self._request_stats(self._writer)

    # -- helpers ---------------------------------------------------------------------

    def _send(
        self,
        writer: asyncio.StreamWriter,
        op: int,
        body: bytes,
        table: dict[int, asyncio.Future[CachedReply | None]],
        future: asyncio.Future[CachedReply | None],
    ) -> int:
        """Write one request and register the future its answer resolves; its request id."""
        self._last_id = self._last_id % 0xFFFFFFFF + 1  # 1..2**32-1; 0 is a put's
        table[self._last_id] = future
        # One write, one send(): a key is short, and each write() of an idle
        # connection is a system call that wakes the host.
        writer.write(HEADER.pack(len(body), op, self._last_id) + body)
        return self._last_id

    def _request_stats(self, writer: asyncio.StreamWriter) -> None:
        if not self._stats_asked:
            self._stats_asked = True
            future: asyncio.Future[CachedReply | None] = asyncio.get_running_loop().create_future()
            self._send(writer, STATS, b"", self._barriers, future)

    def _take_stats(self, body: bytes) -> None:
        self.entries, self.bytes, self._host_healthy, name = parse_stats(body)
        if name != self.backend and not self._warned_backend:
            self._warned_backend = True
            log.warning("fallback cache: the store host runs %s, not %s", name, self.backend)

    def _expire(self, future: asyncio.Future[CachedReply | None]) -> None:
        if not future.done():
            self.missed_reads += 1
            future.set_result(None)

    def _fail_pending(self) -> None:
        """Answer every request of a lost connection: gets are misses, flushes return."""
        for future in self._pending.values():
            self._expire(future)
        for future in self._barriers.values():
            if not future.done():
                future.set_result(None)
        self._pending.clear()
        self._barriers.clear()
        self._stats_asked = False

    def _forget_queue(self) -> None:
        for item in self._queue:
            if not isinstance(item, tuple) and not item.done():
                item.set_result(None)
        self._queue.clear()
        self._queued_puts = 0
