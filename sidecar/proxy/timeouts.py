"""Per-try timeouts for every call in flight, on one coarse timer.

A timer per call (``loop.call_later`` and ``cancel``) costs more than a
microsecond on uvloop, a measurable share of a proxied call. Instead each
waiting reply is filed in a bucket of `GRANULARITY` seconds, keyed by the
bucket's number (bucket ``n`` ends at ``n * GRANULARITY``); one timer, set for
the end of the earliest bucket while anything is filed, expires whole buckets
that are due. `add` hands back the bucket itself, and a reply that arrives
removes its entry from it (a dict delete: no bucket number to box and look
up), so only calls in flight are held. A timeout fires between 0 and `GRANULARITY` seconds
late (plus the loop's own lateness), never early.

An expire callback that raises is logged and the others still run: one bug
must not stop every later timeout.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from typing import Final

log: Final = logging.getLogger("sidecar.timeouts")

# Seconds per bucket: how late a timeout may fire. Per-try timeouts are
# usually hundreds of milliseconds or more.
GRANULARITY: Final = 0.005

# A loop's timer may run a little before its time (uvloop rounds a delay to
# whole milliseconds); the timer is then set again, at least this far ahead,
# rather than spinning until the clock catches up.
_MIN_DELAY: Final = 0.001

Expire = Callable[[], None]
# A bucket: what `Timeouts.add` returns and `Timeouts.remove` takes.
Bucket = dict[object, Expire]


class Timeouts:
    """Coarse timeouts on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, granularity: float = GRANULARITY) -> None:
        self.loop = loop
        self._granularity = granularity
        self._buckets: dict[int, Bucket] = {}
        self._due: list[int] = []  # bucket numbers, a heap
        self._timer: asyncio.TimerHandle | None = None
        self._timer_bucket = 0  # the bucket the timer is set for
        # The bucket filed into last and the times it holds, (low, high]: the calls of
        # a few milliseconds share one, and a time inside it needs no division.
        self._last: Bucket | None = None
        self._last_low = self._last_high = 0.0

    def add(self, expires_at: float, key: object, expire: Expire) -> Bucket:
        """Call ``expire()`` at ``expires_at`` (loop time) unless `remove` comes first.

        Returns:
            The bucket it went in, to pass to `remove`.
        """
        bucket = self._last
        if bucket is not None and self._last_low < expires_at <= self._last_high:
            bucket[key] = expire
            return bucket
        granularity = self._granularity
        number = math.ceil(expires_at / granularity)
        if number * granularity < expires_at:  # the division rounded down
            number += 1
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = {}
            heapq.heappush(self._due, number)
            if self._timer is None or number < self._timer_bucket:
                self._set_timer(number, 0.0)
        self._last = bucket
        self._last_low = (number - 1) * granularity
        self._last_high = number * granularity
        bucket[key] = expire
        return bucket

    def remove(self, bucket: Bucket, key: object) -> None:
        """Forget a timeout that is no longer needed (``bucket``: what `add` returned;
        once expired, it is no longer the timer's, and this does nothing)."""
        # `in` and `del` rather than pop(key, None): the compiled build has them
        # as direct calls into the dict, where pop is a method call (once per call).
        if key in bucket:
            del bucket[key]

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def _set_timer(self, number: int, min_delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = self.loop
        when = max(number * self._granularity, loop.time() + min_delay)
        self._timer = loop.call_at(when, self._tick)
        self._timer_bucket = number

    def _tick(self) -> None:
        self._timer = None
        granularity = self._granularity
        now = self.loop.time()
        due = self._due
        buckets = self._buckets
        early = True
        try:
            while due and due[0] * granularity <= now:
                early = False
                number = due[0]
                bucket = buckets[number]
                # Drained in place: a callback may remove a later entry of the
                # same bucket (it must not fire) or file one (it must).
                while bucket:
                    key = next(iter(bucket))
                    expire = bucket.pop(key)
                    try:
                        expire()
                    except Exception:
                        log.exception("a timeout callback failed: %r", expire)
                if buckets.get(number) is bucket:  # not closed meanwhile
                    del buckets[number]
                    heapq.heappop(due)
                    if bucket is self._last:
                        self._last = None
        finally:
            # A callback may have set the timer (by filing a timeout), maybe
            # for a later bucket than the earliest.
            if due and (self._timer is None or self._timer_bucket != due[0]):
                self._set_timer(due[0], _MIN_DELAY if early else 0.0)

    def close(self) -> None:
        """Stop the timer; pending timeouts never fire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for bucket in self._buckets.values():
            bucket.clear()
        self._buckets.clear()
        self._due.clear()
        self._last = None
