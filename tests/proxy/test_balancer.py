"""`UpstreamSet`: round robin, retries elsewhere, ejected addresses left out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import cast

import pytest

from sidecar.protocol.envelope import Protocol
from sidecar.protocol.framing import Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.timeouts import Timeouts
from sidecar.proxy.upstream import UpstreamPool
from sidecar.resilience.ejection import EjectionTracker

A, B, C = "10.0.0.1:9090", "10.0.0.2:9090", "10.0.0.3:9090"
FRAMED, BUFFERED = Transport.FRAMED, Transport.BUFFERED


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """An `UpstreamSet` with real (never connected) pools, a tracker and a clock."""

    def __init__(
        self, addresses: list[str], consecutive_failures: int = 2, max_percent: int = 100
    ) -> None:
        # Pools only keep the loop; nothing here runs it.
        self.loop = asyncio.new_event_loop()
        self.timeouts = Timeouts(self.loop)
        self.clock = Clock()
        self.made: list[tuple[str, Transport]] = []
        self.tracker = EjectionTracker(
            addresses,
            consecutive_failures=consecutive_failures,
            base_time=10.0,
            max_time=60.0,
            max_percent=max_percent,
        )
        self.upstreams = UpstreamSet(addresses, self.make_pool, self.tracker, self.clock)

    def make_pool(self, address: str, transport: Transport, protocol: Protocol) -> UpstreamPool:
        self.made.append((address, transport))
        host, _, port = address.rpartition(":")
        return UpstreamPool(
            address,
            host,
            int(port),
            transport,
            size=2,
            connect_timeout=1.0,
            max_message_size=1 << 20,
            timeouts=self.timeouts,
            loop=self.loop,
            protocol=protocol,
        )

    def picks(self, n: int, tried: list[str] | None = None) -> list[str]:
        return [self.upstreams.pick(FRAMED, tried or ()).address for _ in range(n)]

    def eject(self, address: str) -> None:
        for _ in range(2):
            self.upstreams.record(address, True)
        assert address in self.upstreams.ejected()


Build = Callable[..., Rig]


@pytest.fixture
def rig() -> Iterator[Build]:
    made: list[Rig] = []

    def build(addresses: list[str], **kwargs: int) -> Rig:
        made.append(Rig(addresses, **kwargs))
        return made[-1]

    yield build
    for r in made:
        r.loop.close()


def test_picks_go_round_robin(rig: Build) -> None:
    r = rig([A, B, C])
    assert r.picks(7) == [A, B, C, A, B, C, A]


def test_one_pool_per_address_and_transport_made_on_first_use(rig: Build) -> None:
    r = rig([A, B])
    first = r.upstreams.pool(A, FRAMED)
    assert r.upstreams.pool(A, FRAMED) is first
    other = r.upstreams.pool(A, BUFFERED)
    assert other is not first
    assert other.transport_kind is BUFFERED
    r.picks(4)
    assert sorted(r.made) == sorted([(A, FRAMED), (A, BUFFERED), (B, FRAMED)])
    assert {p.address for p in r.upstreams.pools()} == {A, B}
    assert len(r.upstreams.pools()) == 3


def test_a_retry_avoids_the_addresses_already_tried(rig: Build) -> None:
    r = rig([A, B, C])
    assert r.picks(1) == [A]
    # B's turn, but B was tried: the next untried address instead.
    assert r.upstreams.pick(FRAMED, [B]).address == C
    # A and C tried: B, whoever's turn it is.
    assert r.upstreams.pick(FRAMED, [A, C]).address == B


def test_when_every_address_was_tried_the_first_in_rotation_is_picked_again(
    rig: Build,
) -> None:
    r = rig([A, B, C])
    assert r.upstreams.pick(FRAMED, [A, B, C]).address == A
    assert r.upstreams.pick(FRAMED, [C, A, B]).address == B


def test_a_lone_address_gives_the_pool_of_the_transport_and_protocol_asked(rig: Build) -> None:
    """Whatever the pick before asked for (`pick` keeps the last pool of a lone address)."""
    r = rig([A])
    asks = [
        (FRAMED, Protocol.BINARY),
        (FRAMED, Protocol.COMPACT),
        (BUFFERED, Protocol.COMPACT),
        (BUFFERED, Protocol.BINARY),
        (FRAMED, Protocol.BINARY),
        (FRAMED, Protocol.BINARY),
        (BUFFERED, Protocol.BINARY),
    ]
    for transport, protocol in asks:
        picked = r.upstreams.pick(transport, protocol=protocol)
        assert picked is r.upstreams.pool(A, transport, protocol)
        assert (picked.address, picked.transport_kind, picked.protocol) == (A, transport, protocol)
    assert len(r.upstreams.pools()) == 4


def test_ejected_addresses_are_skipped_until_their_time_is_up(rig: Build) -> None:
    r = rig([A, B, C])
    r.eject(B)
    picks = r.picks(6)
    assert B not in picks
    assert set(picks) == {A, C}
    r.clock.now += 10.0  # the first ejection lasts base_time
    assert r.upstreams.ejected() == []
    picks = r.picks(3)
    assert sorted(picks) == [A, B, C]


def test_calls_are_spread_evenly_over_the_addresses_left_in_rotation(rig: Build) -> None:
    r = rig([A, B, C])
    r.eject(B)
    picks = r.picks(60)
    assert picks.count(A) == picks.count(C) == 30


def test_a_retry_prefers_an_untried_address_to_an_ejected_one(rig: Build) -> None:
    r = rig([A, B, C])
    r.eject(C)
    for _ in range(6):
        assert r.upstreams.pick(FRAMED, [A]).address == B


def test_second_choice_is_a_tried_address_in_rotation_never_an_ejected_one(
    rig: Build,
) -> None:
    r = rig([A, B, C])
    r.eject(C)
    # A and B tried, C out: a tried address in rotation, the first in order from the turn.
    assert r.picks(1, tried=[A, B]) == [A]  # A's turn
    assert r.picks(1, tried=[A, B]) == [B]  # B's turn
    assert r.picks(1, tried=[A, B]) == [A]  # C's turn, C is out: A comes next


def test_with_all_but_one_address_out_every_pick_goes_to_the_one_left(rig: Build) -> None:
    r = rig([A, B, C])
    r.eject(A)
    r.eject(B)
    assert r.upstreams.ejected() == [A, B]
    assert r.picks(3) == [C, C, C]
    assert r.picks(3, tried=[C]) == [C, C, C]


def test_record_returns_the_ejection_time_and_counts_toward_it(rig: Build) -> None:
    r = rig([A, B], consecutive_failures=3)
    assert r.upstreams.record(A, True) is None
    assert r.upstreams.record(A, True) is None
    assert r.upstreams.record(A, True) == 10.0
    assert r.upstreams.ejected() == [A]
    # A success clears the count of another address.
    assert r.upstreams.record(B, True) is None
    assert r.upstreams.record(B, False) is None
    assert r.upstreams.record(B, True) is None
    assert r.upstreams.record(B, True) is None
    assert r.upstreams.ejected() == [A]


def test_a_lone_address_is_never_ejected(rig: Build) -> None:
    r = rig([A], consecutive_failures=1)
    for _ in range(5):
        assert r.upstreams.record(A, True) is None
    assert r.upstreams.ejected() == []
    assert r.picks(3, tried=[A]) == [A, A, A]


class ClosablePool:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


@pytest.mark.pure_python("its pools are stand-ins; the compiled UpstreamSet takes real ones only")
def test_close_closes_every_pool_once() -> None:
    made: list[ClosablePool] = []

    def make_pool(address: str, transport: Transport, protocol: Protocol) -> UpstreamPool:
        made.append(ClosablePool(address))
        return cast(UpstreamPool, made[-1])

    tracker = EjectionTracker(
        [A, B], consecutive_failures=1, base_time=1.0, max_time=1.0, max_percent=50
    )
    upstreams = UpstreamSet([A, B], make_pool, tracker, Clock())
    upstreams.pool(A, FRAMED)
    upstreams.pool(A, BUFFERED)
    upstreams.pool(B, FRAMED)
    upstreams.close()
    assert [p.closed for p in made] == [1, 1, 1]


def test_a_hedge_avoids_the_address_tried_and_leaves_the_rotation_alone(rig: Build) -> None:
    r = rig([A, B, C])
    assert r.picks(1) == [A]
    assert r.upstreams.pick(FRAMED, [A], rotate=False).address == B
    assert r.upstreams.pick(FRAMED, [A, B], rotate=False).address == C
    assert r.picks(3) == [B, C, A]  # as if no hedge had been picked
