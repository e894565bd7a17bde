"""The Thrift listener: accepts client connections and keeps the books on them and their calls.

`Server` owns the listening socket, the set of open client connections, the
connections whose client went away while their calls still run, and the
`CallContext` that new calls start with (`use_context` swaps it on a
reload). It makes no policy decision: calls decide (`sidecar.proxy.call`).

- ``max_connections``: connections beyond it are closed at once (counted by
  reason, logged rate-limited). At `Server.listen` it is capped to fit the
  open-file limit (``RLIMIT_NOFILE``, raised towards its hard limit first) less
  a reserve for upstream connections, the admin port and files, so that the
  process never runs out of descriptors in ``accept``: the event loop would
  then reset connections without a word (libuv's EMFILE handling) and
  ``/healthz`` could not be answered. ``process_open_fds`` and
  ``process_max_fds`` in /metrics show how close the process is.
- Idle connections are closed after ``idle_timeout`` by `Server.sweep`; only a
  completed message or a reply is activity, so bytes trickled in that never
  complete a message (slowloris) do not keep a connection open.
- `Server.drain`: stop accepting, close idle connections, wait for every call
  in flight (those of connections already closed by their client too), then
  cut what is left when the timeout passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource

from sidecar.logs import RateLimitedLog
from sidecar.metrics import SidecarMetrics
from sidecar.proxy.call import Call
from sidecar.proxy.client import CallFactory, ClientConnection, ServerSettings, ServerState
from sidecar.proxy.context import CallContext
from sidecar.proxy.tls import ClientTls, TlsListener

log = logging.getLogger("sidecar.server")

__all__ = ["CallFactory", "Server", "ServerSettings", "connection_cap"]

# Descriptors kept free beyond those open at `Server.listen` and the upstream
# pools: admin and control connections (32 admin connections at most), the
# fallback file's reopening, Redis, a reload's files, DNS lookups.
RESERVED_FDS = 128


def connection_cap(max_connections: int, reserve: int) -> tuple[int | None, int]:
    """Client connections that fit the open-file limit, and that limit.

    Raises the soft ``RLIMIT_NOFILE`` towards the hard one when
    ``max_connections + reserve`` needs it (as much as the hard limit allows).

    Returns:
        (the soft limit less ``reserve``, None when unlimited; the soft limit now).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + reserve
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        if target > soft:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    if soft == resource.RLIM_INFINITY:
        return None, soft
    return max(0, soft - reserve), soft


def open_fds() -> int:
    """Descriptors this process has open now (0 where the system does not say)."""
    for listing in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return len(os.listdir(listing))
    return 0


class Server:
    """Accepts client connections and keeps track of them and their calls.

    Args:
        context: what new calls start with.
        settings: limits and the client-side transport.
        metrics: where connections are counted.
        loop: the event loop it runs on.
        call_factory: makes a call for a message (`Call`; the pass-through
            benchmark substitutes its own).
    """

    def __init__(
        self,
        context: CallContext,
        settings: ServerSettings,
        metrics: SidecarMetrics,
        loop: asyncio.AbstractEventLoop,
        call_factory: CallFactory = Call,
        tls: ClientTls | None = None,
    ) -> None:
        # What every connection reads per call: the context, the factory, draining.
        self.state = ServerState(context, None if call_factory is Call else call_factory)
        self.settings = settings
        self.metrics = metrics
        self.loop = loop
        self.tls = tls
        self.connections: set[ClientConnection] = set()
        self.held = 0  # bytes held on behalf of clients (limits.max_buffered_bytes)
        # Connections closed by their client whose calls still run.
        self.finishing: set[ClientConnection] = set()
        # Lines a peer can cause at will are rate-limited (counters stay exact).
        self.protocol_log = RateLimitedLog(log, what="protocol error lines")
        self.refusal_log = RateLimitedLog(log, what="refused-connection lines")
        self._server: asyncio.Server | TlsListener | None = None
        # Client connections that fit the open-file limit (set by `listen`; None: no limit).
        self.fd_cap: int | None = None
        self._changed: asyncio.Event | None = None  # set while draining, on each change

    @property
    def context(self) -> CallContext:
        """What new calls start with."""
        return self.state.context

    @property
    def call_factory(self) -> CallFactory:
        """What makes a call for a message (`Call` unless another was given)."""
        factory = self.state.call_factory
        return Call if factory is None else factory

    @call_factory.setter
    def call_factory(self, factory: CallFactory) -> None:
        self.state.call_factory = None if factory is Call else factory

    @property
    def draining(self) -> bool:
        """No new connections; each open one closes once its calls are answered."""
        return self.state.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.state.draining = value

    def use_context(self, context: CallContext) -> None:
        """Calls that start from now on use ``context``; calls in flight keep theirs."""
        self.state.context = context

    async def listen(
        self, host: str, port: int, upstream_fds: int = 0, *, reuse_port: bool = False
    ) -> tuple[str, int]:
        """Start accepting; returns the bound address (port 0 picks a free one).

        Args:
            upstream_fds: most upstream connections open at once (pool size
                times addresses), kept free of client connections.
            reuse_port: share the port with the other workers' listeners
                (SO_REUSEPORT: the kernel spreads new connections over them).
        """
        configured = self.settings.max_connections
        reserve = open_fds() + 1 + upstream_fds + RESERVED_FDS  # + 1: the listener
        self.fd_cap, soft = connection_cap(configured, reserve)
        if self.fd_cap is not None and self.fd_cap < configured:
            log.warning(
                "max_connections is %d, but the open-file limit (RLIMIT_NOFILE) is %d and %d "
                "descriptors are kept for upstream connections, the admin port and files: "
                "at most %d client connections are accepted, further ones are refused and "
                "counted (reason fd_limit); raise the limit (ulimit -n) to accept more",
                configured,
                soft,
                reserve,
                self.fd_cap,
            )
        if self.tls is not None:
            self._server = await self.tls.listen(
                lambda: ClientConnection(self), host, port, backlog=1024, reuse_port=reuse_port
            )
        else:
            self._server = await self.loop.create_server(
                lambda: ClientConnection(self),
                host,
                port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    def admit(self, conn: ClientConnection) -> bool:
        """Count a new connection in, or refuse it (draining, ``max_connections``, or the
        open-file limit)."""
        reason = self._refusal()
        if reason is not None:
            self.metrics.client_connections_rejected.labels(reason).inc()
            open_now = len(self.connections)
            self.refusal_log.warning(
                "refusing client %s: %s",
                conn.peer,
                "draining"
                if reason == "draining"
                else f"{open_now} connections open (max_connections)"
                if reason == "max_connections"
                else f"{open_now} connections open, as many as the open-file limit allows "
                "(raise ulimit -n)",
                extra={"peer": conn.peer, "reason": reason},
            )
            return False
        self.connections.add(conn)
        self.metrics.client_connections.set(len(self.connections))
        return True

    def _refusal(self) -> str | None:
        """Why a new connection is refused now (a reason label), or None."""
        if self.draining:
            return "draining"
        open_now = len(self.connections)
        if open_now >= self.settings.max_connections:
            return "max_connections"
        if self.fd_cap is not None and open_now >= self.fd_cap:
            return "fd_limit"
        return None

    def forget(self, conn: ClientConnection) -> None:
        """The client's connection is gone; its calls, if any, still run (see `finished`)."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.client_connections.set(len(self.connections))
            if not conn.idle:
                self.finishing.add(conn)
        self._notify()

    def hold(self, conn: ClientConnection, delta: int) -> None:
        """A connection holds ``delta`` more bytes (or fewer); past the budget, shed.

        The budget is ``limits.max_buffered_bytes`` for all client connections
        together: the connections that have held bytes without progress the longest
        (an unfinished message that stopped growing, replies the client does not
        take) are closed first (`ClientConnection.shed`), then those with whole
        messages waiting stop reading until their calls catch up
        (`ClientConnection.hold_back`).
        """
        self.held += delta
        if delta > 0 and self.held > self.settings.max_buffered_bytes:
            self._over_budget()

    def _over_budget(self) -> None:
        limit = self.settings.max_buffered_bytes
        # Those that have held bytes without progress the longest go first: an
        # unfinished message that stopped growing, replies its client does not take.
        stalled = sorted(
            (c for c in self.connections if c.stalled_since is not None),
            key=lambda c: c.stalled_since or 0.0,
        )
        for conn in stalled:
            if self.held <= limit:
                return
            conn.shed()  # counted as protocol_errors_total{kind="memory"}
        if self.held > limit:
            for conn in sorted(self.connections, key=lambda c: c.waiting_bytes, reverse=True):
                if not conn.waiting_bytes:
                    break
                conn.hold_back()

    def finished(self, conn: ClientConnection) -> None:
        """A connection whose client went away has no call left."""
        self.finishing.discard(conn)
        self._notify()

    def sweep(self) -> int:
        """Close connections idle longer than ``idle_timeout``; returns how many."""
        limit = self.loop.time() - self.settings.idle_timeout
        stale = [c for c in self.connections if c.idle and c.last_active < limit]
        for conn in stale:
            log.info(
                "closing client %s: idle for more than %gs", conn.peer, self.settings.idle_timeout
            )
            self.metrics.client_idle_closes.inc()
            conn.expire()
        return len(stale)

    def calls_in_flight(self) -> bool:
        """Whether any connection, open or closed by its client, has work left."""
        return bool(self.finishing) or any(not c.idle for c in self.connections)

    async def close_listener(self) -> None:
        """Stop accepting new connections (a failed start, or the start of a drain)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let calls in flight finish, close everything.

        Returns:
            True when every call finished within ``timeout``.
        """
        self.draining = True
        self._changed = asyncio.Event()
        if self._server is not None:
            self._server.close()
        deadline = self.loop.time() + timeout
        while True:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            if not self.connections and not self.finishing:
                break
            left = deadline - self.loop.time()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        finished = not self.calls_in_flight()
        for conn in list(self.connections) + list(self.finishing):
            conn.cut(
                f"sidecar: shutting down, and this call did not finish within drain_timeout "
                f"({timeout:g}s)"
            )
        self.finishing.clear()
        self.protocol_log.flush()
        self.refusal_log.flush()
        if self.tls is not None:
            self.tls.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        return finished

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
