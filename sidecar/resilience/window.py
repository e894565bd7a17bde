"""Sliding windows of call results, and the rule that opens a rate breaker.

As resilience4j's CircuitBreaker: a window over the last N calls
(`CountWindow`, a ring of N results) or over the last N seconds (`TimeWindow`,
a ring of N one-second buckets); each keeps running totals of calls, failures
and slow calls, adds on record and subtracts on evict, so a record and a
reading cost O(1) (a time window evicts at most N buckets after a pause) and
memory is bounded by N. A call slower than ``slow_call_duration`` is
slow. `RateWindow` applies the thresholds: once at least
``minimum_calls`` are in the window, a failure rate or a slow-call rate at or
above its threshold says "open". Pure: the time of each record and reading is
passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

WindowType = Literal["count", "time"]


@dataclass(frozen=True, slots=True)
class Totals:
    """What a window holds now."""

    calls: int
    failures: int
    slow: int

    @property
    def failure_rate(self) -> float:
        """Failures among the calls, in percent (0 without calls)."""
        return 100.0 * self.failures / self.calls if self.calls else 0.0

    @property
    def slow_rate(self) -> float:
        """Slow calls among the calls, in percent (0 without calls)."""
        return 100.0 * self.slow / self.calls if self.calls else 0.0


class Window(Protocol):
    """Running totals of the recent calls."""

    def record(self, failed: bool, slow: bool, now: float) -> Totals: ...

    def totals(self, now: float) -> Totals: ...

    def reset(self) -> None: ...


class CountWindow:
    """The last ``size`` calls: a ring of results, totals updated on add and evict."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a count window holds at least one call")
        self.size = size
        self.reset()

    def reset(self) -> None:
        """Forget every call."""
        self._ring = bytearray(self.size)  # bit 0: failed, bit 1: slow
        self._next = 0
        self._calls = self._failures = self._slow = 0

    def record(self, failed: bool, slow: bool, now: float) -> Totals:
        """Add one call (evicting the oldest when full); ``now`` is not used."""
        if self._calls == self.size:
            old = self._ring[self._next]
            self._failures -= old & 1
            self._slow -= old >> 1
        else:
            self._calls += 1
        self._ring[self._next] = failed | (slow << 1)
        self._failures += failed
        self._slow += slow
        self._next = (self._next + 1) % self.size
        return Totals(self._calls, self._failures, self._slow)

    def totals(self, now: float) -> Totals:
        """The calls held now."""
        return Totals(self._calls, self._failures, self._slow)


class TimeWindow:
    """The calls of the last ``seconds`` whole seconds: one bucket per second, in a ring.

    A call at time t falls in second ``floor(t)``; the window holds the
    current second and the ``seconds - 1`` before it. A clock that steps back
    is treated as standing still.
    """

    def __init__(self, seconds: int) -> None:
        if seconds < 1:
            raise ValueError("a time window spans at least one second")
        self.seconds = seconds
        self.reset()

    def reset(self) -> None:
        """Forget every call."""
        n = self.seconds
        self._calls_at = [0] * n
        self._failures_at = [0] * n
        self._slow_at = [0] * n
        self._head: int | None = None  # the newest second with a bucket
        self._calls = self._failures = self._slow = 0

    def _advance(self, now: float) -> int:
        """Evict the buckets that fell out of the window by ``now``; its bucket's index."""
        second = math.floor(now)
        head = self._head
        if head is None:
            head = self._head = second
        elif second > head:
            for stale in range(head + 1, head + 1 + min(second - head, self.seconds)):
                i = stale % self.seconds
                self._calls -= self._calls_at[i]
                self._failures -= self._failures_at[i]
                self._slow -= self._slow_at[i]
                self._calls_at[i] = self._failures_at[i] = self._slow_at[i] = 0
            head = self._head = second
        return head % self.seconds

    def record(self, failed: bool, slow: bool, now: float) -> Totals:
        """Add one call at ``now`` (seconds)."""
        i = self._advance(now)
        self._calls_at[i] += 1
        self._failures_at[i] += failed
        self._slow_at[i] += slow
        self._calls += 1
        self._failures += failed
        self._slow += slow
        return Totals(self._calls, self._failures, self._slow)

    def totals(self, now: float) -> Totals:
        """The calls of the window ending at ``now``."""
        self._advance(now)
        return Totals(self._calls, self._failures, self._slow)


@dataclass(frozen=True, slots=True)
class RateSettings:
    """When a rate breaker opens (``breaker.*`` with ``mode: rate``); times in seconds."""

    window_type: WindowType = "count"
    window_size: int = 100
    minimum_calls: int = 100
    failure_rate_threshold: float = 50.0
    slow_call_duration: float | None = None
    slow_call_rate_threshold: float = 100.0

    def window(self) -> Window:
        """An empty window of this type and size."""
        if self.window_type == "time":
            return TimeWindow(self.window_size)
        return CountWindow(self.window_size)


class RateWindow:
    """A window and the thresholds that decide from it when a breaker opens."""

    def __init__(self, settings: RateSettings) -> None:
        self.settings = settings
        self._window = settings.window()

    def reset(self) -> None:
        """Forget every call (the breaker opened or closed)."""
        self._window.reset()

    def record(self, failed: bool, duration: float | None, now: float) -> bool:
        """Add one call's result; True when the window now says the breaker should open.

        Args:
            failed: the call counts as a failure (``breaker.trip_on``).
            duration: how long the call took, in seconds; None when unknown (never slow).
            now: the time, in seconds, for a time window.
        """
        s = self.settings
        slow = (
            s.slow_call_duration is not None
            and duration is not None
            and duration > s.slow_call_duration
        )
        totals = self._window.record(failed, slow, now)
        return totals.calls >= s.minimum_calls and (
            totals.failure_rate >= s.failure_rate_threshold
            or (s.slow_call_duration is not None and totals.slow_rate >= s.slow_call_rate_threshold)
        )

    def totals(self, now: float) -> Totals:
        """What the window holds at ``now``."""
        return self._window.totals(now)
