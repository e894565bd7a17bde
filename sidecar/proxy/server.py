"""Client connections: bytes in, messages to the pipeline, replies out in order.

Each client connection is an `asyncio.Protocol`. Its decoder turns bytes into
messages (the transport detected from the first bytes, or forced by config);
messages wait in a per-connection queue and run through the pipeline one at
a time, in arrival order, exactly as a Thrift server executes the calls of
one connection: the next starts when the previous one's reply is written
(`ClientConnection._pump`, no task per connection or per call). A client that
pipelines requests gets its replies in request order, and the next request
is read while the current one is in flight.

Limits and failures:
- ``max_connections``: connections beyond it are closed at once (counted).
- Reading pauses while more than `MAX_QUEUED_MESSAGES` messages or
  `MAX_QUEUED_BYTES` bytes wait, and resumes below half of that; writing waits
  while the client's socket buffer is full (no next call starts until
  ``resume_writing``).
- A client that breaks the protocol gets the replies to the calls it sent
  before, then a ``TApplicationException(PROTOCOL_ERROR)`` where a seqid is
  known, and its connection is closed; it is logged (rate-limited) and
  counted. Nobody else notices.
- A client that closes its side still has every accepted call executed
  (oneway calls included): nothing accepted is lost.
- Idle connections are closed after ``idle_timeout`` by `Server.sweep`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import cast

from sidecar.errors import ProtocolError
from sidecar.logs import RateLimitedLog
from sidecar.metrics import SidecarMetrics
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.framing import (
    AutoDecoder,
    BufferedDecoder,
    FramedDecoder,
    Message,
    Transport,
    frame,
    make_decoder,
)
from sidecar.proxy.call import Call, Wire
from sidecar.proxy.pipeline import Pipeline

log = logging.getLogger("sidecar.server")

MAX_QUEUED_MESSAGES = 64
MAX_QUEUED_BYTES = 8 << 20

# The answer to an HTTP request that arrived on the Thrift port.
_HTTP_BODY = (
    b"This is the Thrift port of thrift-sidecar (binary protocol, framed or buffered).\n"
    b"HTTP endpoints (/metrics, /healthz, /readyz, /state) are on the admin port.\n"
)
_HTTP_MISDIRECTED = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
    + b"Content-Length: "
    + str(len(_HTTP_BODY)).encode()
    + b"\r\n\r\n"
    + _HTTP_BODY
)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the server needs from the config."""

    transport: str  # auto | framed | buffered
    max_frame_size: int
    max_depth: int
    max_connections: int
    idle_timeout: float


class ClientConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        settings = server.settings
        self._decoder: AutoDecoder | FramedDecoder | BufferedDecoder
        if settings.transport == "auto":
            self._decoder = AutoDecoder(
                lambda t: make_decoder(t, settings.max_frame_size, settings.max_depth)
            )
            self._kind: Transport | None = None
        else:
            self._kind = Transport(settings.transport)
            self._decoder = make_decoder(self._kind, settings.max_frame_size, settings.max_depth)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Message | ProtocolError] = deque()
        self._queued_bytes = 0
        self._call: Call | None = None  # the call in flight
        self._pumping = False
        self._reading_paused = False
        self._writable = True
        self._eof = False
        self._lost = False
        self._aborted = False
        self.peer = "?"
        self.last_active = self._loop.time()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        if not self._server.admit(self):
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        self.last_active = self._loop.time()
        error: ProtocolError | None
        try:
            messages = self._decoder.receive_data(data)
        except ProtocolError as exc:
            messages, error = [], exc
        else:
            # An error after whole messages in this read: those are answered first.
            error = self._decoder.error
        if self._kind is None:
            # Known once detected, even when the first message then breaks the protocol:
            # the PROTOCOL_ERROR answer is written in it.
            self._kind = self._decoder.transport  # type: ignore[union-attr]
        if not messages and error is None:
            return
        self._queue.extend(messages)
        for message in messages:
            self._queued_bytes += len(message.buf)
        if error is not None:
            self._queue.append(error)
            self._pause_reading()
        elif (
            len(self._queue) > MAX_QUEUED_MESSAGES or self._queued_bytes > MAX_QUEUED_BYTES
        ) and not self._reading_paused:
            self._pause_reading()
        self._pump()

    def eof_received(self) -> bool:
        self._eof = True
        if self._decoder.error is None:  # else it is queued already
            try:
                self._decoder.receive_data(b"")
            except ProtocolError as exc:
                self._queue.append(exc)
        self._pump()
        return True  # keep our side open to write the pending replies

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._writable = True
        self._server.forget(self)
        self._pump()  # what was accepted still runs (oneway calls included)

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        self._pump()

    # running the queue

    def _pump(self) -> None:
        """Start queued calls one at a time, in order, while the client can take replies.

        A call that finishes at once (a fallback, an error) lets the loop go
        on to the next; one that waits for the upstream calls `_answer` later,
        which pumps again. Re-entry is harmless: only the outermost pump runs.
        """
        if self._pumping:
            return
        self._pumping = True
        queue = self._queue
        pipeline = self._server.pipeline
        try:
            while self._call is None and queue and self._writable and not self._aborted:
                item = queue.popleft()
                if isinstance(item, ProtocolError):
                    self._protocol_error(item)
                    return
                self._queued_bytes -= len(item.buf)
                if self._reading_paused and (
                    len(queue) <= MAX_QUEUED_MESSAGES // 2
                    and self._queued_bytes <= MAX_QUEUED_BYTES // 2
                ):
                    self._resume_reading()
                assert self._kind is not None
                call = pipeline.call(item, self._kind, self._answer)
                self._call = call
                call.start()
        except Exception:
            log.exception("unexpected error serving client %s; closing its connection", self.peer)
            self._server.metrics.protocol_errors.labels("internal").inc()
            self._queue.clear()
            self._call = None
            self.close()
            return
        finally:
            self._pumping = False
        if self._call is None and not queue and (self._eof or self._lost or self._server.draining):
            self.close()

    def _answer(self, reply: Wire | None) -> None:
        """The call in flight finished (`Call` done callback)."""
        self._call = None
        self.last_active = self._loop.time()
        if reply is not None and not self._lost and self._transport is not None:
            self._transport.write(reply)
        self._pump()

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
        if exc.seqid is not None and self._kind is not None and not self._lost:
            name = (exc.name or "").rpartition(":")[2]
            message = encode_application_exception(
                name,
                exc.seqid,
                ApplicationExceptionType.PROTOCOL_ERROR,
                f"sidecar: {exc}",
                exc.strict,
            )
            assert self._transport is not None
            self._transport.write(frame(message, self._kind))
        elif exc.kind == "http" and self._transport is not None and not self._lost:
            self._transport.write(_HTTP_MISDIRECTED)
        self._queue.clear()
        self.close()

    # helpers

    def _pause_reading(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            with contextlib.suppress(RuntimeError):
                self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._transport is not None and self._reading_paused and not self._lost:
            self._reading_paused = False
            with contextlib.suppress(RuntimeError):
                self._transport.resume_reading()

    @property
    def busy(self) -> bool:
        """A call is in flight."""
        return self._call is not None

    @property
    def idle(self) -> bool:
        """Nothing in flight and nothing queued."""
        return self._call is None and not self._queue

    def close(self) -> None:
        """Close after the pending writes are flushed."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Close now, dropping what is queued (shutdown after the drain timeout)."""
        self._aborted = True
        self._queue.clear()
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._transport is not None:
            self._transport.abort()


class Server:
    """Accepts client connections and keeps track of them."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: ServerSettings,
        metrics: SidecarMetrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.metrics = metrics
        self.loop = loop
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # Lines a peer can cause at will are rate-limited (counters stay exact).
        self.protocol_log = RateLimitedLog(log, what="protocol error lines")
        self.refusal_log = RateLimitedLog(log, what="refused-connection lines")
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start accepting; returns the bound address (port 0 picks a free one)."""
        self._server = await self.loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=1024
        )
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def admit(self, conn: ClientConnection) -> bool:
        if self.draining or len(self.connections) >= self.settings.max_connections:
            self.metrics.client_connections_rejected.inc()
            self.refusal_log.warning(
                "refusing client %s: %s",
                conn.peer,
                "draining"
                if self.draining
                else f"{len(self.connections)} connections open (max_connections)",
                extra={"peer": conn.peer},
            )
            return False
        self.connections.add(conn)
        self.metrics.client_connections.set(len(self.connections))
        return True

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.metrics.client_connections.set(len(self.connections))

    def sweep(self) -> int:
        """Close connections idle longer than ``idle_timeout``; returns how many."""
        limit = self.loop.time() - self.settings.idle_timeout
        stale = [c for c in self.connections if c.idle and c.last_active < limit]
        for conn in stale:
            log.info(
                "closing client %s: idle for more than %gs", conn.peer, self.settings.idle_timeout
            )
            self.metrics.client_idle_closes.inc()
            conn.close()
        return len(stale)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight calls finish, close everything.

        Returns:
            True when every call finished within ``timeout``.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.idle:
                conn.close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            await asyncio.sleep(0.01)
        finished = not self.connections
        for conn in list(self.connections):
            conn.abort()
        self.protocol_log.flush()
        self.refusal_log.flush()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        return finished
