"""What the demo's clients count: only what a client can see.

An answer (a value, or a declared exception such as ``ItemNotFound``), a
``TApplicationException`` (the sidecar or the server said why it could not
answer), or a dropped connection (a transport error: the connection is gone
and is opened again). A client cannot tell a cached fallback from a fresh
answer; the sidecar's metrics can.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

# Latencies kept between two `TrafficCounter.take_latencies` calls (oldest dropped).
MAX_LATENCIES = 50_000


@dataclass(frozen=True)
class TrafficCounts:
    """What the clients have seen so far (cumulative).

    Attributes:
        calls: calls made (answered or not).
        reads, writes: calls by kind (``placeOrder`` is the only write).
        answered: calls that got an answer: a value or a declared exception.
        read_errors, write_errors: calls answered with a ``TApplicationException``.
        dropped: calls that lost their connection (a transport or protocol error).
        connect_failures: attempts to open a connection that failed.
    """

    calls: int = 0
    reads: int = 0
    writes: int = 0
    answered: int = 0
    read_errors: int = 0
    write_errors: int = 0
    dropped: int = 0
    connect_failures: int = 0

    @property
    def errors(self) -> int:
        """Calls that got a ``TApplicationException`` instead of an answer."""
        return self.read_errors + self.write_errors

    def __sub__(self, other: TrafficCounts) -> TrafficCounts:
        """The counts between two snapshots."""
        return self._combine(other, -1)

    def __add__(self, other: TrafficCounts) -> TrafficCounts:
        """The counts of two intervals together."""
        return self._combine(other, 1)

    def _combine(self, other: TrafficCounts, sign: int) -> TrafficCounts:
        return TrafficCounts(
            **{name: getattr(self, name) + sign * getattr(other, name) for name in _NUMBERS}
        )


_NUMBERS = tuple(f.name for f in fields(TrafficCounts))


class TrafficCounter:
    """`TrafficCounts` under construction, and the answered calls' latencies; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}
        self._latencies: deque[float] = deque(maxlen=MAX_LATENCIES)

    def add(self, *keys: str, latency: float | None = None) -> None:
        """Count one under each of ``keys`` (`TrafficCounts` fields); keep ``latency``."""
        with self._lock:
            for key in keys:
                self._values[key] = self._values.get(key, 0) + 1
            if latency is not None:
                self._latencies.append(latency)

    def snapshot(self) -> TrafficCounts:
        """The counts so far."""
        with self._lock:
            return replace(TrafficCounts(), **self._values)

    def take_latencies(self) -> list[float]:
        """Seconds per answered call since the last time this was called."""
        with self._lock:
            taken = list(self._latencies)
            self._latencies.clear()
            return taken


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values``, or None when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, round(q * 100) - 1)]
