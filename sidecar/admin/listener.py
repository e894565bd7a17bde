"""The HTTP machinery both listeners share: h11, one request per connection, bounded clients.

`HttpServer` listens on the sidecar's event loop and hands each whole
request to its subclass's `HttpServer.route`; `HttpConnection` reads it with
h11 and writes the answer. Careless or hostile clients are bounded in bytes,
time and number, and get a 4xx or 503 with a one-line text body, never a
traceback in the log.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs

import h11

from sidecar.logs import RateLimitedLog

log = logging.getLogger("sidecar.admin")

# A GET is a few hundred bytes (Prometheus sends about 300); 8 KiB is the
# default header limit of nginx and of h11's own `max_incomplete_event_size`
# order of magnitude, well above any real scrape or probe.
MAX_REQUEST_BYTES = 8192
# Probes and scrapes on a loopback or pod network send their request at once;
# 5 s is generous for them and short for a connection held open on purpose.
REQUEST_TIMEOUT = 5.0
# Prometheus scrapes once per interval and probes are one at a time: 32 open
# admin connections is far more than any honest use.
MAX_CONNECTIONS = 32

TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True)
class Answer:
    """An HTTP answer before encoding."""

    status: int
    content_type: str
    body: bytes
    headers: Sequence[tuple[str, str]] = ()


@dataclass(frozen=True)
class Request:
    """A whole request, as the routes see it.

    Attributes:
        method: ``GET``, ``POST`` ...
        path: the target before ``?``, percent-decoding left to the route.
        query: the query string's parameters (``parse_qs``).
        headers: as h11 gives them (lower-case names).
        peer: ``host:port`` of the client, for the log.
        target: the whole target, path and query, as sent.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Sequence[tuple[bytes, bytes]]
    peer: str
    target: str = ""

    @classmethod
    def from_h11(cls, event: h11.Request, peer: str) -> Request:
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        return cls(
            event.method.decode("latin-1"),
            path,
            parse_qs(query),
            list(event.headers),
            peer,
            target,
        )

    def header(self, name: bytes) -> str:
        """Every value of header ``name`` (lower-case), joined by commas."""
        return b",".join(v for k, v in self.headers if k == name).decode("latin-1")


def text(status: int, line: str, headers: Sequence[tuple[str, str]] = ()) -> Answer:
    """A one-line plain text answer."""
    return Answer(status, TEXT, line.encode() + b"\n", headers)


class HttpServer(abc.ABC):
    """An HTTP/1.1 listener on the event loop; subclasses answer with `route`.

    A request must arrive whole within ``request_timeout`` seconds of
    connecting (bytes trickling in do not extend it; else 408) and be at most
    ``max_request_bytes`` (else 431 or 413); a malformed one gets a 400. A
    route that raises gives a 500 and a rate-limited warning. More than
    ``max_connections`` open at once get a 503.

    Args:
        name: what the log calls this listener (``admin``, ``control``).
        max_connections: connections open at once; more get a 503.
        request_timeout: seconds for a request to arrive whole, and again for
            its answer to be sent.
        max_request_bytes: the largest request (head and body) read.
    """

    name = "http"

    def __init__(
        self,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.max_request_bytes = max_request_bytes
        self.connections: set[HttpConnection] = set()
        # Lines a client can cause at will are rate-limited.
        self.error_log = RateLimitedLog(log, what=f"{self.name} error lines")
        self.refusal_log = RateLimitedLog(log, what=f"refused {self.name} connection lines")
        self._server: asyncio.Server | None = None

    @abc.abstractmethod
    def route(self, request: Request) -> Answer | asyncio.Future[Answer]:
        """The answer to a whole request (subclasses); a future when it is made off the loop."""

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start serving; returns the bound address (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpConnection(self), host, port, reuse_address=True
        )
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        """Stop listening and drop the connections still open."""
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def admit(self, conn: HttpConnection) -> bool:
        """Count ``conn`` in, unless ``max_connections`` are open already."""
        if len(self.connections) >= self.max_connections:
            self.refusal_log.warning(
                "refusing %s client %s: %d %s connections open (the most allowed)",
                self.name,
                conn.peer,
                len(self.connections),
                self.name,
                extra={"peer": conn.peer},
            )
            return False
        return True

    def answer(self, request: h11.Request, peer: str = "?") -> Answer | asyncio.Future[Answer]:
        """The answer to a whole request; a failing route gives a 500."""
        try:
            return self.route(Request.from_h11(request, peer))
        except Exception as exc:
            return self.failed(request, exc)

    def answer_made(self, request: h11.Request, made: asyncio.Future[Answer]) -> Answer:
        """The answer a route made off the loop; one that failed gives a 500."""
        exc = made.exception()
        if exc is None:
            return made.result()
        return self.failed(request, exc)

    def failed(self, request: h11.Request, exc: BaseException) -> Answer:
        """A route failed: a rate-limited warning, and a 500."""
        target = request.target.decode("ascii", "replace")
        if self.error_log.warning(
            "%s request %s %s failed: %s: %s",
            self.name,
            request.method.decode("ascii", "replace"),
            target,
            type(exc).__name__,
            exc,
            extra={"path": target},
        ):
            log.debug("%s request %s failed", self.name, target, exc_info=exc)
        return text(500, "internal error")


class HttpConnection(asyncio.Protocol):
    """One connection: reads one request with h11, answers it, closes.

    Every callback from the loop is guarded: whatever goes wrong ends this
    connection, with a rate-limited log line, and nothing else.
    """

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._http = h11.Connection(h11.SERVER, max_incomplete_event_size=server.max_request_bytes)
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._request: h11.Request | None = None
        self._received = 0
        self._answered = False
        self._eof = False
        self.peer = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence the cast.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._guard(self._start)

    def data_received(self, data: bytes) -> None:
        self._guard(self._receive, data)

    def eof_received(self) -> bool:
        self._eof = True
        self._guard(self._receive, b"")
        return True  # we close, once the answer is written

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._server.connections.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _guard(self, step: Callable[..., None], *args: Any) -> None:
        try:
            step(*args)
        except Exception as exc:
            self._server.error_log.warning(
                "%s connection %s failed: %s: %s",
                self._server.name,
                self.peer,
                type(exc).__name__,
                exc,
            )
            self.abort()

    def _start(self) -> None:
        admitted = self._server.admit(self)
        self._server.connections.add(self)  # counted until closed, refused or not
        if not admitted:
            self._send(text(503, f"too many {self._server.name} connections; try again"))
            return
        self._arm(self._expire)

    def _receive(self, data: bytes) -> None:
        if self._answered:
            # Bytes after the request are read and dropped until the client
            # closes: closing with bytes unread would reset the connection, and
            # the client could lose the answer.
            if self._eof:
                self._close()
            return
        # h11 parses at most one read (256 KiB) past the limit before we stop.
        self._received += len(data)
        self._http.receive_data(data)
        limit = self._server.max_request_bytes
        while True:
            try:
                event = self._http.next_event()
            except h11.RemoteProtocolError as exc:  # 431 when the head outgrows h11's buffer
                self._refuse(exc.error_status_hint)
                return
            if event is h11.NEED_DATA:
                if self._received > limit:
                    self._refuse(413 if self._request is not None else 431)
                return
            if isinstance(event, h11.Request):
                if self._received - len(self._http.trailing_data[0]) > limit:
                    self._refuse(431)  # a long head that arrived whole
                    return
                self._request = event
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                if self._received - len(self._http.trailing_data[0]) > limit:
                    self._refuse(413)
                else:
                    self._answer(self._server.answer(self._request, self.peer))
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._answered = True  # closed before sending anything: nothing to answer
                self._close()
                return

    def _answer(self, answer: Answer | asyncio.Future[Answer]) -> None:
        """Send ``answer`` now, or when it is made."""
        if isinstance(answer, Answer):
            self._send(answer)
            return
        self._answered = True  # bytes that come meanwhile are not another request
        self._arm(self.abort)  # made and sent within request_timeout, or dropped
        request = self._request
        assert request is not None
        answer.add_done_callback(lambda made: self._guard(self._send_made, request, made))

    def _send_made(self, request: h11.Request, made: asyncio.Future[Answer]) -> None:
        if made.cancelled() or self._transport is None or self._transport.is_closing():
            return
        self._send(self._server.answer_made(request, made))

    def _refuse(self, status: int) -> None:
        if status in (413, 431):
            self._send(text(status, "request too large"))
        else:
            self._send(text(status, "bad request: not HTTP/1.1 as expected"))

    def _expire(self) -> None:
        self._guard(self._send, text(408, "request not received in time"))

    def _send(self, answer: Answer) -> None:
        """Write ``answer`` and end our side; drop the connection if not done in time."""
        self._answered = True
        headers = [
            ("Content-Type", answer.content_type),
            ("Content-Length", str(len(answer.body))),
            ("Connection", "close"),
            *answer.headers,
        ]
        response = h11.Response(
            status_code=answer.status, headers=headers, reason=HTTPStatus(answer.status).phrase
        )
        data = self._http.send(response)
        if self._request is None or self._request.method != b"HEAD":
            data += self._http.send(h11.Data(data=answer.body))
        data += self._http.send(h11.EndOfMessage())
        assert self._transport is not None
        self._transport.write(data)
        if self._eof:
            self._close()
        else:
            self._transport.write_eof()  # and wait for the client to close
        self._arm(self.abort)

    def _close(self) -> None:
        assert self._transport is not None
        self._transport.close()

    def _arm(self, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._server.request_timeout, callback)
