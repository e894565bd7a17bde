"""Per-try timeouts for every call in flight, on one coarse timer.

A timer per call (``loop.call_later`` and ``cancel``) costs more than a
microsecond on uvloop, a measurable share of a proxied call. Instead each
waiting reply is filed in a bucket of `GRANULARITY` seconds, keyed by the
bucket's number; one timer ticks every `GRANULARITY` seconds while anything is
filed, and expires whole buckets that are due. A reply that arrives removes
its entry (a dict delete), so only calls in flight are held. A timeout fires
between 0 and `GRANULARITY` seconds late, never early.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Callable

# Seconds per bucket: how late a timeout may fire. Per-try timeouts are
# usually hundreds of milliseconds or more.
GRANULARITY = 0.005

Expire = Callable[[], None]


class Timeouts:
    """Coarse timeouts on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, granularity: float = GRANULARITY) -> None:
        self.loop = loop
        self._granularity = granularity
        self._buckets: dict[int, dict[object, Expire]] = {}
        self._due: list[int] = []  # bucket numbers, a heap
        self._timer: asyncio.TimerHandle | None = None

    def add(self, expires_at: float, key: object, expire: Expire) -> int:
        """Call ``expire()`` at ``expires_at`` (loop time) unless `remove` comes first.

        Returns:
            The bucket number, to pass to `remove`.
        """
        number = math.ceil(expires_at / self._granularity)
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = {}
            heapq.heappush(self._due, number)
        bucket[key] = expire
        if self._timer is None:
            self._timer = self.loop.call_later(self._granularity, self._tick)
        return number

    def remove(self, number: int, key: object) -> None:
        """Forget a timeout that is no longer needed."""
        bucket = self._buckets.get(number)
        if bucket is not None:
            bucket.pop(key, None)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _tick(self) -> None:
        now = math.floor(self.loop.time() / self._granularity)
        due = self._due
        while due and due[0] <= now:
            bucket = self._buckets.pop(heapq.heappop(due))
            for expire in bucket.values():
                expire()
        if due:
            self._timer = self.loop.call_later(self._granularity, self._tick)
        else:
            self._timer = None

    def close(self) -> None:
        """Stop the timer; pending timeouts never fire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buckets.clear()
        self._due.clear()
