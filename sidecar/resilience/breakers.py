"""The breakers of one upstream: one for all its calls, or one per method label.

``breaker.scope: upstream`` (the default) guards every call with one breaker
named after the upstream; ``scope: method`` makes one per method label
(``<upstream>/<label>``), on first use. Method labels are capped
(`sidecar.metrics.MethodLabels`), so a client cannot make breakers without end.
Whether health checks drive them (`Breaker.health_checked`) is set here for
every breaker, those made later included.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.resilience.breaker import Breaker


class BreakerSet:
    """Breakers by name, made on first use by ``make(name)``."""

    def __init__(self, make: Callable[[str], Breaker], upstream_name: str, per_method: bool):
        self._make = make
        self._upstream_name = upstream_name
        self.per_method = per_method
        self._breakers: dict[str, Breaker] = {}
        self.health_checked = False
        self._only = None if per_method else self._get(upstream_name)

    def _get(self, name: str) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = self._make(name)
            breaker.health_checked = self.health_checked
        return breaker

    def set_health_checked(self, on: bool) -> None:
        """Health checks on or off, for every breaker (and those made later)."""
        self.health_checked = on
        for breaker in self._breakers.values():
            breaker.health_checked = on

    def for_label(self, label: str) -> Breaker:
        """The breaker that guards calls of the method with this metrics label."""
        if self._only is not None:
            return self._only
        return self._get(f"{self._upstream_name}/{label}")

    def all(self) -> list[Breaker]:
        """Every breaker made so far."""
        return list(self._breakers.values())
