"""Real upstream Thrift servers on 127.0.0.1 serving the Interop IDL, one on each library.

Both are `sidecar.testing.thrift_server.ThreadedServer`s (the accept loop and
connection threads the example Catalog service uses too); here the libraries
only process messages. Both run `tests.support.handler`, so they behave the
same, with two differences that come from the libraries and are kept on
purpose:

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

import abc
import contextlib
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any, Literal

import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport
from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated
from thrift.TMultiplexedProcessor import TMultiplexedProcessor as ApacheMultiplexedProcessor
from thrift.transport import TSocket as ApacheTSocket
from thrift.transport import TTransport as ApacheTTransport

from sidecar.testing.call_counter import CallCounter
from sidecar.testing.thrift_server import ThreadedServer
from tests.support.apache_gen import load_apache_interop
from tests.support.handler import EchoHandler, InteropHandler, ServerState
from tests.support.idl import load_thriftpy2_interop

TransportName = Literal["framed", "buffered"]
Library = Literal["thriftpy2", "apache"]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


class UpstreamServer(ThreadedServer, abc.ABC):
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
        (and those of `ThreadedServer`: ``errors``, ``connections_accepted``)
    """

    library = ""
    quiet_errors = (
        OSError,
        thriftpy2.transport.TTransportException,
        ApacheTTransport.TTransportException,
    )

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
        super().__init__(host=HOST, port=port, idle_timeout=idle_timeout)
        self.transport: TransportName = transport
        self.multiplexed = multiplexed
        self.strict_write = strict_write
        self.state = ServerState()
        self._processor: Any = None

    @abc.abstractmethod
    def _make_processor(self) -> Any:
        """The Thrift processor of this library's server."""

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

    def start(self) -> UpstreamServer:
        """Listen and start accepting; returns self."""
        if self._processor is None:
            self._processor = self._make_processor()
        super().start()
        return self

    def _connections_closed(self) -> None:
        # Only now wake handlers (sleepMs): their replies find the connection gone.
        self.state.stopping.set()

    def __enter__(self) -> UpstreamServer:
        super().__enter__()
        return self

    def __repr__(self) -> str:
        port = self._port or "-"
        mux = " multiplexed" if self.multiplexed else ""
        return f"<{type(self).__name__} {HOST}:{port} {self.transport}{mux}>"


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

    library = name = "thriftpy2"

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

    library = name = "apache"

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
