"""`ClientConnection` on a real event loop, with fake transports and fake calls.

The connection is given a `FakeTransport` (what asyncio's socket transport
offers a protocol: write, close, abort, pause and resume reading) and its
server a fake call factory (`FakeCalls`): each message becomes a `FakeCall`
that the test answers when it likes, so no upstream is needed. Like asyncio,
``close`` and ``abort`` call ``connection_lost`` on the next loop step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import thriftpy2.thrift

from sidecar.metrics import SidecarMetrics
from sidecar.protocol import auto as auto_module
from sidecar.protocol.appexc import ApplicationExceptionType
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import FramedDecoder, Message, Transport, frame, make_decoder
from sidecar.proxy import client as client_module
from sidecar.proxy.call import Done, ProxiedCall, Wire
from sidecar.proxy.client import MAX_QUEUED_MESSAGES, ClientConnection
from sidecar.proxy.context import CallContext
from sidecar.proxy.server import CallFactory, Server, ServerSettings
from sidecar.proxy.timeouts import Timeouts
from sidecar.proxy.upstream import UpstreamConnection, UpstreamPool
from tests.support.raw import decode_reply, encode_call

MAX_FRAME = 1 << 20
PROTOCOL_ERROR = int(ApplicationExceptionType.PROTOCOL_ERROR)


def blank_context() -> CallContext:
    """A `CallContext` with nothing in it: fake calls only pass it around.

    A real instance, not a stand-in of another type: the compiled build
    checks the declared type where the server hands a context out.
    """
    return CallContext.__new__(CallContext)


CONTEXT = blank_context()


def sample(metrics: SidecarMetrics, name: str, **labels: str) -> float:
    """One sample of the registry (0 when absent)."""
    value = metrics.registry.get_sample_value("thrift_sidecar_" + name, labels)
    return 0.0 if value is None else value


class FakeTransport:
    """What `ClientConnection` uses of asyncio's socket transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int]) -> None:
        self._loop = loop
        self._peer = peer
        self.protocol: asyncio.Protocol | None = None
        self.writes: list[bytes] = []
        self.reading = True
        self.closed = False
        self.aborted = False
        self.lost = False
        self.unsent = 0  # what `get_write_buffer_size` says: written, not taken by the peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peer if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def write(self, data: Wire) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.call_soon(self._lose, None)

    def abort(self) -> None:
        self.aborted = True
        if not self.closed:
            self.closed = True
            self._loop.call_soon(self._lose, None)

    def reset_by_peer(self) -> None:
        """The client reset the connection: asyncio calls connection_lost with the error."""
        self.closed = True
        self._lose(ConnectionResetError(104, "Connection reset by peer"))

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connection_lost(exc)


class FakeCall(ProxiedCall):
    """One call made by the connection; the test finishes it with `answer`."""

    def __init__(
        self, ctx: CallContext, message: Message, client_transport: Transport, done: Done
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.message = message
        self.client_transport = client_transport
        self._done = done
        self.started = False
        self.cancelled = False
        self.answered = False
        # What chain_target offers (None: the next call waits, the usual case).
        self.offers: Any = None
        self.chained_after: Any = None
        self.unsent = False  # waiting for a connection, so nothing to offer yet
        self.on_sent: Any = None

    def chain_target(self) -> Any:
        return self.offers

    def waits_to_send(self) -> bool:
        return self.unsent

    def when_sent(self, callback: Any) -> None:
        self.on_sent = callback

    def sent(self, offers: Any) -> None:
        """The call went upstream on ``offers`` (a connection a next call may share)."""
        self.unsent = False
        self.offers = offers
        if self.on_sent is not None:
            callback, self.on_sent = self.on_sent, None
            callback()

    def chain_after(self, conn: Any) -> None:
        self.chained_after = conn

    @property
    def seqid(self) -> int:
        return self.message.header.seqid

    @property
    def oneway(self) -> bool:
        return self.message.header.type is MessageType.ONEWAY

    def start(self) -> None:
        self.started = True

    def cancel(self) -> None:
        self.cancelled = True

    def cut(self, reason: str) -> bytes | None:
        """As `Call.cut`: cancelled, and the error reply a client waiting for one gets."""
        self.cancel()
        return None if self.oneway else b"cut:" + reason.encode()

    def finish_without_reply(self) -> None:
        """Finish with nothing to write (a call learned to be oneway)."""
        assert self.started
        self.answered = True
        self._done(None)

    def answer(self) -> None:
        """Finish: the reply names the seqid (nothing for a oneway call)."""
        assert self.started
        assert not self.answered
        self.answered = True
        self._done(None if self.oneway else reply_for(self.seqid, self.client_transport))


def reply_for(seqid: int, transport: Transport) -> bytes:
    """The bytes a fake call answers with: a REPLY header carrying its seqid."""
    return frame(encode_header("fake", MessageType.REPLY, seqid, True) + b"\x00", transport)


class FakeCalls:
    """The server's call factory: records every call it makes."""

    def __init__(self) -> None:
        self.made: list[FakeCall] = []

    def __call__(
        self, ctx: CallContext, message: Message, client_transport: Transport, done: Done
    ) -> FakeCall:
        call = FakeCall(ctx, message, client_transport, done)
        self.made.append(call)
        return call

    def running(self) -> list[FakeCall]:
        return [c for c in self.made if c.started and not c.answered and not c.cancelled]


class Rig:
    """A `Server` (never listening) with fake calls, and helpers to connect to it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **settings: Any) -> None:
        self.loop = loop
        self.metrics = SidecarMetrics()
        self.calls = FakeCalls()
        values: dict[str, Any] = {
            "transport": "auto",
            "max_frame_size": MAX_FRAME,
            "max_depth": 64,
            "max_connections": 100,
            "idle_timeout": 60.0,
        }
        values.update(settings)
        self.server = Server(
            CONTEXT,
            ServerSettings(**values),
            self.metrics,
            loop,
            call_factory=cast(CallFactory, self.calls),
        )
        self._port = 40000

    def connect(self) -> tuple[ClientConnection, FakeTransport]:
        conn = ClientConnection(self.server)
        self._port += 1
        transport = FakeTransport(self.loop, ("127.0.0.1", self._port))
        transport.protocol = conn
        conn.connection_made(cast(asyncio.Transport, transport))
        return conn, transport

    def upstream_connection(self) -> UpstreamConnection:
        """An unconnected `UpstreamConnection`, for fake calls to offer and be chained to."""
        pool = UpstreamPool(
            "127.0.0.1:1",
            "127.0.0.1",
            1,
            Transport.FRAMED,
            size=1,
            connect_timeout=1.0,
            max_message_size=MAX_FRAME,
            timeouts=Timeouts(self.loop),
            loop=self.loop,
        )
        return UpstreamConnection(pool)

    def settle(self) -> None:
        """Run the callbacks due now (connection_lost after a close)."""
        for _ in range(3):
            self.loop.run_until_complete(asyncio.sleep(0))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def rig(loop: asyncio.AbstractEventLoop) -> Rig:
    return Rig(loop)


def call_bytes(seqid: int, transport: Transport = Transport.FRAMED, **kwargs: Any) -> bytes:
    """An ``add`` call (or ``kwargs["method"]``), framed or not, with this seqid."""
    method = kwargs.pop("method", "add")
    args = kwargs.pop("args", {"a": seqid, "b": 1} if method == "add" else None)
    return frame(encode_call(method, args, seqid=seqid, **kwargs), transport)


def replies(transport: FakeTransport) -> list[Message]:
    """What the connection wrote, as framed messages."""
    decoder = make_decoder(Transport.FRAMED, MAX_FRAME)
    return decoder.receive_data(b"".join(transport.writes))


def seqids(transport: FakeTransport) -> list[int]:
    return [m.header.seqid for m in replies(transport)]


# detection


def test_each_connection_detects_its_own_transport(rig: Rig) -> None:
    framed, framed_t = rig.connect()
    buffered, buffered_t = rig.connect()
    framed.data_received(call_bytes(1, Transport.FRAMED))
    buffered.data_received(call_bytes(2, Transport.BUFFERED))
    first, second = rig.calls.made
    assert (first.seqid, first.client_transport) == (1, Transport.FRAMED)
    assert (second.seqid, second.client_transport) == (2, Transport.BUFFERED)
    assert first.ctx is CONTEXT
    assert second.ctx is CONTEXT
    first.answer()
    second.answer()
    assert framed_t.writes == [reply_for(1, Transport.FRAMED)]
    assert buffered_t.writes == [reply_for(2, Transport.BUFFERED)]


def test_a_message_split_across_reads_is_one_call(rig: Rig) -> None:
    conn, transport = rig.connect()
    data = call_bytes(7)
    for i in range(len(data)):
        conn.data_received(data[i : i + 1])
    [call] = rig.calls.made
    assert call.seqid == 7
    assert call.started
    call.answer()
    assert seqids(transport) == [7]


# pipelining


def test_pipelined_calls_run_one_at_a_time_and_are_answered_in_order(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(b"".join(call_bytes(s) for s in (10, 11, 12)))
    assert [c.seqid for c in rig.calls.made] == [10], "the next call waits for the reply"
    assert conn.busy
    assert not conn.idle
    for expected in (10, 11, 12):
        [running] = rig.calls.running()
        assert running.seqid == expected
        running.answer()
    assert seqids(transport) == [10, 11, 12]
    assert conn.idle
    assert not transport.closed


def test_a_call_that_offers_its_connection_gets_the_next_one_behind_it(rig: Rig) -> None:
    """A CALL of a method never answered (maybe a oneway): the next call goes behind it."""
    conn, transport = rig.connect()
    first_bytes = call_bytes(20)
    conn.data_received(first_bytes)
    [first] = rig.calls.made
    first.offers = sentinel = rig.upstream_connection()
    conn.data_received(b"".join(call_bytes(s) for s in (21, 22)))
    assert [c.seqid for c in rig.calls.made] == [20, 21], "one call behind, never two"
    second = rig.calls.made[1]
    assert second.chained_after is sentinel
    # The second finishes first: its answer waits for the first's.
    second.answer()
    assert seqids(transport) == []
    first.answer()
    assert seqids(transport)[:2] == [20, 21]
    [third] = [c for c in rig.calls.made if c.seqid == 22]
    third.answer()
    assert seqids(transport) == [20, 21, 22]
    assert conn.idle


def test_a_oneway_proven_by_the_call_behind_it_writes_only_that_reply(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(call_bytes(30))
    [first] = rig.calls.made
    first.offers = rig.upstream_connection()
    conn.data_received(call_bytes(31))
    second = rig.calls.made[1]
    first.finish_without_reply()  # a later reply came first: it was oneway
    assert seqids(transport) == []
    second.answer()
    assert seqids(transport) == [31]
    assert conn.idle


def test_a_call_still_connecting_gets_the_next_one_behind_it_once_sent(rig: Rig) -> None:
    conn, _ = rig.connect()
    conn.data_received(call_bytes(50))
    [first] = rig.calls.made
    first.unsent = True
    conn.data_received(call_bytes(51))
    assert [c.seqid for c in rig.calls.made] == [50], "nothing to go behind yet"
    first.sent(sentinel := rig.upstream_connection())
    assert [c.seqid for c in rig.calls.made] == [50, 51]
    assert rig.calls.made[1].chained_after is sentinel


def test_a_call_that_offers_nothing_keeps_the_next_one_waiting(rig: Rig) -> None:
    conn, _ = rig.connect()
    conn.data_received(b"".join(call_bytes(s) for s in (40, 41)))
    assert [c.seqid for c in rig.calls.made] == [40]


def test_a_call_answered_during_start_lets_the_next_one_start(rig: Rig) -> None:
    class Instant(FakeCall):
        def start(self) -> None:
            super().start()
            self.answer()

    made: list[FakeCall] = []

    def factory(ctx: CallContext, message: Message, kind: Transport, done: Done) -> FakeCall:
        made.append(Instant(ctx, message, kind, done))
        return made[-1]

    rig.server.call_factory = factory  # type: ignore[assignment]
    conn, transport = rig.connect()
    conn.data_received(b"".join(call_bytes(s) for s in range(1, 6)))
    assert seqids(transport) == [1, 2, 3, 4, 5]
    assert conn.idle


# flow control


def test_reading_pauses_above_max_queued_messages_and_resumes_at_half(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(call_bytes(0))  # in flight: not counted as waiting
    conn.data_received(b"".join(call_bytes(s) for s in range(1, MAX_QUEUED_MESSAGES + 1)))
    assert transport.reading, "at the limit, not above it"
    assert len(rig.calls.made) == 1
    conn.data_received(call_bytes(1000))  # one more than the limit waits
    assert not transport.reading
    queued = MAX_QUEUED_MESSAGES + 1
    while queued > MAX_QUEUED_MESSAGES // 2 + 1:
        rig.calls.running()[0].answer()
        queued -= 1
        assert not transport.reading, f"resumed early, with {queued} queued"
    rig.calls.running()[0].answer()  # now half the limit wait
    assert transport.reading
    while rig.calls.running():
        rig.calls.running()[0].answer()
    assert len(replies(transport)) == MAX_QUEUED_MESSAGES + 2


def test_reading_pauses_above_max_queued_bytes_and_resumes_at_half(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def big(seqid: int) -> bytes:
        return call_bytes(seqid, method="echoBinary", args={"data": b"x" * 990})

    size = len(big(0))
    monkeypatch.setattr(client_module, "MAX_QUEUED_BYTES", 4 * size)
    conn, transport = rig.connect()
    conn.data_received(big(0))  # in flight: not counted as waiting
    conn.data_received(b"".join(big(s) for s in (1, 2, 3, 4)))
    assert transport.reading, "4 messages' bytes waiting: at the limit, not above it"
    conn.data_received(big(5))
    assert not transport.reading
    rig.calls.running()[0].answer()  # 4 wait
    rig.calls.running()[0].answer()  # 3 wait
    assert not transport.reading
    rig.calls.running()[0].answer()  # 2 wait: half the bytes
    assert transport.reading
    while rig.calls.running():
        rig.calls.running()[0].answer()
    assert seqids(transport) == [0, 1, 2, 3, 4, 5]


def test_no_next_call_starts_while_the_client_cannot_take_replies(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(call_bytes(1) + call_bytes(2))
    conn.pause_writing()
    rig.calls.running()[0].answer()
    assert [c.seqid for c in rig.calls.made] == [1], "call 2 must wait for resume_writing"
    assert not conn.idle
    conn.resume_writing()
    assert [c.seqid for c in rig.calls.made] == [1, 2]
    rig.calls.running()[0].answer()
    assert seqids(transport) == [1, 2]


# protocol errors


def test_a_protocol_error_after_good_calls_answers_them_then_protocol_error_then_closes(
    rig: Rig,
) -> None:
    conn, transport = rig.connect()
    oversized = (2 * MAX_FRAME).to_bytes(4, "big") + encode_header(
        "getItem", MessageType.CALL, 901, True
    )
    conn.data_received(call_bytes(1) + call_bytes(2) + oversized)
    rig.calls.running()[0].answer()
    assert not transport.closed
    rig.calls.running()[0].answer()
    first, second, error = replies(transport)
    assert [first.header.seqid, second.header.seqid] == [1, 2]
    assert error.header.seqid == 901
    with pytest.raises(thriftpy2.thrift.TApplicationException) as raised:
        decode_reply("getItem", bytes(error.payload()))
    assert raised.value.type == PROTOCOL_ERROR
    assert transport.closed
    assert not transport.aborted
    assert sample(rig.metrics, "protocol_errors_total", kind="oversized") == 1
    rig.settle()
    assert conn not in rig.server.connections


def test_reading_stays_paused_after_a_protocol_error(rig: Rig) -> None:
    """Nothing after the bad bytes is read while the calls before them finish."""
    conn, transport = rig.connect()
    conn.data_received(call_bytes(1) + call_bytes(2) + b"\x00\x00\x00\x00garbage")
    assert [c.seqid for c in rig.calls.made] == [1]
    assert not transport.reading, "call 1 started: reading must not resume after the error"
    rig.calls.running()[0].answer()
    assert not transport.reading


def test_http_on_the_thrift_port_gets_a_400_that_points_to_the_admin_port(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(b"GET /metrics HTTP/1.1\r\nHost: sidecar\r\n\r\n")
    assert rig.calls.made == []
    [answer] = transport.writes
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"admin port" in answer
    assert transport.closed
    assert sample(rig.metrics, "protocol_errors_total", kind="http") == 1


def test_a_protocol_error_on_one_connection_leaves_the_others_alone(rig: Rig) -> None:
    good, good_t = rig.connect()
    bad, bad_t = rig.connect()
    good.data_received(call_bytes(1))
    bad.data_received(b"\xde\xad\xbe\xef" * 16)
    rig.settle()
    assert bad_t.closed
    assert not good_t.closed
    rig.calls.running()[0].answer()
    good.data_received(call_bytes(2))
    rig.calls.running()[0].answer()
    assert seqids(good_t) == [1, 2]
    assert rig.server.connections == {good}


# the client goes away


def test_eof_with_calls_queued_answers_them_all_then_closes(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(b"".join(call_bytes(s) for s in (1, 2, 3)))
    assert conn.eof_received() is True, "our side stays open for the replies"
    for _ in range(3):
        assert not transport.closed
        rig.calls.running()[0].answer()
    assert seqids(transport) == [1, 2, 3]
    assert transport.closed
    assert not transport.aborted
    rig.settle()
    assert not rig.server.connections
    assert not rig.server.finishing


def test_a_truncated_message_at_eof_gets_protocol_error_after_the_good_ones(rig: Rig) -> None:
    conn, transport = rig.connect()
    truncated = call_bytes(9)[:-3]
    conn.data_received(call_bytes(8) + truncated)
    conn.eof_received()
    rig.calls.running()[0].answer()
    good, error = replies(transport)
    assert (good.header.seqid, error.header.seqid) == (8, 9)
    assert sample(rig.metrics, "protocol_errors_total", kind="truncated") == 1
    assert transport.closed


def test_a_reset_with_calls_queued_still_runs_them_and_the_server_waits_for_them(
    rig: Rig,
) -> None:
    conn, transport = rig.connect()
    notify = call_bytes(2, method="notify", args={"tag": "after-reset"})
    conn.data_received(call_bytes(1) + notify)
    transport.reset_by_peer()
    assert conn not in rig.server.connections
    assert rig.server.finishing == {conn}
    assert rig.server.calls_in_flight()
    rig.calls.running()[0].answer()  # its reply has nowhere to go
    oneway = rig.calls.made[1]
    assert oneway.oneway
    assert oneway.started, "the oneway call is still delivered"
    assert rig.server.finishing == {conn}
    oneway.answer()
    assert not rig.server.finishing
    assert not rig.server.calls_in_flight()
    assert transport.writes == []


def test_a_reset_of_an_idle_connection_leaves_nothing_behind(rig: Rig) -> None:
    conn, transport = rig.connect()
    conn.data_received(call_bytes(1))
    rig.calls.running()[0].answer()
    transport.reset_by_peer()
    assert not rig.server.connections
    assert not rig.server.finishing


# bugs at the connection boundary


class Boom(RuntimeError):
    """A bug in the sidecar."""


def _raising(*args: object, **kwargs: object) -> Any:
    raise Boom("a bug in the sidecar")


def _break_next_call(rig: Rig) -> None:
    """The call factory raises from now on (a bug where the next call is made)."""

    def broken(ctx: CallContext, message: Message, kind: Transport, done: Done) -> FakeCall:
        raise Boom("a bug in the sidecar")

    rig.server.call_factory = broken  # type: ignore[assignment]


Bug = Callable[[Rig, ClientConnection, FakeTransport, pytest.MonkeyPatch], None]


def _bug_in_data_received(
    rig: Rig, conn: ClientConnection, t: FakeTransport, mp: pytest.MonkeyPatch
) -> None:
    _break_next_call(rig)
    conn.data_received(call_bytes(1))


def _bug_in_answer(
    rig: Rig, conn: ClientConnection, t: FakeTransport, mp: pytest.MonkeyPatch
) -> None:
    conn.data_received(call_bytes(1) + call_bytes(2))
    _break_next_call(rig)
    rig.calls.made[-1].answer()  # `_answer` pumps: making call 2 raises


def _bug_in_resume_writing(
    rig: Rig, conn: ClientConnection, t: FakeTransport, mp: pytest.MonkeyPatch
) -> None:
    conn.data_received(call_bytes(1) + call_bytes(2))
    conn.pause_writing()
    rig.calls.made[-1].answer()
    _break_next_call(rig)
    conn.resume_writing()


def _bug_in_eof_received(
    rig: Rig, conn: ClientConnection, t: FakeTransport, mp: pytest.MonkeyPatch
) -> None:
    conn.data_received(call_bytes(1) + call_bytes(2)[:5])  # detected as framed
    real = FramedDecoder.receive_data

    def at_eof(self: FramedDecoder, data: bytes) -> list[Message]:
        if not data:
            raise Boom("a bug in the sidecar")
        return real(self, data)

    mp.setattr(FramedDecoder, "receive_data", at_eof)
    conn.eof_received()


def _bug_in_connection_lost(
    rig: Rig, conn: ClientConnection, t: FakeTransport, mp: pytest.MonkeyPatch
) -> None:
    conn.data_received(call_bytes(1) + call_bytes(2))
    conn.pause_writing()
    rig.calls.made[-1].answer()  # call 2 waits for the client to take replies
    _break_next_call(rig)
    t.reset_by_peer()  # what was accepted still runs: making call 2 raises


BUGS: dict[str, Bug] = {
    "data_received": _bug_in_data_received,
    "_answer": _bug_in_answer,
    "resume_writing": _bug_in_resume_writing,
    "eof_received": _bug_in_eof_received,
    "connection_lost": _bug_in_connection_lost,
}


@pytest.mark.parametrize(
    "where",
    [
        pytest.param(
            name,
            marks=[pytest.mark.pure_python("replaces a decoder method compiled callers bind")]
            if name == "eof_received"
            else [],
        )
        for name in BUGS
    ],
)
def test_a_bug_in_a_connection_callback_closes_that_connection_only(
    rig: Rig, where: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bystander, bystander_t = rig.connect()
    bystander.data_received(call_bytes(50))
    held = rig.calls.running()[0]
    victim, victim_t = rig.connect()
    factory = rig.server.call_factory

    BUGS[where](rig, victim, victim_t, monkeypatch)

    assert victim_t.aborted, "the connection with the bug is closed at once"
    assert sample(rig.metrics, "protocol_errors_total", kind="internal") == 1
    assert "unexpected error serving client" in caplog.text
    rig.settle()
    assert victim not in rig.server.connections
    assert victim not in rig.server.finishing, "nothing left for a drain to wait for"
    # The other connection's call in flight, and its next one, are answered.
    rig.server.call_factory = factory
    held.answer()
    bystander.data_received(call_bytes(51))
    rig.calls.running()[0].answer()
    assert seqids(bystander_t) == [50, 51]
    assert not bystander_t.closed
    assert rig.server.connections == {bystander}


@pytest.mark.pure_python("replaces a module function compiled callers bind")
def test_a_bug_while_detecting_the_transport_closes_that_connection_only(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    detected, detected_t = rig.connect()
    detected.data_received(call_bytes(1))
    monkeypatch.setattr(auto_module, "detect", _raising)
    victim, victim_t = rig.connect()
    victim.data_received(call_bytes(2))
    assert victim_t.aborted
    assert sample(rig.metrics, "protocol_errors_total", kind="internal") == 1
    rig.calls.running()[0].answer()
    detected.data_received(call_bytes(3))
    rig.calls.running()[0].answer()
    assert seqids(detected_t) == [1, 3]


def test_framed_decoder_is_used_when_the_transport_is_forced(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop, transport="framed")
    conn, transport = rig.connect()
    conn.data_received(call_bytes(4, Transport.BUFFERED))
    assert rig.calls.made == [], "a forced transport is not detected"
    assert transport.closed
    conn, transport = rig.connect()
    conn.data_received(call_bytes(4))
    [call] = rig.calls.made
    assert call.client_transport is Transport.FRAMED
