"""`UpstreamPool` and `UpstreamConnection` on a real event loop with fake connections.

The pool is given a stand-in for its loop (`FakeNetwork`): futures and timers
are the real loop's, ``create_connection`` is settled by the test (accepted,
refused or left hanging, as asyncio's own would be), and ``time()`` is a
clock the test moves, for idle times and what is left of a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import pytest

from sidecar.errors import (
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import FramedDecoder, Message, Transport, encode_frame
from sidecar.proxy.timeouts import Timeouts
from sidecar.proxy.upstream import (
    MAX_STRAY_REPLIES,
    ReplyHandler,
    UpstreamConnection,
    UpstreamPool,
)

T = TypeVar("T")

ADDRESS = "127.0.0.1:9"  # never dialled: connections are fake


class FakeTransport:
    """What `UpstreamConnection` uses of its transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        self._loop = loop
        self._protocol = protocol
        self.written = bytearray()
        self.closed = False
        self._lost = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        # As asyncio's: connection_lost follows on the next loop step.
        if not self.closed:
            self.closed = True
            self._loop.call_soon(self._lose)

    def is_closing(self) -> bool:
        return self.closed

    def peer_closes(self) -> None:
        """The upstream closed the connection (or reset it)."""
        self.closed = True
        self._lose()

    def _lose(self) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(None)


class Dial:
    """One ``create_connection`` call, settled by the test."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], host: str
    ) -> None:
        self._loop = loop
        self._factory = factory
        self.host = host
        self.future: asyncio.Future[tuple[FakeTransport, asyncio.Protocol]] = loop.create_future()
        self.transport: FakeTransport | None = None
        self.protocol: UpstreamConnection | None = None

    def begin(self) -> UpstreamConnection:
        """The TCP handshake is done and ``connection_made`` called; the caller not yet woken."""
        protocol = self._factory()
        assert isinstance(protocol, UpstreamConnection)
        self.protocol = protocol
        self.transport = FakeTransport(self._loop, protocol)
        protocol.connection_made(cast(asyncio.Transport, self.transport))
        return protocol

    def accept(self) -> UpstreamConnection:
        protocol = self.protocol or self.begin()
        assert self.transport is not None
        self.future.set_result((self.transport, protocol))
        return protocol

    def refuse(self) -> None:
        self.future.set_exception(ConnectionRefusedError(111, "Connection refused"))


class FakeNetwork:
    """The loop given to the pool: see the module docstring."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 1000.0
        self.dials: list[Dial] = []

    def time(self) -> float:
        return self.now

    def create_future(self) -> asyncio.Future[Any]:
        return self._loop.create_future()

    async def create_connection(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[FakeTransport, asyncio.Protocol]:
        dial = Dial(self._loop, factory, host)
        self.dials.append(dial)
        try:
            return await dial.future
        except BaseException:
            # As asyncio does when the caller gives up once the transport exists.
            if dial.transport is not None:
                dial.transport.close()
            raise


class Rig:
    def __init__(self, size: int, connect_timeout: float = 5.0) -> None:
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.net = FakeNetwork(loop)
        self.timeouts = Timeouts(loop)
        self.pool = UpstreamPool(
            ADDRESS,
            "127.0.0.1",
            9,
            Transport.FRAMED,
            size=size,
            connect_timeout=connect_timeout,
            max_message_size=1 << 20,
            timeouts=self.timeouts,
            loop=cast(asyncio.AbstractEventLoop, self.net),
        )

    def acquire(self, timeout: float = 5.0) -> asyncio.Task[UpstreamConnection]:
        return self.loop.create_task(self.pool.acquire(timeout))

    async def dial(self, n: int) -> Dial:
        """The ``n``-th connection attempt (from 1), once it is made."""
        await until(lambda: len(self.net.dials) >= n, f"connection attempt {n}")
        return self.net.dials[n - 1]

    async def waiting(self) -> asyncio.Task[UpstreamConnection]:
        """A call to ``acquire`` that has had the loop rounds to queue up (or dial)."""
        task = self.acquire()
        await steps()
        return task

    async def connection(self) -> UpstreamConnection:
        """A connection opened through the pool and now held by the test."""
        task = self.acquire()
        (await self.dial(len(self.net.dials) + 1)).accept()
        return await task


async def steps(n: int = 10) -> None:
    """Let the loop run ``n`` rounds of ready callbacks."""
    for _ in range(n):
        await asyncio.sleep(0)


async def until(condition: Callable[[], object], what: str, rounds: int = 200) -> None:
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{what}: not after {rounds} loop rounds")


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(scenario(), 10.0)

    return asyncio.run(bounded())


RigTest = Callable[[Rig], Coroutine[Any, Any, None]]


def on_rig(size: int, connect_timeout: float = 5.0) -> Callable[[RigTest], Callable[[], None]]:
    """The test: the decorated coroutine, given a fresh `Rig`, run to the end on a new loop."""

    def decorate(body: RigTest) -> Callable[[], None]:
        def test() -> None:
            run(lambda: body(Rig(size=size, connect_timeout=connect_timeout)))

        test.__name__ = test.__qualname__ = body.__name__
        test.__doc__ = body.__doc__
        return test

    return decorate


async def raises(awaitable: Awaitable[object], kind: type[BaseException]) -> BaseException:
    try:
        await awaitable
    except kind as exc:
        return exc
    raise AssertionError(f"{kind.__name__} not raised")


# taking and giving back


@on_rig(size=2)
async def test_acquire_opens_a_connection_while_below_size(rig: Rig) -> None:
    first = await rig.connection()
    second = await rig.connection()
    assert first is not second
    assert rig.net.dials[0].host == "127.0.0.1"
    assert rig.pool.open_connections == 2
    assert rig.pool.idle_connections == 0


@on_rig(size=3)
async def test_released_connections_are_reused_most_recent_first(rig: Rig) -> None:
    a, b = await rig.connection(), await rig.connection()
    rig.pool.release(a, True)
    rig.pool.release(b, True)
    assert rig.pool.idle_connections == 2
    assert rig.pool.idle() is b
    assert await rig.pool.acquire(1.0) is a
    assert rig.pool.idle() is None
    assert len(rig.net.dials) == 2


@on_rig(size=1)
async def test_release_of_a_connection_that_is_not_reusable_closes_it_and_frees_its_slot(
    rig: Rig,
) -> None:
    conn = await rig.connection()
    rig.pool.release(conn, False)
    assert conn.closed
    assert rig.net.dials[0].transport is not None
    assert rig.net.dials[0].transport.closed
    assert rig.pool.open_connections == 0
    assert rig.pool.idle() is None
    task = rig.acquire()
    (await rig.dial(2)).accept()
    assert (await task) is not conn


@on_rig(size=2)
async def test_an_idle_connection_the_upstream_closes_leaves_the_pool(rig: Rig) -> None:
    conn = await rig.connection()
    rig.pool.release(conn, True)
    assert rig.net.dials[0].transport is not None
    rig.net.dials[0].transport.peer_closes()
    assert conn.closed
    assert rig.pool.idle_connections == 0
    assert rig.pool.open_connections == 0
    assert rig.pool.idle() is None


# waiting for a busy pool


@on_rig(size=1)
async def test_acquire_waits_while_all_are_busy_and_release_hands_the_connection_over(
    rig: Rig,
) -> None:
    conn = await rig.connection()
    waiter = await rig.waiting()
    assert not waiter.done()
    rig.pool.release(conn, True)
    assert await waiter is conn
    assert rig.pool.idle_connections == 0  # handed over, never idle
    assert len(rig.net.dials) == 1


@on_rig(size=1)
async def test_waiters_are_served_first_come_first_served(rig: Rig) -> None:
    conn = await rig.connection()
    first = await rig.waiting()
    second = await rig.waiting()
    rig.pool.release(conn, True)
    assert await first is conn
    assert not second.done()
    rig.pool.release(conn, True)
    assert await second is conn


@on_rig(size=1)
async def test_a_waiter_that_times_out_gets_upstream_unavailable_and_leaves_the_queue(
    rig: Rig,
) -> None:
    conn = await rig.connection()
    started = rig.loop.time()
    error = await raises(rig.pool.acquire(0.05), UpstreamUnavailable)
    assert rig.loop.time() - started >= 0.05
    assert "all 1 connections to upstream 127.0.0.1:9 stayed busy for 0.05s" in str(error)
    assert isinstance(error, UpstreamError)
    assert error.sent is False
    rig.pool.release(conn, True)  # nobody waits any more
    assert rig.pool.idle_connections == 1


@on_rig(size=1)
async def test_a_waiter_cancelled_after_being_handed_a_connection_passes_it_to_the_next(
    rig: Rig,
) -> None:
    conn = await rig.connection()
    first = await rig.waiting()
    second = await rig.waiting()
    rig.pool.release(conn, True)  # handed to `first`...
    first.cancel()  # ...which gives up before it runs again
    await raises(first, asyncio.CancelledError)
    assert await second is conn
    assert rig.pool.open_connections == 1


@on_rig(size=1)
async def test_a_waiter_cancelled_after_being_handed_a_connection_leaves_it_idle(rig: Rig) -> None:
    conn = await rig.connection()
    waiter = await rig.waiting()
    rig.pool.release(conn, True)
    waiter.cancel()
    await raises(waiter, asyncio.CancelledError)
    assert rig.pool.idle_connections == 1
    assert rig.pool.idle() is conn


@on_rig(size=1)
async def test_a_closed_connection_hands_its_slot_to_the_first_waiter(rig: Rig) -> None:
    conn = await rig.connection()
    waiter = await rig.waiting()
    rig.pool.release(conn, False)  # closed: the waiter opens its own
    dial = await rig.dial(2)
    fresh = dial.accept()
    assert await waiter is fresh
    assert rig.pool.open_connections == 1


@on_rig(size=1)
async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_the_slot_on(rig: Rig) -> None:
    conn = await rig.connection()
    first = await rig.waiting()
    second = await rig.waiting()
    rig.pool.release(conn, False)  # the slot goes to `first`...
    first.cancel()  # ...which gives up before it runs again
    await raises(first, asyncio.CancelledError)
    fresh = (await rig.dial(2)).accept()
    assert await second is fresh
    assert len(rig.net.dials) == 2
    assert rig.pool.open_connections == 1


@on_rig(size=1, connect_timeout=5.0)
async def test_a_slot_handed_after_waiting_connects_within_what_is_left_of_the_timeout(
    rig: Rig,
) -> None:
    conn = await rig.connection()
    waiter = rig.pool.acquire(1.0)
    outcome = asyncio.ensure_future(raises(waiter, UpstreamUnavailable))
    await steps()
    rig.net.now += 0.75  # the waiter has waited 0.75 of its 1 s
    rig.pool.release(conn, False)
    await rig.dial(2)  # left hanging
    error = await outcome
    assert "no answer within 0.25s" in str(error)
    assert rig.pool.open_connections == 0


# connecting


@on_rig(size=1)
async def test_a_refused_connection_fails_the_caller_and_frees_the_slot_for_a_waiter(
    rig: Rig,
) -> None:
    refused = rig.acquire()
    waiting = rig.acquire()
    (await rig.dial(1)).refuse()
    error = await raises(refused, UpstreamUnavailable)
    assert "cannot connect to upstream 127.0.0.1:9: Connection refused" in str(error)
    fresh = (await rig.dial(2)).accept()
    assert await waiting is fresh
    assert rig.pool.open_connections == 1


@on_rig(size=1, connect_timeout=0.05)
async def test_a_connect_with_no_answer_gives_up_after_connect_timeout(rig: Rig) -> None:
    started = rig.loop.time()
    error = await raises(rig.pool.acquire(5.0), UpstreamUnavailable)
    assert rig.loop.time() - started >= 0.05
    assert "no answer within 0.05s" in str(error)
    assert rig.pool.open_connections == 0


@on_rig(size=1)
async def test_a_connection_closed_before_its_caller_runs_is_not_returned(rig: Rig) -> None:
    task = rig.acquire()
    dial = await rig.dial(1)
    dial.accept()
    assert dial.transport is not None
    dial.transport.peer_closes()
    error = await raises(task, UpstreamUnavailable)
    assert "closed the connection at once" in str(error)
    assert rig.pool.open_connections == 0


@on_rig(size=1)
async def test_a_caller_cancelled_while_its_connection_is_being_made_frees_the_slot_once(
    rig: Rig,
) -> None:
    task = rig.acquire()
    dial = await rig.dial(1)
    dial.begin()  # connection_made, the caller not woken yet
    task.cancel()  # the call was abandoned meanwhile
    await raises(task, asyncio.CancelledError)
    await steps()  # connection_lost of the closed transport
    assert rig.pool.open_connections == 0
    # The pool still holds at most `size` connections.
    first, second = rig.acquire(), rig.acquire()
    await rig.dial(2)
    await steps()
    assert len(rig.net.dials) == 2
    first.cancel()
    second.cancel()
    await asyncio.gather(first, second, return_exceptions=True)


@on_rig(size=1, connect_timeout=0.05)
async def test_a_connect_timing_out_after_connection_made_frees_the_slot_once(rig: Rig) -> None:
    task = rig.acquire()
    (await rig.dial(1)).begin()  # never completes
    await raises(task, UpstreamUnavailable)
    await steps()
    assert rig.pool.open_connections == 0


@on_rig(size=1)
async def test_a_slot_handed_to_a_waiter_is_not_also_taken_by_a_newcomer(rig: Rig) -> None:
    conn = await rig.connection()
    waiter = await rig.waiting()
    # A new call starts in the same loop round as the upstream closes
    # the busy connection: the freed slot is the waiter's.
    newcomer = rig.acquire()
    dial = rig.net.dials[0]
    assert dial.transport is not None
    dial.transport.peer_closes()
    await steps()
    assert conn.closed
    assert len(rig.net.dials) == 2, "a pool of size 1 opened two connections at once"
    assert rig.pool.open_connections <= 1
    waiter.cancel()
    newcomer.cancel()
    await asyncio.gather(waiter, newcomer, return_exceptions=True)


# closing


@on_rig(size=3)
async def test_close_idle_closes_only_connections_idle_for_longer_than_given(rig: Rig) -> None:
    a = await rig.connection()
    b = await rig.connection()
    c = await rig.connection()
    rig.pool.release(a, True)  # idle since 1000
    rig.net.now = 1010.0
    rig.pool.release(b, True)  # idle since 1010
    rig.net.now = 1015.0
    assert rig.pool.close_idle(5.0) == 1  # a: 15 s; b: exactly 5 s is not more
    assert a.closed
    assert not b.closed
    assert not c.closed  # busy
    assert rig.pool.idle() is b
    assert rig.pool.open_connections == 2
    assert rig.pool.close_idle(100.0) == 0


@on_rig(size=2)
async def test_close_closes_idle_connections_and_keeps_none_released_later(rig: Rig) -> None:
    idle = await rig.connection()
    busy = await rig.connection()
    rig.pool.release(idle, True)
    rig.pool.close()
    assert idle.closed
    assert rig.pool.idle_connections == 0
    assert not busy.closed  # a call in flight finishes
    rig.pool.release(busy, True)
    assert busy.closed
    assert rig.pool.idle() is None
    assert rig.pool.open_connections == 0


# one exchange


def call_message(name: str = "add") -> Message:
    messages = FramedDecoder(1 << 20).receive_data(
        encode_frame(encode_header(name, MessageType.CALL, 77) + b"\x00")
    )
    assert len(messages) == 1
    return messages[0]


def reply_bytes(seqid: int, mtype: MessageType = MessageType.REPLY) -> bytes:
    return encode_frame(encode_header("add", mtype, seqid) + b"\x00")


def sent_seqid(transport: FakeTransport) -> int:
    messages = FramedDecoder(1 << 20).receive_data(bytes(transport.written))
    assert len(messages) == 1
    return messages[0].header.seqid


class Handler(ReplyHandler):
    """A `ReplyHandler` that notes what it got and what the pool looked like then."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.replies: list[Message] = []
        self.errors: list[UpstreamError] = []
        self.idle_at_reply = -1
        self.done = asyncio.Event()

    def on_reply(self, reply: Message) -> None:
        self.idle_at_reply = self.pool.idle_connections
        self.replies.append(reply)
        self.done.set()

    def on_error(self, error: UpstreamError) -> None:
        self.errors.append(error)
        self.done.set()


async def exchange(rig: Rig, timeout: float = 5.0) -> tuple[UpstreamConnection, Handler, int]:
    conn = await rig.connection()
    handler = Handler(rig.pool)
    conn.send(call_message(), handler, rig.loop.time() + timeout, timeout)
    assert conn.transport is not None
    return conn, handler, sent_seqid(cast(FakeTransport, conn.transport))


def next_call(rig: Rig, conn: UpstreamConnection, timeout: float = 5.0) -> tuple[Handler, int]:
    """Send another call on ``conn``, which must be back in the pool: its handler and seqid."""
    assert rig.pool.idle() is conn
    transport = cast(FakeTransport, conn.transport)
    transport.written.clear()
    handler = Handler(rig.pool)
    conn.send(call_message(), handler, rig.loop.time() + timeout, timeout)
    return handler, sent_seqid(transport)


@on_rig(size=1)
async def test_a_reply_goes_to_the_handler_after_the_connection_is_back_in_the_pool(
    rig: Rig,
) -> None:
    conn, handler, seqid = await exchange(rig)
    assert seqid != 77  # the connection's own seqid
    conn.data_received(reply_bytes(seqid))
    assert len(handler.replies) == 1
    assert handler.replies[0].header.seqid == seqid
    assert handler.idle_at_reply == 1
    assert len(rig.timeouts) == 0
    # The next call on it gets a fresh seqid.
    _, next_seqid = next_call(rig, conn)
    assert next_seqid != seqid


@on_rig(size=1)
async def test_calls_one_after_another_on_a_connection_each_get_their_reply_and_timeout(
    rig: Rig,
) -> None:
    """The entry of a call answered is filed again for the next (`_Waiting`): the answered
    call hears nothing more, and the next one's own reply and timeout still reach it."""

    conn, first, seqid = await exchange(rig)
    conn.data_received(reply_bytes(seqid))
    second, second_seqid = next_call(rig, conn)
    conn.data_received(reply_bytes(second_seqid))
    third, _ = next_call(rig, conn, timeout=0.02)
    await asyncio.wait_for(third.done.wait(), 5.0)
    assert isinstance(third.errors[0], UpstreamTimeout)
    assert third.replies == []
    assert (len(first.replies), first.errors) == (1, [])
    assert (len(second.replies), second.errors) == (1, [])
    assert len(rig.timeouts) == 0


@on_rig(size=1)
async def test_a_reply_hands_the_connection_to_a_waiter(rig: Rig) -> None:
    conn, handler, seqid = await exchange(rig)
    waiter = await rig.waiting()
    conn.data_received(reply_bytes(seqid))
    assert await waiter is conn
    assert len(handler.replies) == 1


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (lambda seqid: reply_bytes(seqid, MessageType.CALL), "a CALL message as a reply"),
        (lambda seqid: b"\x00\x00\x00\x05\xff\xff\xff\xff\xff", "invalid bytes"),
    ],
)
def test_a_bad_reply_fails_the_call_and_closes_the_connection(
    reply: Callable[[int], bytes], problem: str
) -> None:
    async def scenario() -> None:
        rig = Rig(size=1)
        conn, handler, seqid = await exchange(rig)
        conn.data_received(reply(seqid))
        assert handler.replies == []
        assert len(handler.errors) == 1
        assert isinstance(handler.errors[0], UpstreamProtocolError)
        assert problem in str(handler.errors[0])
        assert handler.errors[0].sent is True
        assert conn.closed
        assert rig.pool.open_connections == 0
        assert len(rig.timeouts) == 0

    run(scenario)


@on_rig(size=1)
async def test_the_upstream_closing_mid_call_fails_it_as_closed(rig: Rig) -> None:
    conn, handler, _ = await exchange(rig)
    cast(FakeTransport, conn.transport).peer_closes()
    assert len(handler.errors) == 1
    assert isinstance(handler.errors[0], UpstreamClosed)
    assert handler.errors[0].sent is True
    assert rig.pool.open_connections == 0
    assert len(rig.timeouts) == 0


@on_rig(size=1)
async def test_a_reply_later_than_the_per_try_timeout_fails_the_call_and_the_connection(
    rig: Rig,
) -> None:
    conn, handler, seqid = await exchange(rig, timeout=0.02)
    await asyncio.wait_for(handler.done.wait(), 5.0)
    assert isinstance(handler.errors[0], UpstreamTimeout)
    assert "did not reply within 0.02s" in str(handler.errors[0])
    assert conn.closed
    assert rig.pool.open_connections == 0
    conn.data_received(reply_bytes(seqid))  # the late reply dies with the connection
    assert handler.replies == []


@on_rig(size=1)
async def test_abandon_forgets_the_call_and_closes(rig: Rig) -> None:
    conn, handler, _ = await exchange(rig)
    conn.abandon(handler)
    assert conn.closed
    assert len(rig.timeouts) == 0
    assert rig.pool.open_connections == 0
    await steps()  # connection_lost arrives
    assert handler.errors == []
    assert handler.replies == []


@on_rig(size=1)
async def test_a_reply_to_no_call_is_dropped_and_the_waiting_call_gets_its_own(rig: Rig) -> None:
    """A stray reply (to a message a client hid in its frame) is not the waiting call's fault."""
    strays: list[str] = []
    rig.pool._on_stray = strays.append
    conn, handler, seqid = await exchange(rig)
    conn.data_received(reply_bytes(seqid + 1000))  # answers nothing we sent
    assert handler.replies == []
    assert handler.errors == []
    assert not conn.closed  # the call is still waiting on it
    assert strays == [rig.pool.address]
    conn.data_received(reply_bytes(seqid))
    assert [r.header.seqid for r in handler.replies] == [seqid]
    assert conn.closed  # ended once its call was answered, never pooled again
    assert rig.pool.idle_connections == 0
    assert rig.pool.open_connections == 0


@on_rig(size=1)
async def test_a_reply_to_no_call_on_an_idle_connection_closes_it(rig: Rig) -> None:
    conn, handler, seqid = await exchange(rig)
    conn.data_received(reply_bytes(seqid))
    assert rig.pool.idle_connections == 1
    conn.data_received(reply_bytes(seqid + 1000))
    assert conn.closed
    assert rig.pool.open_connections == 0
    assert len(handler.replies) == 1


@on_rig(size=1)
async def test_too_many_replies_to_no_call_fail_the_connection(rig: Rig) -> None:
    conn, handler, seqid = await exchange(rig)
    for n in range(MAX_STRAY_REPLIES):
        conn.data_received(reply_bytes(seqid + 1000 + n))
    assert handler.errors == []
    conn.data_received(reply_bytes(seqid + 5000))
    [error] = handler.errors
    assert isinstance(error, UpstreamProtocolError)
    assert "a reply with seqid" in str(error)
    assert conn.closed
