"""One client connection: bytes in, calls run one at a time, replies out in order.

`ClientConnection` is an `asyncio.Protocol`. Its decoder turns bytes into
messages (the transport detected from the first bytes, or forced by config);
messages wait in a per-connection queue and run one at a time, in arrival
order, exactly as a Thrift server executes the calls of one connection: the
next starts when the previous one's reply is written (`_pump`, no task per
connection or per call). A client that pipelines requests gets its replies
in request order, and the next request is read while the current one is in
flight.

Flow control: reading pauses while more than `MAX_QUEUED_MESSAGES` messages
or `MAX_QUEUED_BYTES` bytes wait, and resumes below half of that; no next
call starts while the client's socket buffer is full (``pause_writing``
until ``resume_writing``), and the replies it has not taken meanwhile count
against the server's memory budget. A connection starts at most
`CALLS_PER_TURN` calls in a turn of the loop, then yields to the others.

A client that breaks the protocol gets the replies to the calls it sent
before, then a ``TApplicationException(PROTOCOL_ERROR)`` where a seqid is
known, and its connection is closed; it is logged (rate-limited) and counted.
A client that closes its side still has every call it sent executed (oneway
calls included), unless a drain timeout cuts them off; the server keeps such
a connection in its books until its calls are done.

Every way in, the asyncio callbacks and the callbacks a call or the loop
runs later (`ENTRY_POINTS`), runs its body inside ``try: ... except
Exception: self._crashed()``: a bug closes this connection only, counted as
a protocol error of kind ``internal`` (docs/architecture.md, "Guards").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, cast

from sidecar.errors import ProtocolError, RemoteProtocolError
from sidecar.logs import RateLimitedLog
from sidecar.metrics import SidecarMetrics
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.auto import EVERYTHING, AutoDecoder, Decoder, make_decoder
from sidecar.protocol.decoders import DecoderBase
from sidecar.protocol.envelope import Protocol as WireProtocol
from sidecar.protocol.envelope import identify
from sidecar.protocol.framing import Message, Transport, frame
from sidecar.protocol.tjson import UnsupportedProtocolError
from sidecar.proxy.call import Call, Done, ProxiedCall, Wire
from sidecar.proxy.context import CallContext

log: Final = logging.getLogger("sidecar.server")

MAX_QUEUED_MESSAGES: Final = 64
# Calls a connection starts in one turn of the loop. Most wait for the upstream
# and the next starts when the reply comes; but a call answered at once (a oneway
# call, a fallback, an error) lets the next one start, and a read can hold
# thousands: after this many the connection yields until the next turn, and every
# other connection (the admin port's too) gets its turn first (`_take_turn`).
CALLS_PER_TURN: Final = 64
MAX_QUEUED_BYTES = 8 << 20  # read by each connection as it opens (tests lower it)
# Steps of a buffered message's walk per turn of the loop (`BufferedDecoder`).
# A step is about 0.1 µs, and a message can cost one per byte (a list of
# empty structs): a connection holds the loop about half a millisecond at a
# time, and every other connection runs in between.
WALK_STEPS: Final = 4096
# An unfinished message makes progress when this many more of its bytes arrive (or
# a new message begins): the memory budget closes the connections that made none
# for the longest first (`ClientConnection.stalled_since`), and a client that
# trickles a byte at a time does not look busy.
PROGRESS_BYTES: Final = 4096
# Malformed calls (found so after they failed upstream) a connection may send
# before it is closed: one is a bug, three in a row are a client to stop.
MAX_MALFORMED_CALLS: Final = 3

# What a client of a protocol the sidecar does not proxy (JSON) is told.
_UNSUPPORTED: Final = (
    "sidecar: this Thrift port takes the binary and compact protocols (framed, buffered or "
    "THeader), not this one; the sidecar's HTTP endpoints are on its admin port"
)

# The answer to an HTTP request that arrived on the Thrift port.
_HTTP_BODY: Final = (
    b"This is the Thrift port of thrift-sidecar (binary or compact protocol; framed, buffered\n"
    b"or THeader transport).\n"
    b"HTTP endpoints (/metrics, /healthz, /readyz, /state) are on the admin port.\n"
)
_HTTP_MISDIRECTED: Final = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + b"Content-Length: "
    + str(len(_HTTP_BODY)).encode()
    + b"\r\n\r\n"
    + _HTTP_BODY
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the listener and its connections need from the config."""

    transport: str  # auto | framed | buffered
    max_frame_size: int
    max_depth: int
    max_connections: int
    idle_timeout: float
    max_buffered_bytes: int = 48 << 20


CallFactory = Callable[[CallContext, Message, Transport, Done], ProxiedCall]


class ServerState:
    """What a connection reads of its server for each call: one object all share.

    The server stays interpreted (server.py), so each read of one of its
    attributes is a lookup by name in the compiled build; it keeps these here
    (`Server.state`), and a connection reads each directly.

    Attributes:
        context: what new calls start with (`Server.use_context` replaces it).
        call_factory: makes a call for a message; None: the sidecar's `Call`,
            made directly (a factory is a call through Python's calling
            convention: argument parsing and a generic call of the class).
        draining: the server is draining: a connection closes once it is idle.
    """

    def __init__(self, context: CallContext, call_factory: CallFactory | None = None) -> None:
        self.context = context
        self.call_factory = call_factory
        self.draining = False


class Host(Protocol):
    """What a connection needs of the server that accepted it (`sidecar.proxy.server.Server`)."""

    loop: asyncio.AbstractEventLoop
    settings: ServerSettings
    state: ServerState
    metrics: SidecarMetrics
    protocol_log: RateLimitedLog

    def admit(self, conn: ClientConnection) -> bool: ...

    def forget(self, conn: ClientConnection) -> None: ...

    def finished(self, conn: ClientConnection) -> None: ...

    def hold(self, conn: ClientConnection, delta: int) -> None: ...


class _Behind:
    """A call sent behind the one in flight; its answer waits until the first one's is out."""

    __slots__ = ("_conn", "call", "finished", "first", "wire")

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self.call: ProxiedCall | None = None
        self.finished = False
        self.first = False  # the call in front has finished: this one is first now
        self.wire: Wire | None = None

    def done(self, wire: Wire | None) -> None:
        """`Call` done callback."""
        if self.first:
            self._conn._answer(wire)
        else:
            self.finished = True
            self.wire = wire


# The methods by which the loop and a call enter a `ClientConnection`: asyncio's
# callbacks and the ones it registers itself. Each one's body runs inside
# ``try: ... except Exception: self._crashed()`` (tests/proxy/test_guards.py).
ENTRY_POINTS: Final = (
    "connection_made",
    "data_received",
    "eof_received",
    "connection_lost",
    "pause_writing",
    "resume_writing",
    "_walk_on",
    "_turn_on",
    "_sent",
    "_answer",
)


class ClientConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Host) -> None:
        self._server = server
        self._state = server.state
        self._loop = server.loop
        self._clock = server.loop.time  # bound once (`CallContext.clock`)
        settings = server.settings
        self._decoder: AutoDecoder | Decoder
        if settings.transport == "auto":
            self._decoder = AutoDecoder(
                max_size=settings.max_frame_size,
                max_depth=settings.max_depth,
                accept=EVERYTHING,
                walk_steps=WALK_STEPS,
            )
            self._kind: Transport | None = None
            # The decoder detection built, read directly once there (`_detected`).
            self._direct: DecoderBase | None = None
        else:
            self._kind = Transport(settings.transport)
            self._decoder = make_decoder(
                self._kind,
                settings.max_frame_size,
                settings.max_depth,
                walk_steps=WALK_STEPS,
            )
            self._direct = self._decoder
        self._walk_due = False  # `_walk_on` is scheduled
        self._turn_due = False  # `_turn_on` is scheduled
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Message | ProtocolError] = deque()
        self._queued_bytes = 0
        # The module's limit, read once: a module name that is not Final is looked up
        # by name on every use in the compiled build.
        self._max_queued_bytes = MAX_QUEUED_BYTES
        self._call: ProxiedCall | None = None  # the call in flight
        # `_answer`, bound once while the connection is up (binding it makes an object).
        # The connection then holds a cycle through its own bound method: it is let go
        # when the connection is lost, and calls made after that bind their own.
        self._answer_bound: Done | None = None
        self._behind: _Behind | None = None  # a call sent right behind it (see `_pump`)
        self._pumping = False
        self._reading_paused = False
        self._writable = True
        self._eof = False
        self.lost = False
        self._aborted = False
        self._malformed = 0
        self._held = 0  # bytes reported to the server's memory budget
        # When the unfinished message last made progress (`PROGRESS_BYTES`), and its
        # size then; time.monotonic(), finer than the loop's clock.
        self.partial_since: float | None = None
        self._progress_mark = 0
        # Replies written but not taken by the client, past the transport's high-water
        # mark (`pause_writing`), and since when.
        self._unsent = 0
        self.unsent_since: float | None = None
        self.peer = "?"
        self.last_active = self._clock()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            # uvloop's transports do not subclass asyncio.Transport, hence the cast.
            self._transport = cast(asyncio.Transport, transport)
            self._answer_bound = self._answer
            peer = transport.get_extra_info("peername")
            if isinstance(peer, tuple) and len(peer) >= 2:
                self.peer = f"{peer[0]}:{peer[1]}"
            if not self._server.admit(self):
                self._transport.abort()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def data_received(self, data: bytes) -> None:
        try:
            self._decode(data)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _walk_on(self) -> None:
        """The next turn of a buffered walk stopped for its step budget."""
        try:
            self._walk_due = False
            decoder = self._decoder
            if self._aborted or decoder.error is not None:
                return
            self._decode(None)
            if decoder.walk_pending or decoder.error is not None:
                return
            if self._eof:  # the end came while the walk was behind
                self._end_of_input()
                return
            self._read_on_if_short()
            self._pump()  # a connection lost meanwhile may be through now
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _decode(self, data: bytes | None) -> None:
        """Queue the messages ``data`` completes (None: the walk's next turn), and any
        error, and run them."""
        error: ProtocolError | None
        try:
            direct = self._direct
            if direct is None:  # not detected yet
                auto = self._decoder
                messages = auto.resume() if data is None else auto.receive_data(data)
            else:
                messages = direct.resume() if data is None else direct.receive_data(data)
        except ProtocolError as exc:
            # Without its traceback: its frames hold the decoder's buffer (megabytes of
            # an unfinished message) for as long as the error is kept.
            messages, error = [], exc.with_traceback(None)
            decoder = self._detected()
        else:
            # An error after whole messages in this read: those are answered first.
            decoder = self._direct or self._detected()
            error = decoder.error
        if error is None and decoder.walk_pending and not self._walk_due:
            # Its step budget ran out with bytes to walk: the next turn comes after
            # every other connection's, and this one's bytes wait meanwhile.
            self._walk_due = True
            self._pause_reading()
            self._loop.call_soon(self._walk_on)
        if not messages and error is None:
            self._account()  # bytes that complete no message are not activity (slowloris)
            return
        self.last_active = self._clock()
        self._queue.extend(messages)
        for message in messages:
            self._queued_bytes += len(message.buf)
        if error is not None:
            self._queue.append(error)
            self._pause_reading()
        elif (
            len(self._queue) > MAX_QUEUED_MESSAGES or self._queued_bytes > self._max_queued_bytes
        ) and not self._reading_paused:
            self._pause_reading()
        self._pump()
        self._account()

    def _detected(self) -> AutoDecoder | DecoderBase:
        """The decoder to read (the one detection built, once it has), after a decode."""
        direct = self._direct
        if direct is not None:
            return direct
        decoder = self._decoder
        if self._kind is None:
            # Known once detected, even when the first message then breaks the protocol:
            # the PROTOCOL_ERROR answer is written in it.
            self._kind = decoder.transport  # type: ignore[union-attr]
        if isinstance(decoder, AutoDecoder) and decoder.inner is not None:
            self._direct = decoder.inner
            return decoder.inner
        return decoder

    def eof_received(self) -> bool | None:
        try:
            self._eof = True
            if not self._decoder.walk_pending:  # else once the walk is through (`_walk_on`)
                self._end_of_input()
            return True  # keep our side open to write the pending replies
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()
            return None

    def _end_of_input(self) -> None:
        """The client sent its last byte: an unfinished message is an error."""
        if self._decoder.error is None:  # else it is queued already
            try:
                self._decoder.receive_data(b"")
            except ProtocolError as exc:
                self._queue.append(exc.with_traceback(None))  # frees the buffer (above)
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.lost = True
            self._answer_bound = None  # the cycle it makes ends here (`__init__`)
            self._account(gone=True)
            self._writable = True
            self._unsent = 0
            self.unsent_since = None
            self._server.forget(self)
            self._pump()  # what was accepted still runs (oneway calls included)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def pause_writing(self) -> None:
        try:
            self._writable = False
            self.unsent_since = time.monotonic()
            self._count_unsent()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def resume_writing(self) -> None:
        try:
            self._writable = True
            self.unsent_since = None
            self._unsent = 0
            self._account()
            self._pump()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _count_unsent(self) -> None:
        """While the client does not take its replies, they count against the memory
        budget: the transport's buffer, refreshed as more replies go in."""
        transport = self._transport
        self._unsent = 0 if transport is None else transport.get_write_buffer_size()
        self._account()

    # running the queue

    def _pump(self) -> None:
        """Start queued calls in order, while the client can take replies.

        One call at a time, as a server executes one connection's calls; the
        exception is a CALL whose method has never been answered: the next
        call may go right behind it on the same upstream connection (it may
        be a oneway sent as CALL; `Call.chain_target`). Replies are written in
        request order whatever finishes first. A call that finishes at once (a
        fallback, an error) lets the loop go on to the next; one that waits
        for the upstream calls back later, which pumps again. Re-entry is
        harmless: only the outermost pump runs.
        """
        if self._pumping:
            return
        self._pumping = True
        queue = self._queue
        server = self._server
        started = 0
        try:
            while queue and self._writable and not self._aborted:
                if started == CALLS_PER_TURN:
                    self._take_turn()
                    break
                chain = None
                if self._call is not None:
                    if self._behind is not None:
                        break
                    chain = self._call.chain_target()
                    if chain is None or not isinstance(queue[0], Message):  # an error
                        if chain is None and self._call.waits_to_send():
                            self._call.when_sent(self._sent)  # look again once it is sent
                        break
                item = queue.popleft()
                # A message, or the protocol error that ended the input (a class of the
                # compiled build: a native type check, where ProtocolError is a lookup).
                if not isinstance(item, Message):
                    self._protocol_error(item)
                    return
                self._queued_bytes -= len(item.buf)
                if self._reading_paused:
                    self._read_on_if_short()
                if chain is None:
                    answer = self._answer_bound
                    call = self._make_call(item, self._answer if answer is None else answer)
                    self._call = call
                else:
                    behind = self._behind = _Behind(self)
                    call = self._make_call(item, behind.done)
                    behind.call = call
                    call.chain_after(chain)
                call.start()
                started += 1
        finally:
            self._pumping = False
        if self._call is None and not queue and not self._walk_due and not self._turn_due:
            if self._eof or self.lost or self._state.draining:
                self.close()
            if self.lost:
                server.finished(self)

    def _read_on_if_short(self) -> None:
        """Read again, when reading is paused for the queue's length and it is down to
        half the limits, and nothing else holds it paused."""
        if (
            self._reading_paused
            and self._decoder.error is None  # after a protocol error: never again
            and not self._decoder.walk_pending  # `_walk_on` resumes then
            and not self._turn_due  # `_turn_on` resumes then
            and len(self._queue) <= MAX_QUEUED_MESSAGES // 2
            and self._queued_bytes <= self._max_queued_bytes // 2
        ):
            self._resume_reading()

    def _take_turn(self) -> None:
        """`CALLS_PER_TURN` calls started: read no more, and go on after the other
        connections' turn (the loop's next round; `_turn_on`)."""
        if not self._turn_due:
            self._turn_due = True
            self._pause_reading()
            self._loop.call_soon(self._turn_on)

    def _turn_on(self) -> None:
        """This connection's next turn: more of its queue, and reading again once it
        is short (`_pump`)."""
        try:
            self._turn_due = False
            if self._aborted:
                return
            self._pump()
            self._read_on_if_short()
            self._account()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _make_call(self, message: Message, done: Done) -> ProxiedCall:
        state = self._state
        factory = state.call_factory
        assert self._kind is not None
        if factory is None:
            return Call(state.context, message, self._kind, done)
        return factory(state.context, message, self._kind, done)

    def _sent(self) -> None:
        """The call in flight went upstream: the next one may go behind it now."""
        try:
            self._pump()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _answer(self, reply: Wire | None) -> None:
        """The first call in flight finished (`Call` done callback)."""
        try:
            call, self._call = self._call, None
            self.last_active = self._clock()
            if reply is not None and not self.lost and self._transport is not None:  # `_write`
                self._transport.write(reply)
            if not self._writable:  # the reply waits with those the client has not taken
                self._count_unsent()
            elif self._held:  # queued messages may have gone to calls since it was counted
                self._account()
            if call is not None and call.malformed and self._too_many_malformed():
                return
            behind, self._behind = self._behind, None
            if behind is not None:  # the call sent behind it is first now
                if behind.finished:
                    self._write(behind.wire)
                else:
                    self._call = behind.call
                    behind.first = True
            if self._queue or self._eof or self.lost or self._state.draining:
                self._pump()  # else it would find nothing to start and no reason to close
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _write(self, reply: Wire | None) -> None:
        if reply is not None and not self.lost and self._transport is not None:
            self._transport.write(reply)

    def _account(self, gone: bool = False) -> None:
        """Tell the server how many bytes this connection holds now (0 once it is gone)."""
        direct = self._direct
        buffered = (self._decoder if direct is None else direct).buffered_bytes
        held = 0 if gone else buffered + self._queued_bytes + self._unsent
        if held != self._held:
            if not buffered or gone:
                self.partial_since = None
            elif (
                self.partial_since is None
                or buffered < self._progress_mark
                or buffered >= self._progress_mark + PROGRESS_BYTES
            ):
                self.partial_since = time.monotonic()
                self._progress_mark = buffered
            delta, self._held = held - self._held, held
            self._server.hold(self, delta)

    @property
    def held(self) -> int:
        """Bytes this connection holds: unfinished and queued messages, and replies past
        the transport's high-water mark that the client has not taken."""
        return self._held

    @property
    def stalled_since(self) -> float | None:
        """Since when it holds bytes without progress (time.monotonic()): the
        unfinished message's last progress or the first reply it did not take, the
        earlier; None when it holds neither."""
        partial, unsent = self.partial_since, self.unsent_since
        if partial is None:
            return unsent
        if unsent is None:
            return partial
        return min(partial, unsent)

    @property
    def waiting_bytes(self) -> int:
        """Bytes of whole messages queued behind the call in flight."""
        return self._queued_bytes

    def shed(self) -> None:
        """Over the memory budget: count and close; an unfinished message is answered
        first, but a client that does not take its replies gets none: it is cut off."""
        if self.unsent_since is not None:
            self._cut_off_unread()
            return
        decoder = self._decoder
        error = RemoteProtocolError(
            f"the sidecar's memory budget for client messages (limits.max_buffered_bytes) is "
            f"used up; this connection held {self._held} bytes of an unfinished message",
            kind="memory",
        )
        header = decoder.partial_header() if isinstance(decoder, AutoDecoder) else None
        if header is not None:
            identify(error, header)
        self._queue.clear()
        self._queued_bytes = 0
        self._protocol_error(error)
        # The unfinished message goes now.
        self._decoder = self._direct = make_decoder(Transport.FRAMED, 4)
        self._account(gone=True)

    def _cut_off_unread(self) -> None:
        self._server.metrics.protocol_errors.labels("memory").inc()
        self._server.protocol_log.warning(
            "closing client %s: it has not taken %d bytes of replies for %.1fs and the "
            "sidecar's memory budget for clients (limits.max_buffered_bytes) is used up",
            self.peer,
            self._unsent,
            time.monotonic() - (self.unsent_since or 0.0),
            extra={"peer": self.peer, "kind": "memory"},
        )
        self.abort()
        self._account(gone=True)

    def expire(self) -> None:
        """Idle for ``idle_timeout``: closed; cut off if replies it has not taken would
        hold the connection open (a close waits for them to be written)."""
        if self._transport is not None and self._transport.get_write_buffer_size():
            self.abort()
        else:
            self.close()

    def hold_back(self) -> None:
        """Over the memory budget with whole messages waiting: read no more for now."""
        self._pause_reading()

    def _too_many_malformed(self) -> bool:
        """Count a malformed call; at `MAX_MALFORMED_CALLS` the connection is closed."""
        self._malformed += 1
        if self._malformed < MAX_MALFORMED_CALLS:
            return False
        self._server.metrics.protocol_errors.labels("malformed").inc()
        self._server.protocol_log.warning(
            "closing client %s: %d malformed calls (cut short or with bytes after their "
            "arguments inside a correct frame)",
            self.peer,
            self._malformed,
            extra={"peer": self.peer, "kind": "malformed"},
        )
        self._queue.clear()
        behind, self._behind = self._behind, None
        if behind is not None and behind.call is not None:
            behind.call.cancel()
        self.close()
        if self.lost:
            self._server.finished(self)
        return True

    def _protocol_error(self, exc: ProtocolError) -> None:
        """Answer what can be answered, count, log, close this connection only."""
        self._server.metrics.protocol_errors.labels(exc.kind).inc()
        self._server.protocol_log.warning(
            "closing client %s: %s (%s)",
            self.peer,
            exc,
            exc.kind,
            extra={"peer": self.peer, "kind": exc.kind},
        )
        writable = self._transport is not None and not self.lost
        if isinstance(exc, UnsupportedProtocolError):  # a JSON client: answered in JSON
            answer = exc.answer(ApplicationExceptionType.INVALID_PROTOCOL, _UNSUPPORTED)
            if answer is not None and writable:
                assert self._transport is not None
                self._transport.write(answer)
        elif exc.seqid is not None and self._kind is not None and writable:
            name = (exc.name or "").rpartition(":")[2]
            decoder = self._decoder
            protocol = (decoder.protocol if isinstance(decoder, AutoDecoder) else None) or (
                WireProtocol.BINARY
            )
            message = encode_application_exception(
                name,
                exc.seqid,
                ApplicationExceptionType.PROTOCOL_ERROR,
                f"sidecar: {exc}",
                exc.strict,
                protocol,
            )
            # A THeader client's frames may come inside a frame length: the
            # detected decoder (not the detecting one) knows, and the answer goes back alike.
            detected = decoder.inner if isinstance(decoder, AutoDecoder) else decoder
            outer = bool(getattr(detected, "outer_framed", False))
            assert self._transport is not None
            self._transport.write(frame(message, self._kind, outer_framed=outer))
        elif exc.kind == "http" and writable:
            assert self._transport is not None
            self._transport.write(_HTTP_MISDIRECTED)
        self._queue.clear()
        self.close()
        if self.lost:
            self._server.finished(self)

    def _crashed(self) -> None:
        """A bug in the sidecar while serving this connection: close it, count, log."""
        log.exception("unexpected error serving client %s; closing its connection", self.peer)
        self._server.metrics.protocol_errors.labels("internal").inc()
        self.abort()

    # helpers

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError):
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and self._reading_paused and not self.lost:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()

    @property
    def busy(self) -> bool:
        """A call is in flight."""
        return self._call is not None or self._behind is not None

    @property
    def idle(self) -> bool:
        """Nothing in flight, queued or being walked (a partly received message is not work)."""
        return (
            self._call is None
            and self._behind is None
            and not self._queue
            and not self._walk_due
            and not self._turn_due
        )

    def close(self) -> None:
        """Close after the pending writes are flushed."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def cut(self, reason: str) -> None:
        """Shut down now (the drain timeout passed): calls in flight are answered with an
        INTERNAL_ERROR saying ``reason``, queued ones dropped, the connection closed."""
        self._aborted = True
        self._queue.clear()
        calls = (self._call, self._behind.call if self._behind is not None else None)
        self._call = self._behind = None
        for call in calls:
            if call is not None:
                self._write(call.cut(reason))
        self.close()
        if self.lost:
            self._server.finished(self)

    def abort(self) -> None:
        """Close now, dropping what is queued (a bug, or shutdown after the drain timeout)."""
        self._aborted = True
        self._queue.clear()
        calls = (self._call, self._behind.call if self._behind is not None else None)
        self._call = self._behind = None
        for call in calls:
            if call is not None:
                call.cancel()
        if self._transport is not None:
            self._transport.abort()
        if self.lost:
            self._server.finished(self)
