"""Real upstream Thrift servers on 127.0.0.1, one on each library.

Plan: we own the listening socket and the threads; the libraries only
process messages. An accept thread polls the listener (every
`_ACCEPT_POLL_SECONDS`; `stop()` wakes it at once by connecting) and starts
a daemon thread per connection, which wraps the socket in the library's
transport and protocol and calls its processor until the peer closes.
`stop()` sets a flag, shuts every open connection down (which wakes blocked
reads), lets the accept thread close the listener, and joins every thread
against one deadline. The libraries' own servers are not used: their
accept loops cannot be stopped (Apache's ``TThreadedServer.serve`` is
``while True``).

Both servers run `tests.support.handler`, so they behave the same, with two
differences that come from the libraries and are kept on purpose:

- An undeclared error in a handler (``crash()``): the Apache generated
  processor answers ``TApplicationException(INTERNAL_ERROR, "Internal
  error")``. thriftpy2's processor re-raises it and its server drops the
  connection; here the thriftpy2 server answers INTERNAL_ERROR like Apache
  unless ``library_errors=True``, which keeps thriftpy2's own behaviour.
- A multiplexed call to an unknown service: Apache's ``TMultiplexedProcessor``
  raises and the connection is dropped; thriftpy2's answers UNKNOWN_METHOD.
  (thriftpy2's stock multiplexed processor also drops the connection on an
  unknown method of a known service; ours answers UNKNOWN_METHOD unless
  ``library_errors=True``.) A call without a ``Service:`` prefix to a
  multiplexed server makes both drop the connection.

Both always read strict and non-strict envelopes, and write strict ones
unless ``strict_write=False``. Multiplexed replies carry the bare method
name (``getItem``, not ``Interop:getItem``) on both libraries.

Limits: the Apache framed transport refuses frames over 16,384,000 bytes
(its ``DEFAULT_MAX_FRAME_SIZE``); thriftpy2's has no limit.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport
from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
from thrift.TMultiplexedProcessor import TMultiplexedProcessor as ApacheMultiplexedProcessor
from thrift.transport import TSocket as ApacheTSocket
from thrift.transport import TTransport as ApacheTTransport

from tests.support.apache_gen import load_apache_interop
from tests.support.handler import CallCounter, EchoHandler, InteropHandler, ServerState
from tests.support.idl import load_thriftpy2_interop

TransportName = Literal["framed", "buffered"]
Library = Literal["thriftpy2", "apache"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
# How long the accept thread blocks before it looks at the stop flag again.
_ACCEPT_POLL_SECONDS = 0.1
# Connection-ending errors kept for inspection (oldest dropped beyond this).
_MAX_ERRORS = 100
SERVICE_NAMES = ("Interop", "Echo")


class UpstreamServer:
    """A threaded Thrift server serving Interop (and Echo when multiplexed).

    Use as a context manager, or call `start()` and `stop()`.

    Args:
        transport: ``"framed"`` or ``"buffered"``.
        multiplexed: register Interop and Echo under those names; calls must
            then be named ``Interop:method`` or ``Echo:method``.
        port: 0 for any free port; a former server's port to restart it.
        strict_write: write strict envelopes (both libraries' default).
        idle_timeout: seconds a connection may stay silent before the server
            closes it; None for never.

    Attributes:
        library: ``"thriftpy2"`` or ``"apache"``.
        state: shared with the handlers (counters, notifications, hook).
        errors: reprs of errors (other than EOF/reset) that ended a connection.
        connections_accepted: connections accepted so far.
    """

    library = ""

    def __init__(
        self,
        transport: TransportName = "framed",
        multiplexed: bool = False,
        *,
        port: int = 0,
        strict_write: bool = True,
        idle_timeout: float | None = 120.0,
    ) -> None:
        if transport not in ("framed", "buffered"):
            raise ValueError(f"transport must be 'framed' or 'buffered', not {transport!r}")
        self.transport: TransportName = transport
        self.multiplexed = multiplexed
        self.strict_write = strict_write
        self.idle_timeout = idle_timeout
        self.state = ServerState()
        self.errors: list[str] = []
        self.connections_accepted = 0
        self._requested_port = port
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._port = 0
        self._processor: Any = None

    # -- what the two libraries do differently ---------------------------------

    def _make_processor(self) -> Any:
        raise NotImplementedError

    def _serve_connection(self, sock: socket.socket) -> None:
        """Process calls on ``sock`` until the peer closes or the server stops."""
        raise NotImplementedError

    # -- public ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port listened on (known once started)."""
        if not self._port:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{HOST}:{self.port}"

    @property
    def calls(self) -> CallCounter:
        """Executions per method: ``server.calls["placeOrder"]``."""
        return self.state.calls

    @property
    def notifications(self) -> list[str]:
        """Tags of the ``notify`` calls executed, oldest first."""
        return self.state.notifications

    @property
    def hook(self) -> Callable[[str], None] | None:
        """Called at the start of every method (see `ServerState.hook`)."""
        return self.state.hook

    @hook.setter
    def hook(self, value: Callable[[str], None] | None) -> None:
        self.state.hook = value

    @property
    def open_connections(self) -> int:
        """Connections open right now."""
        with self._lock:
            return len(self._conns)

    def start(self) -> UpstreamServer:
        """Listen and start accepting; returns self."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        self._processor = self._make_processor()
        listener = socket.create_server((HOST, self._requested_port), backlog=128)
        listener.settimeout(_ACCEPT_POLL_SECONDS)
        self._listener = listener
        self._port = listener.getsockname()[1]
        thread = threading.Thread(
            target=self._accept_loop, name=f"{self.library}-accept-{self._port}", daemon=True
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
        """Stop accepting, drop open connections, wait for every thread.

        Safe to call twice. A handler inside ``sleepMs`` is woken at once.

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
        # Only now wake handlers (sleepMs): their replies find the connection gone.
        self.state.stopping.set()
        if self._accept_thread is not None:
            self._wake_accept_thread()
            threads.append(self._accept_thread)
        # A hook may call stop() from a connection thread, which cannot join itself.
        threads = [t for t in threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise RuntimeError(f"server threads still running after {timeout}s: {stuck}")

    def _wake_accept_thread(self) -> None:
        """Connect to ourselves so a blocked ``accept`` returns now, not at its next poll."""
        with contextlib.suppress(OSError), socket.create_connection((HOST, self._port), 0.5):
            pass

    def __enter__(self) -> UpstreamServer:
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        port = self._port or "-"
        mux = " multiplexed" if self.multiplexed else ""
        return f"<{type(self).__name__} {HOST}:{port} {self.transport}{mux}>"

    # -- threads ---------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            while not self._closing.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    self._record_error(exc)
                    return
                self._start_connection(conn)
        finally:
            listener.close()

    def _start_connection(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(self.idle_timeout)
        thread = threading.Thread(
            target=self._run_connection,
            args=(conn,),
            name=f"{self.library}-conn-{self._port}",
            daemon=True,
        )
        with self._lock:
            if self._closing.is_set():
                conn.close()
                return
            self.connections_accepted += 1
            self._conns.add(conn)
            self._threads.add(thread)
        thread.start()

    def _run_connection(self, conn: socket.socket) -> None:
        try:
            self._serve_connection(conn)
        except Exception as exc:
            # Never let an error escape a thread: pytest turns it into a failure elsewhere.
            if not isinstance(exc, OSError) and not _is_eof(exc):
                logger.info("%s: connection ended by %r", self, exc)
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


def _is_eof(exc: BaseException) -> bool:
    """A transport exception that means the peer went away or stayed silent."""
    return isinstance(
        exc, thriftpy2.transport.TTransportException | ApacheTTransport.TTransportException
    )


# -- thriftpy2 -------------------------------------------------------------------


def _process_answering_undeclared(self: Any, iprot: Any, oprot: Any) -> None:
    """thriftpy2's ``TProcessor.process``, but an undeclared error becomes INTERNAL_ERROR.

    thriftpy2 re-raises it, and its server then drops the connection; the
    Apache generated processors answer it instead. This does what Apache does.
    """
    tae = thriftpy2.thrift.TApplicationException
    api, seqid, result, call = self.process_in(iprot)
    if isinstance(result, tae):
        self.send_exception(oprot, api, result, seqid)
        return
    assert call is not None
    try:
        result.success = call()
    except tae as exc:
        self.send_exception(oprot, api, exc, seqid)
        return
    except Exception as exc:
        if not self.handle_exception(exc, result):
            logger.exception("undeclared error in handler of %s", api)
            if not result.oneway:
                error = tae(tae.INTERNAL_ERROR, f"Internal error: {type(exc).__name__}: {exc}")
                self.send_exception(oprot, api, error, seqid)
            return
    if not result.oneway:
        self.send_result(oprot, api, result, seqid)


class _Thriftpy2Processor(thriftpy2.thrift.TProcessor):
    process = _process_answering_undeclared


class _Thriftpy2MultiplexedProcessor(thriftpy2.thrift.TMultiplexedProcessor):
    """Also answers UNKNOWN_METHOD for an unknown method of a known service."""

    process = _process_answering_undeclared

    def process_in(self, iprot: Any) -> tuple[str, int, Any, Callable[[], Any] | None]:
        tae = thriftpy2.thrift.TApplicationException
        name, mtype, seqid = iprot.read_message_begin()
        if mtype not in (thriftpy2.thrift.TMessageType.CALL, thriftpy2.thrift.TMessageType.ONEWAY):
            raise thriftpy2.thrift.TException("TMultiplexed protocol only supports CALL & ONEWAY")
        service_name, sep, api = name.partition(self.SEPARATOR)
        if not sep:
            raise thriftpy2.thrift.TException(f"service name not found in message name {name!r}")
        proc = self.processors.get(service_name)
        if proc is None or api not in proc._service.thrift_services:
            iprot.skip(thriftpy2.thrift.TType.STRUCT)
            iprot.read_message_end()
            return api, seqid, tae(tae.UNKNOWN_METHOD, f"unknown method {name}"), None
        args = getattr(proc._service, api + "_args")()
        args.read(iprot)
        iprot.read_message_end()
        result = getattr(proc._service, api + "_result")()
        arg_names = [spec[1] for spec in args.thrift_spec.values()]
        method = getattr(proc._handler, api)

        def call() -> Any:
            return method(*(args.__dict__[k] for k in arg_names))

        return api, seqid, result, call


class Thriftpy2Server(UpstreamServer):
    """The Interop service on thriftpy2 (Cython transports and binary protocol).

    Args:
        library_errors: keep thriftpy2's own handling of an undeclared handler
            error and of an unknown multiplexed method: drop the connection.
        (the rest: see `UpstreamServer`)
    """

    library = "thriftpy2"

    def __init__(
        self,
        transport: TransportName = "framed",
        multiplexed: bool = False,
        *,
        library_errors: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(transport, multiplexed, **kwargs)
        self.library_errors = library_errors

    def _make_processor(self) -> Any:
        idl = load_thriftpy2_interop()
        interop = InteropHandler(self.state, idl)
        plain = thriftpy2.thrift.TProcessor if self.library_errors else _Thriftpy2Processor
        if not self.multiplexed:
            return plain(idl.Interop, interop)
        mux = (
            thriftpy2.thrift.TMultiplexedProcessor()
            if self.library_errors
            else _Thriftpy2MultiplexedProcessor()
        )
        mux.register_processor("Interop", plain(idl.Interop, interop))
        mux.register_processor("Echo", plain(idl.Echo, EchoHandler(self.state)))
        return mux

    def _serve_connection(self, sock: socket.socket) -> None:
        tsock = thriftpy2.transport.TSocket(sock=sock)
        if self.transport == "framed":
            trans = thriftpy2.transport.TCyFramedTransport(tsock)
        else:
            trans = thriftpy2.transport.TCyBufferedTransport(tsock)
        proto = thriftpy2.protocol.TCyBinaryProtocol(
            trans, strict_read=False, strict_write=self.strict_write
        )
        processor = self._processor
        closing = self._closing
        while not closing.is_set():
            processor.process(proto, proto)


# -- Apache ----------------------------------------------------------------------


class ApacheServer(UpstreamServer):
    """The Interop service on the Apache Python library, with compiler-generated code.

    Uses ``TBinaryProtocolAccelerated`` (the C ``fastbinary`` codec). See
    `UpstreamServer` for the arguments.
    """

    library = "apache"

    def _make_processor(self) -> Any:
        gen = load_apache_interop()
        interop = gen.Interop.Processor(InteropHandler(self.state, gen.ttypes))
        if not self.multiplexed:
            return interop
        mux = ApacheMultiplexedProcessor()
        mux.registerProcessor("Interop", interop)
        mux.registerProcessor("Echo", gen.Echo.Processor(EchoHandler(self.state)))
        return mux

    def _serve_connection(self, sock: socket.socket) -> None:
        tsock = ApacheTSocket.TSocket()
        tsock.setHandle(sock)
        if self.transport == "framed":
            trans = ApacheTTransport.TFramedTransport(tsock)
        else:
            trans = ApacheTTransport.TBufferedTransport(tsock)
        proto = TBinaryProtocolAccelerated(trans, strictRead=False, strictWrite=self.strict_write)
        processor = self._processor
        closing = self._closing
        while not closing.is_set():
            processor.process(proto, proto)


# -- context managers -------------------------------------------------------------


@contextlib.contextmanager
def thriftpy2_server(
    transport: TransportName = "framed", multiplexed: bool = False, **kwargs: Any
) -> Iterator[Thriftpy2Server]:
    """A started `Thriftpy2Server`, stopped on exit (keyword arguments: see the class)."""
    server = Thriftpy2Server(transport, multiplexed, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def apache_server(
    transport: TransportName = "framed", multiplexed: bool = False, **kwargs: Any
) -> Iterator[ApacheServer]:
    """A started `ApacheServer`, stopped on exit (keyword arguments: see `UpstreamServer`)."""
    server = ApacheServer(transport, multiplexed, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def upstream_server(
    library: Library,
    transport: TransportName = "framed",
    multiplexed: bool = False,
    **kwargs: Any,
) -> Iterator[UpstreamServer]:
    """`thriftpy2_server` or `apache_server`, chosen by name (for parametrized tests)."""
    factory = thriftpy2_server if library == "thriftpy2" else apache_server
    with factory(transport, multiplexed, **kwargs) as server:
        yield server
