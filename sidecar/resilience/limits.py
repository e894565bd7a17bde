"""The concurrency limit of one upstream: how many calls may be in flight at once.

A call takes a slot when it is admitted and gives it back when it finishes,
however it finishes (an answer, a fallback, an error, a cancellation), so
its retries and backoff waits keep the slot: an admitted call is never shed
halfway. A call that finds every slot taken is shed at once, before any
attempt, the breaker, the ejection tracker or the retry budget see it
(`sidecar.proxy.call`).

Calls are counted, not attempts: the limit is what the sidecar lets into the
upstream at once on behalf of its clients, and a call has at most one
attempt in flight at a time. Counting attempts instead would let a burst of
new calls take the slots a retry needs, and shed that retry after the
upstream had already done part of the work.

`ConcurrencyLimit` lives as long as the process: a config reload changes its
limit (`set_limit`) and the calls in flight keep counting against it. A
lower limit sheds new calls until enough of the calls in flight finish; no
call in flight is cut. With no limit (``None``) it still counts, for the
``calls_in_flight`` gauge.

Pure bookkeeping: no clock, no metrics, no config.
"""

from __future__ import annotations


class ConcurrencyLimit:
    """Slots for calls in flight to one upstream.

    Args:
        limit: most calls in flight at once (at least 1); None for no limit.

    Attributes:
        in_flight: calls holding a slot now.
        shed: calls refused so far.
    """

    __slots__ = ("_limit", "in_flight", "shed")

    def __init__(self, limit: int | None = None) -> None:
        self._limit = _checked(limit)
        self.in_flight = 0
        self.shed = 0

    @property
    def limit(self) -> int | None:
        """Most calls in flight at once; None for no limit."""
        return self._limit

    def set_limit(self, limit: int | None) -> None:
        """A new limit for the calls admitted from now on (calls in flight keep their slots)."""
        self._limit = _checked(limit)

    def try_acquire(self) -> bool:
        """Take a slot for a new call: False (and counted as shed) when none is free."""
        limit = self._limit
        if limit is not None and self.in_flight >= limit:
            self.shed += 1
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        """Give back the slot of a call that finished (once per `try_acquire` that was True)."""
        if self.in_flight <= 0:
            raise RuntimeError("a concurrency slot was released that was never taken")
        self.in_flight -= 1


def _checked(limit: int | None) -> int | None:
    if limit is not None and limit < 1:
        raise ValueError(f"a concurrency limit must be at least 1, not {limit}")
    return limit
