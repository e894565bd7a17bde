"""Connections to one upstream address, pooled; one call at a time per connection, as a rule.

One exchange, driven by callbacks (no task or future on the way):

1. the caller takes an idle connection (`UpstreamPool.idle`, most recently
   used first), or awaits `UpstreamPool.acquire`, which opens one (up to
   ``pool_size``) or waits for one to be released;
2. `UpstreamConnection.send` gives the call a fresh seqid of this connection
   (the client's is restored by the caller), writes it, and files a per-try
   timeout (`sidecar.proxy.timeouts`); a oneway call expects nothing;
3. the reply, checked (the seqid sent, REPLY or EXCEPTION), goes to the
   caller's `ReplyHandler.on_reply`, after the connection is back in the pool
   when nothing else waits on it; any failure goes to ``on_error``;
4. a connection that timed out, was reset or sent garbage is closed, never
   reused: a late reply must never be read as the answer to the next call.

Replies are matched by seqid, and a Thrift server answers a connection's
calls in order, which gives two more rules:

- a reply to a call sent as oneway (a two-way method that a client marked
  ONEWAY: servers answer it anyway) is recognised by its seqid and dropped,
  never taken for the next call's reply (`MAX_ONEWAY_SEQIDS` remembered);
- a second call may be sent behind one that is still waiting (a client's
  next call behind a CALL that may be oneway, `sidecar.proxy.client`, or
  the sidecar's own probe, `sidecar.proxy.oneway_probe`); when
  the later one is answered first, the earlier one was oneway and is told so
  (`ReplyHandler.on_no_reply`).

Errors say whether anything may have reached the upstream (``sent``), which
decides whether a call that is not idempotent may be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Final, cast

from mypy_extensions import mypyc_attr

from sidecar.errors import (
    RemoteProtocolError,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.logs import RateLimitedLog
from sidecar.protocol.auto import Decoder, decoder_for
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.envelope import Protocol as WireProtocol
from sidecar.protocol.framing import Message, Transport
from sidecar.proxy.timeouts import Bucket, Timeouts
from sidecar.proxy.tls import UpstreamTls

log: Final = logging.getLogger("sidecar.upstream")
# A client can make the upstream send strays at will: their lines are rate-limited.
stray_log: Final = RateLimitedLog(log, what="stray reply lines")
# Replies to no call dropped on one connection before it is failed instead: past
# this many, the upstream's replies on it are not to be trusted.
MAX_STRAY_REPLIES: Final = 16

_SEQID_MASK: Final = 0x7FFFFFFF
_REPLY: Final = MessageType.REPLY
_EXCEPTION: Final = MessageType.EXCEPTION

# Seqids of calls sent as oneway whose stray reply is still recognised. A
# server answers in order, so a reply to any later call ends their chance.
MAX_ONEWAY_SEQIDS: Final = 64
# Bytes kept of what an upstream sent first, to tell an operator what it was.
_FIRST_BYTES: Final = 64


@mypyc_attr(allow_interpreted_subclasses=True)
class ReplyHandler:
    """Where the result of one exchange goes: `Call`, a hedge, a health check's probe.

    A base class, not a protocol, for the reason `ProxiedCall` is one (the
    compiled connection calls ``on_reply`` through the class's table); its
    subclasses may be interpreted.
    """

    __slots__ = ()

    def on_reply(self, reply: Message) -> None:
        """The reply arrived; the connection is back in the pool unless another call waits."""
        raise NotImplementedError

    def on_error(self, error: UpstreamError) -> None:
        """The exchange failed; the connection is closed."""
        raise NotImplementedError

    def on_no_reply(self) -> None:
        """A call sent after this one was answered first: this one was oneway."""
        raise NotImplementedError


class _Nobody(ReplyHandler):
    """The handler of an entry that no call waits in (`_Waiting`): it holds on to no call."""

    __slots__ = ()

    def on_reply(self, reply: Message) -> None:
        """Never called: a spare entry is not waiting."""

    def on_error(self, error: UpstreamError) -> None:
        """Never called: a spare entry is not waiting."""

    def on_no_reply(self) -> None:
        """Never called: a spare entry is not waiting."""


_NOBODY: Final = _Nobody()
# A `_Waiting`'s bucket before it is first filed: empty, and never filed into.
_NO_BUCKET: Final[Bucket] = {}


class _Waiting:
    """One call waiting for its reply on a connection: the key of its timeout too.

    A connection keeps the entry of the call answered last and files its next
    call in it (`UpstreamConnection.send`): a connection carries one call at a
    time as a rule, so most calls make no entry of their own.
    """

    __slots__ = ("bucket", "conn", "handler", "seqid", "timeout")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.seqid = 0
        self.handler: ReplyHandler = _NOBODY
        self.timeout = 0.0
        self.bucket: Bucket = _NO_BUCKET

    def __call__(self) -> None:
        """The per-try timeout fired (`Timeouts` callback)."""
        self.conn._expire(self)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to the upstream."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._decoder: Decoder = decoder_for(
            pool.transport_kind, pool.protocol, pool.max_message_size
        )
        self.transport: asyncio.Transport | None = None
        # Calls sent and not answered, oldest first: a list, read and popped at its head by
        # native code in the compiled build (a deque's are method calls); rarely more than one.
        self._waiting: list[_Waiting] = []
        self._spare: _Waiting | None = None  # the entry of the call answered last
        self._oneways: deque[int] = deque(maxlen=MAX_ONEWAY_SEQIDS)
        self._seqid = 0
        self._answered = False  # a reply came on this connection
        self._first_bytes = bytearray()  # what came first, to describe it if it is not Thrift
        self.closed = False
        self.idle_since = 0.0
        self.strays = 0  # replies to no call of ours (see `_take`)
        self.ending = False  # closed, not pooled, once its calls are answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self.transport = cast(asyncio.Transport, transport)

    @property
    def waiting(self) -> int:
        """Calls waiting for a reply on this connection."""
        return len(self._waiting)

    def sent_last(self, handler: ReplyHandler) -> bool:
        """Is ``handler``'s call waiting here, with nothing sent behind it?"""
        waiting = self._waiting
        return bool(waiting) and waiting[-1].handler is handler

    def send(
        self, message: Message, handler: ReplyHandler | None, expires: float, timeout: float
    ) -> None:
        """Write one call under a fresh seqid; its reply or failure goes to ``handler``.

        Args:
            message: the call; its seqid is overwritten.
            handler: None for a oneway call (nothing is awaited; the caller
                releases the connection; a reply the upstream sends anyway is
                dropped).
            expires: loop time after which the reply is too late.
            timeout: the per-try timeout, for the error message.
        """
        self._seqid = seqid = (self._seqid + 1) & _SEQID_MASK
        # THeader: a plain frame, whatever form the client's came in (an upstream
        # reads plain THeader frames; Apache's reads nothing else).
        wire = message.wire_with_seqid(seqid, self.pool.transport_kind, False)
        if handler is None:
            self._oneways.append(seqid)
        else:
            waiting = self._spare or _Waiting(self)
            self._spare = None
            waiting.seqid = seqid
            waiting.handler = handler
            waiting.timeout = timeout
            waiting.bucket = self.pool.timeouts.add(expires, waiting, waiting)
            self._waiting.append(waiting)
        assert self.transport is not None
        self.transport.write(wire)

    def data_received(self, data: bytes) -> None:
        if not self._answered:
            self._first_bytes += data[: _FIRST_BYTES - len(self._first_bytes)]
        try:
            messages = self._decoder.receive_data(data)
        except RemoteProtocolError as exc:
            exc.with_traceback(None)  # its frames would keep the decoder's buffer alive
            self._fail(self._protocol_error(self._what_was_sent(exc)))
            return
        if messages:
            self._answered = True
        for reply in messages:
            if not self._take(reply):
                return
        if self._decoder.error is not None:  # garbage after the replies: they stand, it goes
            self._broken()

    def _take(self, reply: Message) -> bool:
        """Hand one message to the call it answers; False when the connection failed."""
        header = reply.header
        seqid = header.seqid
        waiting = self._waiting
        if waiting and waiting[0].seqid != seqid:
            for later in range(1, len(waiting)):
                if waiting[later].seqid == seqid:
                    self._not_answered(later)  # the ones before it were oneway
                    break
        if waiting and waiting[0].seqid == seqid:
            if header.type is not _REPLY and header.type is not _EXCEPTION:
                self._fail(self._protocol_error(f"sent a {header.type.name} message as a reply"))
                return False
            first = waiting.pop(0)
            self.pool.timeouts.remove(first.bucket, first)
            if self._oneways:
                self._oneways.clear()  # earlier oneway calls will not be answered now
            if not waiting and not self.closed:
                self.pool.release(self, True)  # closed instead if `ending`
            handler, first.handler = first.handler, _NOBODY
            self._spare = first  # out of the queue and the timeouts: the next call's
            handler.on_reply(reply)
            return True
        if seqid in self._oneways:  # a reply to a call sent as oneway: dropped
            while self._oneways and self._oneways.popleft() != seqid:
                pass
            log.debug("dropped the reply to a call sent as oneway (seqid %d)", seqid)
            return True
        if waiting and self.strays < MAX_STRAY_REPLIES:
            # A reply to no call of ours: most often to a second message a client hid
            # inside one frame (the upstream reads on past the first). It is not the
            # waiting call's answer, nor its fault: dropped, and the connection ends
            # once the calls on it are answered.
            self.strays += 1
            self.ending = True
            self.pool.stray_reply()
            return True
        expected = f"expected {waiting[0].seqid}" if waiting else "none was awaited"
        self._fail(self._protocol_error(f"sent a reply with seqid {seqid}, {expected}"))
        return False

    def _what_was_sent(self, exc: RemoteProtocolError) -> str:
        """Say what came back when it is not Thrift: text (HTTP, HTML) is shown as text."""
        head = bytes(self._first_bytes)
        if not self._answered and head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
            shown = head.decode("ascii").splitlines()[0][:60]
            kind = "HTTP" if head.startswith((b"HTTP/", b"<")) else "text"
            return (
                f"answered in {kind}, not Thrift ({shown!r}): does upstream.addresses name "
                "the Thrift port?"
            )
        return f"sent invalid bytes: {exc}"

    def _not_answered(self, count: int) -> None:
        """The first ``count`` waiting calls were passed over by a later reply: oneway."""
        for _ in range(count):
            skipped = self._waiting.pop(0)
            self.pool.timeouts.remove(skipped.bucket, skipped)
            skipped.handler.on_no_reply()

    def _protocol_error(self, problem: str) -> UpstreamProtocolError:
        address = self.pool.address
        return UpstreamProtocolError(f"upstream {address} {problem}", address=address, sent=True)

    def eof_received(self) -> bool:
        self._fail(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(None)

    def _expire(self, waiting: _Waiting) -> None:
        """A per-try timeout fired: that call fails, the connection goes (and any call behind)."""
        if waiting not in self._waiting:
            return
        self._waiting.remove(waiting)
        address = self.pool.address
        self._fail(None)
        waiting.handler.on_error(
            UpstreamTimeout(
                f"upstream {address} did not reply within {round(waiting.timeout, 3):g}s",
                address=address,
                sent=True,
            )
        )

    def _fail(self, error: UpstreamError | None) -> None:
        """Close; every call waiting fails with ``error`` (or "closed")."""
        failed = list(self._waiting)
        self._waiting.clear()
        for waiting in failed:
            self.pool.timeouts.remove(waiting.bucket, waiting)
        self._broken()
        address = self.pool.address
        for waiting in failed:
            waiting.handler.on_error(
                error
                or UpstreamClosed(
                    f"upstream {address} closed the connection before replying"
                    + (
                        ""
                        if self._answered
                        else f" to the first call on it: does it speak "
                        f"{self.pool.transport_kind.value} {self.pool.protocol.value}? "
                        "(upstream.transport, upstream.protocol)"
                    ),
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
            self.pool._connection_closed(self)

    def abandon(self, handler: ReplyHandler | None = None) -> None:
        """Forget ``handler``'s call (cancelled) and close: a late reply dies here.

        Any other call waiting on the connection fails as closed.
        """
        for waiting in list(self._waiting):
            if waiting.handler is handler:
                self._waiting.remove(waiting)
                self.pool.timeouts.remove(waiting.bucket, waiting)
        self._fail(None)

    def hand_over(self, handler: object, to: ReplyHandler) -> None:
        """Give ``handler``'s waiting call to ``to``, keeping the connection.

        For an attempt that lost to a hedge: its reply, when it comes, goes to
        ``to`` (which drops it), and only then is the connection back in the
        pool; the per-try timeout still closes it if no reply comes.
        """
        for waiting in self._waiting:
            if waiting.handler is handler:
                waiting.handler = to
                return

    def close(self) -> None:
        """Close now (idle connections); a late reply is dropped with the connection."""
        self.abandon()


class UpstreamPool:
    """Connections to one ``host:port``.

    Args:
        address: ``host:port``.
        transport_kind: framed, buffered or THeader, as the upstream speaks.
        size: most connections open at once.
        connect_timeout: seconds to wait for a TCP connection.
        max_message_size: largest reply accepted.
        timeouts: the loop's per-try timeouts.
        loop: the event loop the pool runs on.
        protocol: the protocol the upstream speaks (binary or compact).
        on_stray: called with the address for each reply to no call (counted).
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
        protocol: WireProtocol = WireProtocol.BINARY,
        tls: UpstreamTls | None = None,
        on_stray: Callable[[str], None] | None = None,
    ) -> None:
        self.address = address
        self.tls = tls
        self._on_stray = on_stray
        self.protocol = protocol
        self.timeouts = timeouts
        # Kept, not looked up: asyncio.get_running_loop() costs a getpid() system call.
        self.loop = loop
        self._clock = loop.time  # bound once (`CallContext.clock`)
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
                if self.tls is None:
                    await loop.create_connection(protocol, self.host, self.port)
                else:
                    await loop.create_connection(
                        protocol,
                        self.host,
                        self.port,
                        ssl=self.tls.context,
                        server_hostname=self.tls.server_hostname(self.host),
                    )
        except TimeoutError:
            give_back()
            raise UpstreamUnavailable(
                f"cannot connect to upstream {self.address}: no answer within {limit:g}s",
                address=self.address,
            ) from None
        except OSError as exc:  # ssl.SSLError included: a failed TLS handshake
            give_back()
            if self.tls is not None and self.tls.handshake_failed(exc, self.address):
                reason = f"TLS handshake failed: {exc}"
            else:
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
        """Return a connection after a call; close it unless ``reusable``.

        A connection with a call still waiting on it (one sent behind another)
        comes back when that call's reply does.
        """
        if not reusable or conn.closed or self._closed or conn.ending:
            conn.close()
            return
        if conn._waiting:  # `waiting`, without the property call
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self._clock()
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

    def stray_reply(self) -> None:
        """A connection of this pool got a reply to no call of ours: count and log it."""
        if self._on_stray is not None:
            self._on_stray(self.address)
        stray_log.warning(
            "upstream %s sent a reply to no call the sidecar sent (a client may have put two "
            "messages in one frame); dropped, and the connection is closed once its calls "
            "are answered",
            self.address,
            extra={"upstream": self.address},
        )

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
