"""Full-jitter exponential backoff.

The n-th wait (n = 1 for the first retry) is uniform in
``[0, min(max_backoff, initial_backoff * multiplier ** (n - 1))]``: the "full
jitter" of the AWS Architecture Blog's "Exponential Backoff and Jitter" (2015),
which spreads retries of many clients best for the least total work. The
random source is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class UniformSource(Protocol):
    """Anything with ``uniform(a, b)``, such as ``random.Random``."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter; all times in seconds."""

    initial: float
    multiplier: float
    maximum: float

    def cap(self, retry: int) -> float:
        """The upper bound of the wait before retry number ``retry`` (1-based)."""
        if retry < 1:
            raise ValueError("retry numbers start at 1")
        if self.initial == 0 or self.multiplier == 1:
            return min(self.maximum, self.initial)
        # The formula itself, not a running product: repeated multiplication rounds
        # differently from ``**`` (0.03 * 1.7 ** 5 is not 0.03 * 1.7 * 1.7 * 1.7 * 1.7 * 1.7).
        try:
            bound = self.initial * float(self.multiplier) ** (retry - 1)
        except OverflowError:  # past the largest float, so past any cap
            return self.maximum
        return min(self.maximum, bound)

    def wait(self, retry: int, rng: UniformSource) -> float:
        """A wait drawn uniformly from ``[0, cap(retry)]``."""
        return rng.uniform(0.0, self.cap(retry))
