"""Connections to one upstream address, pooled; one call in flight per connection.

`UpstreamPool.exchange` sends one message and returns the reply:

1. take an idle connection (most recently used first) or open one, up to
   ``pool_size``; beyond that, wait for one to be released;
2. give the call a fresh seqid of this connection (the client's is restored by
   the caller), send it, and for a oneway call return at once;
3. wait for exactly one reply, at most ``timeout`` seconds; check its seqid;
4. put the connection back, or close it when anything went wrong: a
   connection that timed out, was reset or sent garbage may still deliver a
   late reply, which must never be read as the answer to the next call.

Errors say whether anything may have reached the upstream (``sent``), which
decides whether a call that is not idempotent may be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import cast

from sidecar.errors import (
    RemoteProtocolError,
    UpstreamClosed,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import (
    BufferedDecoder,
    FramedDecoder,
    Message,
    Transport,
    make_decoder,
)
from sidecar.proxy.timeouts import Timeouts

log = logging.getLogger("sidecar.upstream")

_SEQID_MASK = 0x7FFFFFFF


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to the upstream; at most one call waits on it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._decoder: FramedDecoder | BufferedDecoder = make_decoder(
            pool.transport_kind, pool.max_message_size
        )
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Message] | None = None
        self._seqid = 0
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._decoder.receive_data(data)
        except RemoteProtocolError as exc:
            self._broken(
                UpstreamProtocolError(
                    f"upstream {self._pool.address} sent invalid bytes: {exc}",
                    address=self._pool.address,
                    sent=True,
                )
            )
            return
        for message in messages:
            waiter = self._waiter
            if waiter is None or waiter.done():
                self._broken(
                    UpstreamProtocolError(
                        f"upstream {self._pool.address} sent a message nobody asked for",
                        address=self._pool.address,
                        sent=True,
                    )
                )
                return
            self._waiter = None
            waiter.set_result(message)
        if self._decoder.error is not None:
            # Invalid bytes right after a whole reply (the reply is delivered above):
            # this connection is never used again.
            self._broken(
                UpstreamProtocolError(
                    f"upstream {self._pool.address} sent invalid bytes: {self._decoder.error}",
                    address=self._pool.address,
                    sent=True,
                )
            )

    def eof_received(self) -> bool:
        self._broken(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._broken(None)

    def _broken(self, error: Exception | None) -> None:
        """The connection cannot be used again; fail the waiting call, if any."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self._pool._connection_closed(self)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_exception(
                error
                or UpstreamClosed(
                    f"upstream {self._pool.address} closed the connection before replying",
                    address=self._pool.address,
                    sent=True,
                )
            )

    def next_seqid(self) -> int:
        self._seqid = (self._seqid + 1) & _SEQID_MASK
        return self._seqid

    def close(self) -> None:
        """Close now; a late reply is dropped with the connection."""
        self._waiter = None
        self._broken(None)


class UpstreamPool:
    """Connections to one ``host:port``.

    Args:
        address: ``host:port``.
        transport_kind: framed or buffered, as the upstream speaks.
        size: most connections open at once.
        connect_timeout: seconds to wait for a TCP connection.
        max_message_size: largest reply accepted.
        timeouts: the loop's per-try timeouts.
        loop: the event loop the pool runs on.
    """

    def __init__(
        self,
        address: str,
        host: str,
        port: int,
        transport_kind: Transport,
        *,
        size: int,
        connect_timeout: float,
        max_message_size: int,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.address = address
        self.timeouts = timeouts
        # Kept, not looked up: asyncio.get_running_loop() costs a getpid() system call.
        self.loop = loop
        self.host = host
        self.port = port
        self.transport_kind = transport_kind
        self.size = size
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self._idle: list[UpstreamConnection] = []
        self._open = 0
        self._waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    async def exchange(self, message: Message, *, oneway: bool, timeout: float) -> Message | None:
        """Send one call and return its reply (None for oneway).

        The message's seqid is overwritten with one of the connection's; the
        reply's header keeps the seqid it arrived with.

        Raises:
            UpstreamUnavailable: no connection could be had (nothing sent).
            UpstreamTimeout: no reply within ``timeout`` (sent).
            UpstreamClosed: the connection ended before the reply (sent).
            UpstreamProtocolError: the reply is not valid or not ours (sent).
        """
        loop = self.loop
        expires = loop.time() + timeout  # the whole attempt: connect, send and reply
        conn = await self.acquire(timeout)
        reusable = False
        try:
            seqid = conn.next_seqid()
            message.set_seqid(seqid)
            waiter: asyncio.Future[Message] | None = None
            if not oneway:
                waiter = loop.create_future()
                conn._waiter = waiter
            assert conn.transport is not None
            conn.transport.write(message.to_wire(self.transport_kind))
            if waiter is None:
                reusable = True
                return None
            bucket = self.timeouts.add(
                expires, conn, lambda: _expire(waiter, self.address, timeout)
            )
            try:
                reply = await waiter
            finally:
                self.timeouts.remove(bucket, conn)
            header = reply.header
            if header.seqid != seqid:
                raise UpstreamProtocolError(
                    f"upstream {self.address} replied with seqid {header.seqid}, expected {seqid}",
                    address=self.address,
                    sent=True,
                )
            if header.type != MessageType.REPLY and header.type != MessageType.EXCEPTION:
                raise UpstreamProtocolError(
                    f"upstream {self.address} sent a {header.type.name} message as a reply",
                    address=self.address,
                    sent=True,
                )
            reusable = True
            return reply
        finally:
            self.release(conn, reusable)

    async def acquire(self, timeout: float) -> UpstreamConnection:
        """An open connection for one call; the caller must `release` it.

        Waiting for a free connection and connecting together take at most
        ``timeout`` seconds (a connect also at most ``connect_timeout``).

        Raises:
            UpstreamUnavailable: cannot connect, or none free within ``timeout``.
        """
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        if self._open < self.size:
            return await self._connect(timeout)
        loop = self.loop
        expires = loop.time() + timeout
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                handed = await waiter
        except TimeoutError:
            raise UpstreamUnavailable(
                f"all {self.size} connections to upstream {self.address} stayed busy "
                f"for {timeout:g}s",
                address=self.address,
            ) from None
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        if handed is None:  # a slot was freed: open a connection of our own
            return await self._connect(expires - loop.time())
        return handed

    async def _connect(self, timeout: float) -> UpstreamConnection:
        """Open a connection, giving up after ``timeout`` or ``connect_timeout``, the shorter."""
        self._open += 1
        loop = self.loop
        limit = max(0.0, min(self.connect_timeout, timeout))
        try:
            async with asyncio.timeout(limit):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port
                )
        except TimeoutError:
            self._slot_freed()
            raise UpstreamUnavailable(
                f"cannot connect to upstream {self.address}: no answer within {limit:g}s",
                address=self.address,
            ) from None
        except OSError as exc:
            self._slot_freed()
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamUnavailable(
                f"cannot connect to upstream {self.address}: {reason}", address=self.address
            ) from None
        except BaseException:
            self._slot_freed()
            raise
        assert isinstance(protocol, UpstreamConnection)
        if protocol.closed:  # closed between connect and now
            raise UpstreamUnavailable(
                f"upstream {self.address} closed the connection at once", address=self.address
            )
        return protocol

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return a connection after a call; close it unless ``reusable``."""
        if not reusable or conn.closed or self._closed:
            conn.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _connection_closed(self, conn: UpstreamConnection) -> None:
        """Called once per connection when it closes."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close_idle(self, older_than: float) -> int:
        """Close connections idle for more than ``older_than`` seconds; return how many."""
        now = self.loop.time()
        stale = [c for c in self._idle if now - c.idle_since > older_than]
        for conn in stale:
            conn.close()
        return len(stale)

    def close(self) -> None:
        """Close every idle connection and refuse to keep new ones."""
        self._closed = True
        for conn in list(self._idle):
            conn.close()


def _expire(waiter: asyncio.Future[Message], address: str, timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(
            UpstreamTimeout(
                f"upstream {address} did not reply within {timeout:g}s",
                address=address,
                sent=True,
            )
        )
