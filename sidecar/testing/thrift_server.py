"""A Thrift server on threads that can be stopped: the accept loop the test upstreams share.

We own the listening socket and the threads; a Thrift library only processes
messages (subclasses say how, in `ThreadedServer._serve_connection`). An
accept thread polls the listener and starts a daemon thread per connection;
an ``accept`` that fails (out of file descriptors, say) is logged and tried
again after a pause, so a failure that passes never closes the listener.
`stop()` sets a flag, shuts every open connection down (which wakes blocked
reads), wakes the accept thread by connecting to it, and joins every thread
against one deadline. The libraries' own servers are not used: their accept
loops cannot be stopped (Apache's ``TThreadedServer.serve`` is ``while True``,
thriftpy2's ``TThreadedServer`` too).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import socket
import threading
import time

import thriftpy2.transport

log = logging.getLogger("sidecar.testing.thrift_server")

# How long the accept thread blocks before it looks at the stop flag again.
_ACCEPT_POLL_SECONDS = 0.1
# The pause before accept is tried again after it failed (EMFILE and the like).
_ACCEPT_RETRY_SECONDS = 0.05
# Connection-ending errors kept for inspection (oldest dropped beyond this).
_MAX_ERRORS = 100


class ThreadedServer(abc.ABC):
    """Accepts TCP connections and serves each on a thread of its own.

    Use as a context manager, or call `start()` and `stop()`.

    Args:
        host: where to listen.
        port: 0 for any free port; a former server's port to restart it.
        idle_timeout: seconds a connection may stay silent before the server
            closes it; None for never.

    Attributes:
        name: names the threads (``<name>-conn-<port>``).
        quiet_errors: what ends a connection without being an error worth
            keeping (the peer went away or stayed silent).
        errors: reprs of other errors that ended a connection.
        connections_accepted: connections accepted so far.
    """

    name = "thrift"
    quiet_errors: tuple[type[BaseException], ...] = (
        OSError,
        thriftpy2.transport.TTransportException,
    )

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, idle_timeout: float | None = 120.0
    ) -> None:
        self.host = host
        self.idle_timeout = idle_timeout
        self.errors: list[str] = []
        self.connections_accepted = 0
        self._requested_port = port
        self._port = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None

    # -- what a subclass provides ------------------------------------------------

    @abc.abstractmethod
    def _serve_connection(self, sock: socket.socket) -> None:
        """Process calls on ``sock`` until the peer closes or ``self._closing`` is set."""

    def _connections_closed(self) -> None:  # noqa: B027 - a hook, empty by default
        """Called by `stop` once every connection is shut down, before the joins."""

    # -- public ------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (known once started)."""
        if not self._port:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to connect to (the loopback address when listening on every interface)."""
        return f"{self._connect_host}:{self.port}"

    @property
    def open_connections(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._conns)

    def start(self) -> ThreadedServer:
        """Listen and start accepting; returns self."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        listener = socket.create_server((self.host, self._requested_port), backlog=128)
        listener.settimeout(_ACCEPT_POLL_SECONDS)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        thread = threading.Thread(
            target=self._accept_loop, name=f"{self.name}-accept-{self._port}", daemon=True
        )
        self._accept_thread = thread
        thread.start()
        return self

    def close_connections(self) -> int:
        """Drop every open connection (as a crashing upstream would); keep listening.

        Returns:
            How many connections were dropped.
        """
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)
        return len(conns)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop open connections, wait for every thread; safe to call twice.

        Raises:
            RuntimeError: some thread was still running after ``timeout`` s.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing.set()
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            _shutdown(conn)
        self._connections_closed()
        if self._accept_thread is not None:
            self._wake_accept_thread()
            threads.append(self._accept_thread)
        # A handler may call stop() from a connection thread, which cannot join itself.
        threads = [t for t in threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"server threads still running after {timeout}s: {stuck}")

    def __enter__(self) -> ThreadedServer:
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self._port or '-'}>"

    # -- threads -----------------------------------------------------------------

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def _wake_accept_thread(self) -> None:
        """Connect to ourselves so a blocked ``accept`` returns now, not at its next poll."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection((self._connect_host, self._port), 0.5),
        ):
            pass

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        failing = False  # the last accept failed: said once, and again when it works
        try:
            while not self._closing.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    # Out of file descriptors, memory or buffers, or a connection
                    # aborted while queued: all pass. The listener stays open (closed,
                    # it would refuse every client for good) and accept is tried again
                    # after a pause (at once, it would spin on the same failure).
                    self._record_error(exc)
                    if not failing:
                        log.warning("%s: cannot accept a connection (%s); trying again", self, exc)
                        failing = True
                    self._closing.wait(_ACCEPT_RETRY_SECONDS)
                    continue
                if failing:
                    log.warning("%s: accepting connections again", self)
                    failing = False
                self._start_connection(conn)
        finally:
            listener.close()

    def _start_connection(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.idle_timeout)
        thread = threading.Thread(
            target=self._run_connection,
            args=(conn,),
            name=f"{self.name}-conn-{self._port}",
            daemon=True,
        )
        with self._lock:
            if self._closing.is_set():
                conn.close()
                return
            self.connections_accepted += 1
            try:
                thread.start()  # under the lock: stop() never sees a thread it cannot join
            except RuntimeError as exc:  # no thread to be had now: this connection is refused
                self._record_error(exc)
                conn.close()
                return
            self._conns.add(conn)
            self._threads.add(thread)

    def _run_connection(self, conn: socket.socket) -> None:
        try:
            self._serve_connection(conn)
        except Exception as exc:
            # Never let an error escape a thread: pytest turns it into a failure elsewhere.
            if not isinstance(exc, self.quiet_errors):
                log.info("%s: connection ended by %r", self, exc)
                self._record_error(exc)
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            _shutdown(conn)
            conn.close()

    def _record_error(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(repr(exc))
            del self.errors[:-_MAX_ERRORS]


def _shutdown(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
