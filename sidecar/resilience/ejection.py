"""Passive ejection: an upstream address that keeps failing is left out for a while.

After ``consecutive_failures`` failed attempts in a row an address is ejected
for ``base_time * 2 ** (k - 1)`` seconds (k: how many times in a row it has
been ejected, reset by a success), at most ``max_time``. Ejection never leaves
out more than ``max_percent`` of the addresses, and never the last one: a lone
upstream is the circuit breaker's business. Time is passed in.

While health checks are on (``held``), an ejection has no end time: the
address stays out until its probes pass (`readmit`), and the health checker
may also take an address out itself (`take_out`), beyond ``max_percent``
(probes that fail are evidence about that address, not a guess from client
calls; the balancer still uses every address when none is left in). Turning
health checks off gives each held ejection the timed length it would have had,
from then.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class _AddressHealth:
    failures: int = 0
    ejections_in_a_row: int = 0
    ejected_until: float = 0.0


class EjectionTracker:
    """Health of a fixed set of addresses."""

    def __init__(
        self,
        addresses: list[str],
        *,
        consecutive_failures: int,
        base_time: float,
        max_time: float,
        max_percent: int,
    ) -> None:
        self._health = {address: _AddressHealth() for address in addresses}
        self._threshold = consecutive_failures
        self._base = base_time
        self._max = max_time
        # How many addresses may be out at once: never all of them.
        self._max_ejected = min(len(addresses) - 1, len(addresses) * max_percent // 100)
        self.ejections_total = 0
        self.held = False

    def hold(self, on: bool, now: float) -> None:
        """Health checks on (ejections last until `readmit`) or off (timed again)."""
        if on == self.held:
            return
        self.held = on
        for health in self._health.values():
            if health.ejected_until <= now:
                continue
            if on:
                health.ejected_until = math.inf
            else:
                health.ejected_until = now + self._duration(max(1, health.ejections_in_a_row))

    def take_out(self, address: str, now: float) -> bool:
        """Take ``address`` out of rotation until `readmit` (failed health checks).

        Returns:
            True when it was in rotation.
        """
        health = self._health[address]
        was_in = health.ejected_until <= now
        health.ejected_until = math.inf
        health.failures = 0
        return was_in

    def readmit(self, address: str, now: float) -> bool:
        """Bring ``address`` back into rotation now (passing health checks).

        Returns:
            True when it was out.
        """
        health = self._health[address]
        was_out = health.ejected_until > now
        health.ejected_until = 0.0
        health.failures = 0
        health.ejections_in_a_row = 0
        return was_out

    def _duration(self, ejections_in_a_row: int) -> float:
        """How long the k-th ejection in a row lasts (timed mode)."""
        return min(self._max, self._base * 2.0 ** (ejections_in_a_row - 1))

    def available(self, address: str, now: float) -> bool:
        """Is the address in rotation?"""
        return self._health[address].ejected_until <= now

    def ejected(self, now: float) -> list[str]:
        """Addresses out of rotation now."""
        return [a for a, h in self._health.items() if h.ejected_until > now]

    def record(self, address: str, failed: bool, now: float) -> float | None:
        """Record an attempt's result.

        Returns:
            The ejection time in seconds when this failure ejects the address
            (``math.inf`` while `held`: until its health checks pass), else None.
        """
        health = self._health[address]
        if not failed:
            health.failures = 0
            if health.ejected_until <= now:
                health.ejections_in_a_row = 0
            return None
        health.failures += 1
        if health.failures < self._threshold or health.ejected_until > now:
            return None
        if len(self.ejected(now)) >= self._max_ejected:
            return None
        health.ejections_in_a_row += 1
        duration = math.inf if self.held else self._duration(health.ejections_in_a_row)
        health.ejected_until = now + duration
        health.failures = 0
        self.ejections_total += 1
        return duration
