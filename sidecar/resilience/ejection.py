"""Passive ejection: an upstream address that keeps failing is left out for a while.

After ``consecutive_failures`` failed attempts in a row an address is ejected
for ``base_time * 2 ** (k - 1)`` seconds (k: how many times in a row it has
been ejected, reset by a success), at most ``max_time``. Ejection never leaves
out more than ``max_percent`` of the addresses, and never the last one: a lone
upstream is the circuit breaker's business. Time is passed in.
"""

from __future__ import annotations

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

    def available(self, address: str, now: float) -> bool:
        """Is the address in rotation?"""
        return self._health[address].ejected_until <= now

    def ejected(self, now: float) -> list[str]:
        """Addresses out of rotation now."""
        return [a for a, h in self._health.items() if h.ejected_until > now]

    def record(self, address: str, failed: bool, now: float) -> float | None:
        """Record an attempt's result.

        Returns:
            The ejection time in seconds when this failure ejects the address, else None.
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
        duration: float = min(self._max, self._base * 2.0 ** (health.ejections_in_a_row - 1))
        health.ejected_until = now + duration
        health.failures = 0
        self.ejections_total += 1
        return duration
