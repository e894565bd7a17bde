"""Several addresses of one upstream: spread calls, retry elsewhere, leave out the sick.

Round robin over the addresses in rotation; a retry goes to an address the
call has not tried yet where there is one. Which addresses are in rotation is
decided by `EjectionTracker` (passive ejection) and, when they are on, by
health checks (`sidecar.proxy.health`, through `take_out` and `readmit`).

Each address has one pool per upstream transport and protocol in use: with
``upstream.transport: same`` a framed client's calls go over framed
connections and a buffered client's over buffered ones (likewise for the
protocol with ``upstream.protocol: same``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sidecar.protocol.envelope import Protocol
from sidecar.protocol.framing import Transport
from sidecar.proxy.upstream import UpstreamPool
from sidecar.resilience.ejection import EjectionTracker

PoolFactory = Callable[[str, Transport, Protocol], UpstreamPool]


class UpstreamSet:
    """The pools of all addresses of one upstream."""

    def __init__(
        self,
        addresses: Sequence[str],
        make_pool: PoolFactory,
        tracker: EjectionTracker,
        clock: Callable[[], float],
    ) -> None:
        self.addresses = list(addresses)
        self.tracker = tracker
        self._make_pool = make_pool
        self._clock = clock
        self._pools: dict[tuple[str, Transport, Protocol], UpstreamPool] = {}
        # The pool `pick` returned last, with one address: the next call mostly wants
        # it again, found by two identity checks instead of a tuple key's lookup.
        self._last: UpstreamPool | None = None
        self._next = 0

    def pool(
        self, address: str, transport: Transport, protocol: Protocol = Protocol.BINARY
    ) -> UpstreamPool:
        """The pool for one address and transport, made on first use."""
        key = (address, transport, protocol)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = self._make_pool(address, transport, protocol)
        return pool

    def pools(self) -> list[UpstreamPool]:
        """Every pool made so far."""
        return list(self._pools.values())

    def pick(
        self,
        transport: Transport,
        tried: Sequence[str] = (),
        protocol: Protocol = Protocol.BINARY,
        rotate: bool = True,
    ) -> UpstreamPool:
        """The pool for the next attempt: in rotation, and not tried yet where possible.

        ``rotate=False`` (a hedge) leaves the rotation where it was: otherwise
        each hedge away from a slow address would send the next call back to it.
        """
        addresses = self.addresses
        n = len(addresses)
        if n == 1:
            last = self._last
            if last is not None and last.transport_kind is transport and last.protocol is protocol:
                return last
            self._last = pool = self.pool(addresses[0], transport, protocol)
            return pool
        start = self._next
        now = self._clock()
        second_choice: int | None = None
        for i in range(n):
            index = (start + i) % n
            address = addresses[index]
            if not self.tracker.available(address, now):
                continue
            if address not in tried:
                return self._picked(index, transport, protocol, rotate)
            if second_choice is None:
                second_choice = index
        chosen = start if second_choice is None else second_choice
        return self._picked(chosen, transport, protocol, rotate)

    def _picked(
        self, index: int, transport: Transport, protocol: Protocol, rotate: bool = True
    ) -> UpstreamPool:
        """The pool of address ``index``; the rotation goes on after it (if ``rotate``)."""
        if rotate:
            self._next = (index + 1) % len(self.addresses)
        return self.pool(self.addresses[index], transport, protocol)

    def record(self, address: str, failed: bool) -> float | None:
        """Record an attempt's result; returns the ejection time when the address is ejected."""
        if len(self.addresses) == 1:
            return None
        return self.tracker.record(address, failed, self._clock())

    def out_of_rotation(self, address: str) -> bool:
        """Is ``address`` out of rotation now (ejected, or taken out by health checks)?"""
        return not self.tracker.available(address, self._clock())

    def take_out(self, address: str) -> bool:
        """Take ``address`` out until `readmit` (failed health checks); True if it was in."""
        return self.tracker.take_out(address, self._clock())

    def readmit(self, address: str) -> bool:
        """Bring ``address`` back now (passing health checks); True if it was out."""
        return self.tracker.readmit(address, self._clock())

    def hold_ejections(self, on: bool) -> None:
        """Health checks on: ejections last until `readmit`; off: they are timed again."""
        self.tracker.hold(on, self._clock())

    def ejected(self) -> list[str]:
        """Addresses out of rotation now."""
        return self.tracker.ejected(self._clock())

    def close(self) -> None:
        """Close every pool's idle connections."""
        for pool in self._pools.values():
            pool.close()
