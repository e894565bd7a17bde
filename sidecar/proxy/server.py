"""Client connections: bytes in, messages to the pipeline, replies out in order.

Each client connection is an `asyncio.Protocol`. Its decoder turns bytes into
messages (the transport detected from the first bytes, or forced by config);
messages wait in a per-connection queue and one worker task runs them through
the pipeline one at a time, in arrival order, exactly as a Thrift server
executes the calls of one connection. A client that pipelines requests gets
its replies in request order, and the next request is read while the current
one is in flight.

Limits and failures:
- ``max_connections``: connections beyond it are closed at once (counted).
- Reading pauses while more than `MAX_QUEUED_MESSAGES` messages or
  `MAX_QUEUED_BYTES` bytes wait, and resumes below half of that; writing waits
  while the client's socket buffer is full (``pause_writing``).
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
        self._worker: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._eof = False
        self._lost = False
        self.peer = "?"
        self.busy = False
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
        self._wake_worker()

    def _wake_worker(self) -> None:
        """Start the worker, or wake it if it waits for messages."""
        if self._worker is None:
            self._worker = self._loop.create_task(self._serve())
        elif self._wakeup is not None:
            wakeup, self._wakeup = self._wakeup, None
            if not wakeup.done():
                wakeup.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        if self._decoder.error is None:  # else it is queued already
            try:
                self._decoder.receive_data(b"")
            except ProtocolError as exc:
                self._queue.append(exc)
        if self._queue or self._worker is not None:
            self._wake_worker()
        else:
            self.close()
        return True  # keep our side open to write the pending replies

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._writable.set()
        self._server.forget(self)
        if self._worker is not None:
            self._wake_worker()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # the worker

    async def _serve(self) -> None:
        """Run queued messages through the pipeline, in order.

        The worker lives as long as the connection: when the queue is empty it
        waits on a future that the next message resolves (cheaper than a new
        task per call), and it ends when the client has closed or gone and
        everything queued has been answered.
        """
        queue = self._queue
        pipeline = self._server.pipeline
        loop = self._loop
        try:
            while True:
                if not queue:
                    if self._eof or self._lost or self._server.draining:
                        break
                    self._wakeup = loop.create_future()
                    await self._wakeup
                    continue
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
                self.busy = True
                try:
                    assert self._kind is not None
                    reply = await pipeline.handle(item, self._kind)
                finally:
                    self.busy = False
                    self.last_active = self._loop.time()
                if reply is not None and not self._lost:
                    assert self._transport is not None
                    self._transport.write(reply)
                    if not self._writable.is_set():
                        await self._writable.wait()
            self.close()
        except asyncio.CancelledError:
            self.close()
            raise
        except Exception:
            log.exception("unexpected error serving client %s; closing its connection", self.peer)
            self._server.metrics.protocol_errors.labels("internal").inc()
            self.close()
        finally:
            self._worker = None

    def _protocol_error(self, exc: ProtocolError) -> None:
        """Answer what can be answered, count, log, close this connection only."""
        self._server.metrics.protocol_errors.labels(exc.kind).inc()
        self._server.protocol_log.warning("closing client %s: %s (%s)", self.peer, exc, exc.kind)
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
    def idle(self) -> bool:
        """Nothing in flight and nothing queued."""
        return not self.busy and not self._queue

    def close(self) -> None:
        """Close after the pending writes are flushed."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Close now, dropping what is queued (shutdown after the drain timeout)."""
        if self._worker is not None:
            self._worker.cancel()
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
        self.protocol_log = RateLimitedLog(log)
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
            self.protocol_log.warning(
                "refusing client %s: %d connections open (max_connections)",
                conn.peer,
                len(self.connections),
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
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        return finished
