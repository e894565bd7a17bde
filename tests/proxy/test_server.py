"""`Server`'s books: admission, idle sweep, drain, and the context new calls get.

Connections are `ClientConnection`s on fake transports with fake calls (see
`tests.proxy.test_client`); the server runs on a real event loop, and for
idle times on a `ClockedLoop`, the real loop with a clock the test moves.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any, cast

import pytest

from tests.proxy.test_client import Rig, blank_context, call_bytes, sample, seqids


class ClockedLoop:
    """The real loop, but ``time()`` is a clock the test moves."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# admission


def test_connections_beyond_max_connections_are_refused_and_counted(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop, max_connections=2)
    first, first_t = rig.connect()
    second, _ = rig.connect()
    _third, third_t = rig.connect()
    assert third_t.aborted
    assert not first_t.closed
    assert rig.server.connections == {first, second}
    assert sample(rig.metrics, "client_connections") == 2
    assert sample(rig.metrics, "client_connections_rejected_total", reason="max_connections") == 1
    rig.settle()
    assert rig.server.connections == {first, second}, "a refused connection never enters the books"

    first_t.close()  # a client leaves: room for one more
    rig.settle()
    fourth, fourth_t = rig.connect()
    assert not fourth_t.closed
    assert rig.server.connections == {second, fourth}
    assert sample(rig.metrics, "client_connections") == 2


def test_a_lowered_max_connections_applies_to_new_connections_only(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop, max_connections=3)
    kept = [rig.connect() for _ in range(3)]
    rig.server.settings = dataclasses.replace(rig.server.settings, max_connections=1)
    _, refused = rig.connect()
    assert refused.aborted
    assert all(not t.closed for _, t in kept)


# sweep


def test_sweep_closes_only_connections_idle_longer_than_idle_timeout(
    loop: asyncio.AbstractEventLoop,
) -> None:
    clocked = ClockedLoop(loop)
    rig = Rig(cast(asyncio.AbstractEventLoop, clocked), idle_timeout=60.0)
    rig.loop = loop  # the fake transports schedule on the real loop
    _stale, stale_t = rig.connect()
    busy, busy_t = rig.connect()
    busy.data_received(call_bytes(1))  # in flight from t=1000 on
    waiting, waiting_t = rig.connect()
    waiting.pause_writing()
    waiting.data_received(call_bytes(2))  # queued, not started: the client takes no replies
    clocked.now += 50
    recent, recent_t = rig.connect()
    recent.data_received(call_bytes(3))
    rig.calls.made[-1].answer()  # active at t=1050

    clocked.now += 11  # t=1061: 61 s since the first three were active
    assert rig.server.sweep() == 1
    assert stale_t.closed
    assert not busy_t.closed
    assert not waiting_t.closed
    assert not recent_t.closed
    assert sample(rig.metrics, "client_idle_closes_total") == 1

    rig.settle()
    assert rig.server.connections == {busy, waiting, recent}
    assert rig.server.sweep() == 0


# drain


def test_drain_closes_idle_connections_at_once_and_waits_for_busy_and_finishing_ones(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop)
    server = rig.server
    _idle, idle_t = rig.connect()
    busy, busy_t = rig.connect()
    busy.data_received(call_bytes(1) + call_bytes(2))  # one in flight, one queued
    gone, gone_t = rig.connect()
    gone.data_received(call_bytes(3))
    gone_t.reset_by_peer()  # the client went away; its call still runs
    assert server.finishing == {gone}

    drain = loop.create_task(server.drain(10.0))
    rig.settle()
    assert idle_t.closed
    assert not idle_t.aborted
    assert not busy_t.closed
    assert not drain.done()
    _, late_t = rig.connect()
    assert late_t.aborted, "no new connection while draining"

    by_seqid = {c.seqid: c for c in rig.calls.made}
    by_seqid[1].answer()  # the queued call 2 still runs
    rig.settle()
    assert not busy_t.closed
    assert not drain.done()
    rig.calls.made[-1].answer()
    rig.settle()
    assert seqids(busy_t) == [1, 2]
    assert busy_t.closed
    assert not busy_t.aborted
    assert not drain.done(), "the call of the connection reset by its client still runs"

    by_seqid[3].answer()
    loop.run_until_complete(asyncio.wait_for(drain, 5.0))
    assert drain.result() is True
    assert not server.connections
    assert not server.finishing
    assert not any(c.cancelled for c in rig.calls.made)


def test_drain_of_nothing_returns_clean_at_once(loop: asyncio.AbstractEventLoop) -> None:
    rig = Rig(loop)
    _idle, idle_t = rig.connect()
    started = loop.time()
    assert loop.run_until_complete(rig.server.drain(10.0)) is True
    assert loop.time() - started < 5.0
    assert idle_t.closed
    assert not idle_t.aborted


def test_drain_past_its_timeout_cuts_what_is_left_and_says_so(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop)
    busy, busy_t = rig.connect()
    busy.data_received(call_bytes(1) + call_bytes(2))
    gone, gone_t = rig.connect()
    gone.data_received(call_bytes(3))
    gone_t.reset_by_peer()

    assert loop.run_until_complete(rig.server.drain(0.05)) is False
    in_flight = [c for c in rig.calls.made if c.seqid in (1, 3)]
    assert all(c.cancelled for c in in_flight)
    assert [c.seqid for c in rig.calls.made] == [1, 3], "the queued call is dropped"
    # The client still connected is told why, then its connection is closed.
    assert busy_t.closed
    assert busy_t.writes[-1].startswith(b"cut:sidecar: shutting down")
    assert b"drain_timeout (0.05s)" in busy_t.writes[-1]
    assert not rig.server.finishing
    assert not rig.server.calls_in_flight()


def test_calls_in_flight_counts_connections_closed_by_their_client(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop)
    conn, transport = rig.connect()
    assert not rig.server.calls_in_flight()
    conn.data_received(call_bytes(1))
    assert rig.server.calls_in_flight()
    transport.reset_by_peer()
    assert rig.server.calls_in_flight()
    rig.calls.made[0].answer()
    assert not rig.server.calls_in_flight()


# the context


def test_use_context_applies_to_calls_started_afterwards_only(
    loop: asyncio.AbstractEventLoop,
) -> None:
    rig = Rig(loop)
    old = rig.server.context
    new = blank_context()
    conn, _transport = rig.connect()
    conn.data_received(call_bytes(1) + call_bytes(2))  # 1 starts now, 2 waits
    rig.server.use_context(new)
    first = rig.calls.made[0]
    assert first.ctx is old
    first.answer()
    second = rig.calls.made[1]
    assert second.ctx is new, "a call queued before the reload starts after it"
    other, _ = rig.connect()
    other.data_received(call_bytes(3))
    assert rig.calls.made[2].ctx is new
    assert first.ctx is old, "the call already started kept its context"
