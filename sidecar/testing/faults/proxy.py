"""`FaultProxy`: a fault-injecting TCP shim in front of a real Thrift upstream, on asyncio.

It listens on a port of its own and forwards every call to the upstream
(`sidecar.testing.faults.session`), unless its `FaultPlan` says otherwise.
A ``refuse`` resets a connection after the kernel has completed the
handshake, so the client sees a reset connection, not a refused connect; for
that (ECONNREFUSED, nothing sent) take the whole proxy down with
`FaultProxy.set_down`, which closes the listener and resets every open
connection.

Limits: framed, buffered and THeader transports (a THeader frame is relayed
with its info headers); the binary protocol only, but in THeader frames,
which carry binary or compact; not built for throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sidecar.config import split_address
from sidecar.protocol.framing import DEFAULT_MAX_MESSAGE_SIZE, Transport
from sidecar.testing.faults.plan import Action, FaultPlan
from sidecar.testing.faults.session import (
    Session,
    SessionContext,
    UpstreamLink,
    reset_connection,
    set_nodelay,
)
from sidecar.testing.faults.stats import FaultCounters, FaultStats

log = logging.getLogger("sidecar.testing.faults")


class FaultProxy:
    """The shim; runs on the event loop that calls `start`.

    Args:
        upstream: ``host:port`` of the real upstream.
        transport: how messages are delimited (the same on both sides).
        plan: what to do; a plan that does nothing (all ``ok``) by default.
        host: where to listen.
        port: 0 for any free port.
        max_message_size: largest message read from either side.
        connect_timeout: seconds to wait for a connection to the upstream.
    """

    def __init__(
        self,
        upstream: str,
        transport: Transport | str = Transport.FRAMED,
        plan: FaultPlan | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 2.0,
    ) -> None:
        self.upstream = upstream
        self._upstream_host, self._upstream_port = split_address(upstream)
        self.transport = Transport(transport)
        self.plan = plan or FaultPlan()
        self.host = host
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self._port = port
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._counters = FaultCounters()
        self._context = SessionContext(
            plan=self.plan,
            counters=self._counters,
            transport=self.transport,
            max_message_size=max_message_size,
            upstream=upstream,
            connect=self._connect_upstream,
        )
        self._down = False
        self._started = False

    @property
    def port(self) -> int:
        """The port listened on (kept while down)."""
        if not self._started:
            raise RuntimeError("fault proxy not started")
        return self._port

    @property
    def address(self) -> str:
        """``"host:port"`` to give clients."""
        return f"{self.host}:{self.port}"

    @property
    def down(self) -> bool:
        """True while the listener is closed (connects are refused)."""
        return self._down

    @property
    def stats(self) -> FaultStats:
        """What the proxy has seen and done so far."""
        return self._counters.snapshot()

    async def start(self) -> FaultProxy:
        """Listen; returns self."""
        if self._started:
            raise RuntimeError("fault proxy already started")
        await self._listen()
        self._started = True
        return self

    async def stop(self) -> None:
        """Stop listening and reset every connection; safe to call twice."""
        await self._close_listener()
        await self.drop_connections()

    async def set_down(self, down: bool) -> None:
        """Go down (listener closed, open connections reset) or come back on the same port."""
        if down == self._down:
            return
        if down:
            self._down = True
            await self._close_listener()
            await self.drop_connections()
        else:
            await self._listen()
            self._down = False

    async def drop_connections(self) -> int:
        """Reset every open client connection (and its upstream link); returns how many."""
        sessions = list(self._sessions.items())
        handlers = list(self._handlers)
        for task, writer in sessions:
            reset_connection(writer)
            task.cancel()
        if sessions:
            await asyncio.wait([task for task, _ in sessions])
        if handlers:
            await asyncio.wait(handlers)
        return len(sessions)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, reuse_address=True, backlog=512
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _connect_upstream(self) -> UpstreamLink:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self._upstream_host, self._upstream_port)
        set_nodelay(writer)
        return UpstreamLink(reader, writer, self.transport, self.max_message_size)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one accepted connection.

        The session runs in a task of its own, which `drop_connections`
        cancels; this handler task is never cancelled by us (asyncio's stream
        server reads its result and logs a cancelled one as an error).
        """
        handler = asyncio.current_task()
        assert handler is not None
        self._counters.add("connections")
        if self._down:  # accepted just before the listener closed
            reset_connection(writer)
            return
        if self.plan.next_connection() is Action.REFUSE:
            self._counters.add("refused")
            reset_connection(writer)
            return
        set_nodelay(writer)
        session = asyncio.get_running_loop().create_task(
            Session(self._context, reader, writer).run()
        )
        self._sessions[session] = writer
        self._handlers.add(handler)
        try:
            await asyncio.wait([session])
        finally:
            self._sessions.pop(session, None)
            self._handlers.discard(handler)
        if not session.cancelled() and session.exception() is not None:
            log.error("fault proxy: connection handler failed", exc_info=session.exception())
            reset_connection(writer)
