"""Retry budget: retries may add at most ``ratio`` of the call rate, plus a small floor.

Each call deposits ``ratio`` tokens, each retry withdraws one, and both are
counted over a sliding ``window`` (so tokens expire); a floor of
``min_retries_per_second * window`` tokens is always there so that a quiet
upstream can still be retried. Over any window, retries are therefore at most
``ratio * calls + min_retries_per_second * window``: a dead upstream sees about
``(1 + ratio)`` times the call rate plus the floor, never a retry storm. This
is the token budget of Finagle's ``RetryBudget`` and gRPC's retry throttling.

The floor is there from the start, as in Finagle: a sidecar that starts next
to an upstream that is still starting (a pod coming up) can retry refused
connections at once. The price is that the bound holds per window: over a
period T from the start, retries are at most ``ratio * calls +
min_retries_per_second * window * ceil(T / window)``, which is
``min_retries_per_second * T`` when T is a whole number of windows.

The window is kept as time slots in a ring; time is passed in. Slotting must
never let the budget overspend: a call counts for at most ``window`` (``SLOTS``
slots, the current one included, so 0.9 to 1 window), and a retry is
remembered for at least ``window`` (one slot more). Calls are counted, not
their ``ratio`` summed, so no rounding loses a token (ten deposits of 0.1 make
a whole one).

The hedge budget is the same token budget with its own settings
(``hedge.budget``): each call of a hedged method deposits, each hedge
withdraws (`sidecar.proxy.hedge`).
"""

from __future__ import annotations

import math
from typing import Final

# Slots per window: the window slides in steps of window / SLOTS.
SLOTS: Final = 10


class _WindowedCounter:
    """A sum over the last ``slots`` slots of ``window / SLOTS`` seconds (the current one too).

    The slot added to last is kept apart, as two plain numbers, and goes into the
    ring when another slot begins or the sum is read: most adds (one a call) land
    in it, and cost no boxed number from the ring's lists in the compiled build.
    """

    __slots__ = ("_counts", "_epoch", "_epochs", "_pending", "_slot_width", "_slots")

    def __init__(self, window: float, slots: int = SLOTS) -> None:
        self._slot_width = window / SLOTS
        self._slots = slots
        self._counts = [0.0] * slots
        self._epochs = [-1] * slots
        self._epoch = -1  # the slot added to last
        self._pending = 0.0  # what it got that is not in the ring yet

    def add(self, now: float, amount: float) -> None:
        epoch = math.floor(now / self._slot_width)
        if epoch == self._epoch:
            self._pending += amount
            return
        self._flush()
        self._epoch = epoch
        self._pending = amount

    def total(self, now: float) -> float:
        self._flush()
        oldest = math.floor(now / self._slot_width) - self._slots + 1
        return sum(c for c, e in zip(self._counts, self._epochs, strict=True) if e >= oldest)

    def _flush(self) -> None:
        """Put the pending amount in its slot of the ring."""
        epoch = self._epoch
        if epoch < 0 or not self._pending:
            return
        i = epoch % self._slots
        if self._epochs[i] != epoch:
            self._epochs[i] = epoch
            self._counts[i] = 0.0
        self._counts[i] += self._pending
        self._pending = 0.0


class RetryBudget:
    """Token budget for retries to one upstream (and, with its own settings, for hedges)."""

    __slots__ = ("_deposits", "_floor", "_withdrawals", "ratio", "window")

    def __init__(self, ratio: float, min_retries_per_second: float, window: float) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.ratio = ratio
        self.window = window
        self._floor = min_retries_per_second * window
        self._deposits = _WindowedCounter(window)  # calls, for at most a window
        self._withdrawals = _WindowedCounter(window, SLOTS + 1)  # retries, for at least one

    @property
    def floor(self) -> float:
        """Tokens always there: ``min_retries_per_second * window``."""
        return self._floor

    def deposit(self, now: float) -> None:
        """Record one call (first attempts only)."""
        self._deposits.add(now, 1.0)

    def balance(self, now: float) -> float:
        """Tokens available now."""
        calls = self._deposits.total(now)
        return self._floor + self.ratio * calls - self._withdrawals.total(now)

    def withdraw(self, now: float) -> None:
        """Take one token for a retry (`RetryPolicy.decide` checked the balance)."""
        self._withdrawals.add(now, 1.0)
