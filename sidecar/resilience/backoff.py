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
        # Stop multiplying once past the cap: multiplier ** 1000 overflows a float.
        bound = self.initial
        for _ in range(retry - 1):
            if bound >= self.maximum:
                break
            bound *= self.multiplier
        return min(self.maximum, bound)

    def wait(self, retry: int, rng: UniformSource) -> float:
        """A wait drawn uniformly from ``[0, cap(retry)]``."""
        return rng.uniform(0.0, self.cap(retry))
