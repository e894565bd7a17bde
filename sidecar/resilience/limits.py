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

The limit is fixed (``upstream.max_in_flight``), adaptive (a
`sidecar.resilience.gradient.GradientLimit`, ``upstream.adaptive_concurrency``,
fed the latency of the calls that finish), or both: then the fixed one is a
ceiling over the adaptive one.

`ConcurrencyLimit` lives as long as the process: a config reload changes its
limits (`configure`) and the calls in flight keep counting against them. A
lower limit sheds new calls until enough of the calls in flight finish; no
call in flight is cut. With no limit it still counts, for the
``calls_in_flight`` gauge.

Pure bookkeeping: no clock (times are passed in), no metrics, no config.
"""

from __future__ import annotations

from sidecar.resilience.gradient import GradientLimit


class ConcurrencyLimit:
    """Slots for calls in flight to one upstream.

    Args:
        limit: most calls in flight at once (at least 1); None for no fixed limit.
        adaptive: a limit that follows the upstream's latency, or None.

    Attributes:
        in_flight: calls holding a slot now.
        shed: calls refused so far.
        adaptive: the adaptive limit, if any.
    """

    __slots__ = ("_fixed", "adaptive", "in_flight", "share_note", "shed")

    def __init__(self, limit: int | None = None, adaptive: GradientLimit | None = None) -> None:
        self._fixed = _checked(limit)
        self.adaptive = adaptive
        self.in_flight = 0
        self.shed = 0
        # With workers: N, what the fixed limit is a share of (", this worker's share of 8").
        self.share_note = ""

    @property
    def limit(self) -> int | None:
        """Most calls in flight at once now; None for no limit."""
        fixed, adaptive = self._fixed, self.adaptive
        if adaptive is None:
            return fixed
        return adaptive.limit if fixed is None else min(fixed, adaptive.limit)

    def configure(self, limit: int | None, adaptive: GradientLimit | None = None) -> None:
        """New limits for the calls admitted from now on (calls in flight keep their slots)."""
        self._fixed = _checked(limit)
        self.adaptive = adaptive

    def try_acquire(self, now: float = 0.0) -> bool:
        """Take a slot for a call starting at ``now``: False (counted as shed) when none is free."""
        limit = self._fixed
        adaptive = self.adaptive
        if adaptive is not None:
            adaptive.advance(now)
            limit = adaptive.limit if limit is None else min(limit, adaptive.limit)
        if limit is not None and self.in_flight >= limit:
            self.shed += 1
            return False
        self.in_flight += 1
        return True

    def release(self, started: float | None = None, finished: float = 0.0) -> None:
        """Give back the slot of a call that finished (once per `try_acquire` that was True).

        Args:
            started: when the call started, if its latency (``finished -
                started``) says something about the upstream; None if not
                (no sample for the adaptive limit).
            finished: when it finished.
        """
        if self.in_flight <= 0:
            raise RuntimeError("a concurrency slot was released that was never taken")
        self.in_flight -= 1
        if started is not None and self.adaptive is not None:
            self.adaptive.sample(started, finished)


def _checked(limit: int | None) -> int | None:
    if limit is not None and limit < 1:
        raise ValueError(f"a concurrency limit must be at least 1, not {limit}")
    return limit
