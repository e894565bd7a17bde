"""One client connection of the fault proxy: read calls, apply the plan to each, in order.

Only message boundaries (`sidecar.protocol.framing`, the same transport on
both sides; a THeader frame's header too) and the envelope are decoded;
payloads pass through as bytes.
Each session has its own upstream connection, opened at its first forwarded
call. One call is in flight per client connection: a pipelining client is
served in order, one call after the other.

The connection stays open after ``internal_error`` and ``garbage``: it is the
client's job to stop using it. ``oneway`` calls are forwarded without waiting
for anything; ``internal_error`` drops them (there is nothing to answer).
A ``delay`` forwards and relays even when the client has gone meanwhile (a
slow upstream executes late calls too).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.auto import decoder_for
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import Message, Transport, frame
from sidecar.testing.faults.plan import Action, FaultPlan
from sidecar.testing.faults.stats import FaultCounters

log = logging.getLogger("sidecar.testing.faults")

READ_BYTES = 256 * 1024
# SO_LINGER on, timeout 0: close() sends RST at once instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_connection(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


def failure_kind(exc: BaseException) -> str:
    """A short name for why the upstream could not be used: the errno's name
    (``ECONNREFUSED``), else the exception's type (``ConnectionError``)."""
    number = getattr(exc, "errno", None)
    if isinstance(number, int) and number in errno.errorcode:
        return errno.errorcode[number]
    return type(exc).__name__


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY on the writer's socket (small calls go out at once)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class UpstreamLink:
    """One connection to the real upstream, one call at a time."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        transport: Transport,
        max_message_size: int,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = decoder_for(transport, max_size=max_message_size)
        self._transport = transport

    async def exchange(self, message: Message, oneway: bool) -> Message | None:
        """Send one call; return its reply (None for oneway).

        Raises:
            ConnectionError: the upstream closed the connection.
            RemoteProtocolError: the upstream sent something unreadable.
        """
        self._writer.write(message.to_wire(self._transport))
        await self._writer.drain()
        if oneway:
            return None
        while True:
            data = await self._reader.read(READ_BYTES)
            if not data:
                raise ConnectionError("the upstream closed the connection")
            replies = self._decoder.receive_data(data)
            if replies:
                return replies[0]

    def close(self) -> None:
        self._writer.transport.abort()


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What every session of one proxy shares.

    Attributes:
        plan: picks each call's action.
        counters: the proxy's counts.
        transport: how messages are delimited, on both sides.
        max_message_size: largest message read from either side.
        upstream: ``host:port`` of the real upstream (for log lines).
        connect: opens a new connection to the upstream.
    """

    plan: FaultPlan
    counters: FaultCounters
    transport: Transport
    max_message_size: int
    upstream: str
    connect: Callable[[], Awaitable[UpstreamLink]]


class Session:
    """One client connection; `run` returns when it is over."""

    def __init__(
        self, ctx: SessionContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._ctx = ctx
        self._reader = reader
        self._writer = writer
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._upstream: UpstreamLink | None = None
        self._client_gone = False
        self._reset_done = False

    async def run(self) -> None:
        pump = asyncio.get_running_loop().create_task(self._pump())
        try:
            while True:
                message = await self._queue.get()
                if message is None or not await self._handle(message):
                    break
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            if self._upstream is not None:
                self._upstream.close()
            if not self._reset_done:
                self._writer.transport.abort()

    async def _pump(self) -> None:
        """Read the client's bytes into calls until EOF or a decoding error."""
        decoder = decoder_for(self._ctx.transport, max_size=self._ctx.max_message_size)
        try:
            while True:
                data = await self._reader.read(READ_BYTES)
                if not data:
                    break
                for message in decoder.receive_data(data):
                    self._queue.put_nowait(message)
        except (ConnectionError, RemoteProtocolError) as exc:
            log.debug("fault proxy: client connection ends: %s", exc)
        finally:
            self._client_gone = True
            self._queue.put_nowait(None)

    async def _handle(self, message: Message) -> bool:
        """Apply the plan to one call; False ends the connection."""
        ctx = self._ctx
        header = message.header
        fault = ctx.plan.next_call()
        ctx.counters.call(header.name, fault.action)
        oneway = header.type == MessageType.ONEWAY
        action = fault.action
        if action is Action.OK:
            return await self._forward(message, oneway, relay=True)
        if action is Action.DELAY:
            await asyncio.sleep(fault.delay)
            return await self._forward(message, oneway, relay=True)
        if action is Action.RESET_BEFORE:
            self._reset()
            return False
        if action is Action.RESET_AFTER:
            if await self._forward(message, oneway, relay=False):
                self._reset()
            return False
        if action is Action.CLOSE_AFTER:
            if await self._forward(message, oneway, relay=True):
                self._writer.close()  # a FIN after the reply: nothing is lost
            return False
        if action is Action.INTERNAL_ERROR:
            if not oneway:
                reply = encode_application_exception(
                    header.method,
                    header.seqid,
                    ApplicationExceptionType.INTERNAL_ERROR,
                    "fault injected: internal_error",
                    header.strict,
                    header.protocol,
                )
                await self._write(frame(reply, ctx.transport))
            return True
        assert action is Action.GARBAGE
        await self._write(ctx.plan.garbage())
        return True

    async def _forward(self, message: Message, oneway: bool, *, relay: bool) -> bool:
        """Send the call upstream and, when ``relay``, its reply back; False on failure."""
        ctx = self._ctx
        step = "connect" if self._upstream is None else "later call"  # for a failure's kind
        try:
            if self._upstream is None:
                self._upstream = await ctx.connect()
                step = "first call"
            reply = await self._upstream.exchange(message, oneway)
        except (OSError, RemoteProtocolError, TimeoutError) as exc:
            log.info("fault proxy: upstream %s failed: %s", ctx.upstream, exc)
            ctx.counters.upstream_failure(f"{step}: {failure_kind(exc)}")
            self._reset()
            return False
        ctx.counters.add("forwarded")
        if reply is not None and relay:
            if self._client_gone:
                ctx.counters.add("late_replies")
            await self._write(reply.to_wire(ctx.transport))
        return True

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._writer.transport.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def _reset(self) -> None:
        self._reset_done = True
        reset_connection(self._writer)
