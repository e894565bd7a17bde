"""Connections to one upstream address, pooled; one call in flight per connection.

One exchange, driven by callbacks (no task or future on the way):

1. the caller takes an idle connection (`UpstreamPool.idle`, most recently
   used first), or awaits `UpstreamPool.acquire`, which opens one (up to
   ``pool_size``) or waits for one to be released;
2. `UpstreamConnection.send` gives the call a fresh seqid of this connection
   (the client's is restored by the caller), writes it, and files a per-try
   timeout (`sidecar.proxy.timeouts`); a oneway call expects nothing;
3. the reply, checked (exactly one message, the seqid sent, REPLY or
   EXCEPTION), goes to the caller's `ReplyHandler.on_reply`, after the
   connection is back in the pool; any failure goes to ``on_error``;
4. a connection that timed out, was reset or sent garbage is closed, never
   reused: a late reply must never be read as the answer to the next call.

Errors say whether anything may have reached the upstream (``sent``), which
decides whether a call that is not idempotent may be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Protocol, cast

from sidecar.errors import (
    RemoteProtocolError,
    UpstreamClosed,
    UpstreamError,
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
_REPLY = MessageType.REPLY
_EXCEPTION = MessageType.EXCEPTION


class ReplyHandler(Protocol):
    """Where the result of one exchange goes."""

    def on_reply(self, reply: Message) -> None:
        """The reply arrived; the connection is already back in the pool."""

    def on_error(self, error: UpstreamError) -> None:
        """The exchange failed; the connection is closed."""


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to the upstream; at most one call waits on it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._decoder: FramedDecoder | BufferedDecoder = make_decoder(
            pool.transport_kind, pool.max_message_size
        )
        self.transport: asyncio.Transport | None = None
        self._handler: ReplyHandler | None = None
        self._expected = 0
        self._bucket = 0
        self._timeout = 0.0
        self._seqid = 0
        self.closed = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    def send(
        self, message: Message, handler: ReplyHandler | None, expires: float, timeout: float
    ) -> None:
        """Write one call under a fresh seqid; its reply or failure goes to ``handler``.

        Args:
            message: the call; its seqid is overwritten.
            handler: None for a oneway call (nothing is awaited; the caller
                releases the connection).
            expires: loop time after which the reply is too late.
            timeout: the per-try timeout, for the error message.
        """
        self._seqid = seqid = (self._seqid + 1) & _SEQID_MASK
        message.set_seqid(seqid)
        if handler is not None:
            self._handler = handler
            self._expected = seqid
            self._timeout = timeout
            self._bucket = self._pool.timeouts.add(expires, self, self._expire)
        assert self.transport is not None
        self.transport.write(message.to_wire(self._pool.transport_kind))

    def data_received(self, data: bytes) -> None:
        address = self._pool.address
        try:
            messages = self._decoder.receive_data(data)
        except RemoteProtocolError as exc:
            self._fail(
                UpstreamProtocolError(
                    f"upstream {address} sent invalid bytes: {exc}", address=address, sent=True
                )
            )
            return
        if not messages:
            return
        handler = self._handler
        reply = messages[0]
        header = reply.header
        if handler is None:
            problem = "a message nobody asked for"
        elif header.seqid != self._expected:
            problem = f"a reply with seqid {header.seqid}, expected {self._expected}"
        elif header.type is not _REPLY and header.type is not _EXCEPTION:
            problem = f"a {header.type.name} message as a reply"
        else:
            problem = ""
        if problem:
            self._fail(
                UpstreamProtocolError(
                    f"upstream {address} sent {problem}", address=address, sent=True
                )
            )
            return
        assert handler is not None
        self._handler = None
        self._pool.timeouts.remove(self._bucket, self)
        if len(messages) > 1 or self._decoder.error is not None:
            # More than the one reply in flight (garbage or an unsolicited
            # message after it): the reply stands, the connection goes.
            self._broken()
        else:
            self._pool.release(self, True)
        handler.on_reply(reply)

    def eof_received(self) -> bool:
        self._fail(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(None)

    def _expire(self) -> None:
        """The per-try timeout fired (`Timeouts` callback)."""
        handler = self._handler
        if handler is None:
            return
        self._handler = None
        self._broken()
        address = self._pool.address
        handler.on_error(
            UpstreamTimeout(
                f"upstream {address} did not reply within {self._timeout:g}s",
                address=address,
                sent=True,
            )
        )

    def _fail(self, error: UpstreamError | None) -> None:
        """Close; the call in flight, if any, fails with ``error`` (or "closed")."""
        handler = self._handler
        self._handler = None
        if handler is not None:
            self._pool.timeouts.remove(self._bucket, self)
        self._broken()
        if handler is not None:
            address = self._pool.address
            handler.on_error(
                error
                or UpstreamClosed(
                    f"upstream {address} closed the connection before replying",
                    address=address,
                    sent=True,
                )
            )

    def _broken(self) -> None:
        """The connection cannot be used again."""
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self._pool._connection_closed(self)

    def abandon(self) -> None:
        """Forget the call in flight (it was cancelled) and close: a late reply dies here."""
        if self._handler is not None:
            self._pool.timeouts.remove(self._bucket, self)
            self._handler = None
        self._broken()

    def close(self) -> None:
        """Close now (idle connections); a late reply is dropped with the connection."""
        self.abandon()


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

    def idle(self) -> UpstreamConnection | None:
        """An idle open connection, most recently used first, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    async def acquire(self, timeout: float) -> UpstreamConnection:
        """An open connection for one call; the caller must `release` it.

        Waiting for a free connection and connecting together take at most
        ``timeout`` seconds (a connect also at most ``connect_timeout``).

        Raises:
            UpstreamUnavailable: cannot connect, or none free within ``timeout``.
        """
        conn = self.idle()
        if conn is not None:
            return conn
        if self._open < self.size:
            self._open += 1  # the slot is ours from now: nobody else may take it
            return await self._connect(timeout)
        loop = self.loop
        expires = loop.time() + timeout
        waiter: asyncio.Future[UpstreamConnection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                handed = await waiter
        except BaseException as exc:
            self._pass_on(waiter)
            if isinstance(exc, TimeoutError):
                raise UpstreamUnavailable(
                    f"all {self.size} connections to upstream {self.address} stayed busy "
                    f"for {timeout:g}s",
                    address=self.address,
                ) from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        if handed is None:  # a slot was handed to us (counted): open a connection in it
            return await self._connect(expires - loop.time())
        return handed

    async def _connect(self, timeout: float) -> UpstreamConnection:
        """Open a connection in a slot already counted in ``_open``.

        Gives up after ``timeout`` or ``connect_timeout``, the shorter. On any
        failure the slot is freed exactly once: by the connection's own close
        when one was made (a cancel after ``connection_made``), else here.
        """
        loop = self.loop
        limit = max(0.0, min(self.connect_timeout, timeout))
        made: list[UpstreamConnection] = []

        def protocol() -> UpstreamConnection:
            conn = UpstreamConnection(self)
            made.append(conn)
            return conn

        def give_back() -> None:
            if made:
                made[0]._broken()  # frees the slot once, however often it is closed
            else:
                self._slot_freed()

        try:
            async with asyncio.timeout(limit):
                await loop.create_connection(protocol, self.host, self.port)
        except TimeoutError:
            give_back()
            raise UpstreamUnavailable(
                f"cannot connect to upstream {self.address}: no answer within {limit:g}s",
                address=self.address,
            ) from None
        except OSError as exc:
            give_back()
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise UpstreamUnavailable(
                f"cannot connect to upstream {self.address}: {reason}", address=self.address
            ) from None
        except BaseException:
            give_back()
            raise
        conn = made[0]
        if conn.closed:  # closed between connect and now
            raise UpstreamUnavailable(
                f"upstream {self.address} closed the connection at once", address=self.address
            )
        return conn

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

    def _pass_on(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        """A waiter gave up: what it was handed (a connection, or a free slot) goes on."""
        if not waiter.done():
            waiter.cancel()
        elif not waiter.cancelled():
            handed = waiter.result()
            if handed is not None:
                self.release(handed, True)
            else:  # the slot counted for this waiter goes back, and on to the next one
                self._slot_freed()

    def _connection_closed(self, conn: UpstreamConnection) -> None:
        """Called once per connection when it closes."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self._open -= 1
        self._hand_slot()

    def _hand_slot(self) -> None:
        """Give a free slot to the first waiter (counted now), to open a connection in."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1
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
