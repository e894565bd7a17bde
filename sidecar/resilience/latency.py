"""A method's recent answer times, and a percentile of them: the delay of a ``pNN`` hedge.

`LatencyWindow` keeps the last ``size`` samples in a ring (a fixed list: no
growth, no allocation per sample). A percentile is the nearest-rank value of
the samples held: the smallest sample with at least ``p`` percent of the
samples at or below it. Sorting a thousand floats takes tens of microseconds,
too much for every call, so the value is kept and computed again only after
`REFRESH_FRACTION` of the window has been replaced (for 1000 samples: every 50
answers), or when another percentile is asked for. Until ``min_samples``
samples are in, there is no value (None) and the caller uses its fixed delay.

Samples are seconds measured by the caller; no clock here.
"""

from __future__ import annotations

import math
from typing import Final

# The share of the window replaced before the percentile is computed again.
REFRESH_FRACTION: Final = 0.05


class LatencyWindow:
    """The last ``size`` answer times of one method.

    Args:
        size: samples kept (the most recent).
        min_samples: samples needed before `percentile` gives a value.
    """

    __slots__ = (
        "_count",
        "_next",
        "_percentile",
        "_refresh_every",
        "_samples",
        "_since",
        "_value",
        "min_samples",
        "size",
    )

    def __init__(self, size: int, min_samples: int) -> None:
        if size < 1:
            raise ValueError("a latency window holds at least one sample")
        self.size = size
        self.min_samples = max(1, min(min_samples, size))
        self._samples = [0.0] * size
        self._next = 0  # where the next sample goes
        self._count = 0  # samples held, up to size
        self._refresh_every = max(1, int(size * REFRESH_FRACTION))
        self._since = 0  # samples added since the value was computed
        self._percentile = -1.0  # the percentile _value is for
        self._value: float | None = None

    def __len__(self) -> int:
        return self._count

    def add(self, seconds: float) -> None:
        """One answer time, in seconds."""
        self._samples[self._next] = seconds
        self._next = (self._next + 1) % self.size
        if self._count < self.size:
            self._count += 1
        self._since += 1

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (0 < p < 100) of the samples held; None below ``min_samples``."""
        count = self._count
        if count < self.min_samples:
            return None
        if self._value is None or p != self._percentile or self._since >= self._refresh_every:
            held = sorted(self._samples[:count]) if count < self.size else sorted(self._samples)
            rank = max(1, math.ceil(p / 100.0 * count))
            self._value = held[rank - 1]
            self._percentile = p
            self._since = 0
        return self._value
