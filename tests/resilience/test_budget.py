"""Retry budget with a fake clock: the window bound, the long-run bound, expiry, the floor.

The bounds under test (design §4, issue 3), for N calls over T seconds on a
fresh budget, every call failing and retried as often as the budget allows:

- T within one window: retries <= N * ratio + min_retries_per_second * window;
- T longer than the window: attempts <= N * (1 + ratio) + min_retries_per_second * T
  when T is a whole number of windows, and in general
  <= N * (1 + ratio) + min_retries_per_second * window * ceil(T / window)
  (the floor comes back once per window).

Times are floats passed in; the calls need not start on a slot boundary.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.budget import SLOTS, RetryBudget, _WindowedCounter


def take(budget: RetryBudget, now: float) -> bool:
    """Take a token as a call does: only when the balance holds a whole one."""
    if budget.balance(now) >= 1.0:
        budget.withdraw(now)
        return True
    return False


# Retries per call are bounded so that every loop here is bounded.
MAX_RETRIES_PER_CALL = 10_000
EPS = 1e-9


@dataclass
class Tally:
    calls: int = 0
    retries: int = 0
    refused: int = 0

    @property
    def attempts(self) -> int:
        return self.calls + self.retries


def storm(budget: RetryBudget, call_times: list[float]) -> Tally:
    """Every call fails and is retried at once, again and again, until the budget says no."""
    tally = Tally()
    for t in call_times:
        budget.deposit(t)
        tally.calls += 1
        for _ in range(MAX_RETRIES_PER_CALL):
            if not take(budget, t):
                tally.refused += 1
                break
            tally.retries += 1
    return tally


def spread(n: int, start: float, duration: float) -> list[float]:
    """``n`` call times evenly over ``[start, start + duration)``."""
    return [start + duration * i / n for i in range(n)]


def floor_tokens(min_rps: float, window: float) -> float:
    return min_rps * window


# The floor


@pytest.mark.parametrize(("min_rps", "window"), [(10.0, 10.0), (1.0, 3.0), (0.5, 4.0), (7.0, 1.0)])
def test_the_floor_allows_min_retries_per_second_times_window_with_no_calls(
    min_rps: float, window: float
) -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=min_rps, window=window)
    allowed = 0
    for _ in range(10_000):
        if not take(budget, 5.0):
            break
        allowed += 1
    assert allowed == math.floor(floor_tokens(min_rps, window))


def test_no_floor_and_no_calls_means_no_retries() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, window=10.0)
    assert not take(budget, 0.0)
    assert budget.balance(0.0) == 0.0


def test_only_whole_tokens_are_taken() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.3, window=10.0)  # 3 tokens
    results = [take(budget, 1.0) for _ in range(8)]
    assert results == [True] * 3 + [False] * 5
    assert budget.balance(1.0) == pytest.approx(0.0)


# Deposits


@pytest.mark.parametrize(("ratio", "calls"), [(0.2, 5), (0.2, 50), (0.1, 10), (0.3, 10), (0.25, 8)])
def test_each_call_deposits_ratio(ratio: float, calls: int) -> None:
    # With no floor, N calls allow exactly floor(N * ratio) retries; no float drift
    # may lose one (ten deposits of 0.1 must make a whole token).
    budget = RetryBudget(ratio=ratio, min_retries_per_second=0.0, window=10.0)
    for _ in range(calls):
        budget.deposit(3.0)
    assert budget.balance(3.0) == pytest.approx(ratio * calls)
    allowed = sum(take(budget, 3.0) for _ in range(100))
    assert allowed == round(ratio * calls)


# Expiry


@pytest.mark.parametrize("window", [10.0, 1.0, 0.3])
@pytest.mark.parametrize("offset", [0.0, 0.013, 0.5, 0.99])
def test_tokens_expire_after_the_window(window: float, offset: float) -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=window)
    start = 100.0 + offset * window
    budget.deposit(start)
    slot = window / SLOTS
    # Still there for most of the window (the window slides in steps of one slot) ...
    assert budget.balance(start + window - slot - EPS) == pytest.approx(1.0)
    # ... and never counted once the window has passed.
    assert budget.balance(start + window) == 0.0
    assert budget.balance(start + 10 * window) == 0.0


@pytest.mark.parametrize("window", [10.0, 1.0])
@pytest.mark.parametrize("offset", [0.0, 0.05, 0.5, 0.95])
def test_a_retry_is_remembered_for_a_whole_window(window: float, offset: float) -> None:
    # The floor comes back only when the retries that used it are a window old:
    # otherwise retries within one window could exceed the floor.
    budget = RetryBudget(ratio=0.0, min_retries_per_second=2.0 / window, window=window)  # 2 tokens
    start = 50.0 + offset * window
    assert take(budget, start)
    assert take(budget, start)
    for step in range(1, 100):
        now = start + window * step / 100
        assert not take(budget, now), f"floor came back after {now - start:.4f}s"
    assert take(budget, start + window + window / SLOTS + EPS)


def test_a_quiet_window_resets_the_budget() -> None:
    budget = RetryBudget(ratio=0.5, min_retries_per_second=1.0, window=2.0)
    first = storm(budget, spread(20, 0.0, 1.0))
    assert first.retries > 0
    later = storm(budget, spread(20, 100.0, 1.0))
    assert later.retries == first.retries


# The window bound


@pytest.mark.parametrize(
    ("n", "duration", "ratio", "min_rps", "window"),
    [
        (1_000, 10.0, 0.2, 10.0, 10.0),
        (1_000, 9.99, 0.2, 10.0, 10.0),
        (100, 1.0, 0.5, 2.0, 1.0),
        (5_000, 3.0, 0.1, 0.0, 3.0),
        (10, 0.001, 0.2, 10.0, 10.0),
    ],
)
@pytest.mark.parametrize("start", [0.0, 0.37, 12.05])
def test_window_bound(
    n: int, duration: float, ratio: float, min_rps: float, window: float, start: float
) -> None:
    budget = RetryBudget(ratio=ratio, min_retries_per_second=min_rps, window=window)
    times = spread(n, start, duration)
    tally = storm(budget, times)
    assert tally.retries <= n * ratio + floor_tokens(min_rps, window) + EPS
    # Nor is it stingier than it says: at the last refusal, the floor and the deposits
    # of the calls less than (window - one slot) old were all there to use.
    recent = sum(1 for t in times if t > times[-1] - (window - window / SLOTS))
    assert tally.retries > recent * ratio + floor_tokens(min_rps, window) - 1 - EPS


# The long-run bound


@pytest.mark.parametrize("windows", [2, 3, 5])
@pytest.mark.parametrize(
    ("per_second", "ratio", "min_rps", "window"),
    [
        (100.0, 0.2, 10.0, 10.0),
        (50.0, 0.1, 5.0, 1.0),
        (10.0, 0.5, 1.0, 2.0),
        (200.0, 0.2, 0.0, 1.0),
    ],
)
@pytest.mark.parametrize("start", [0.0, 0.51, 7.3])
def test_attempts_bound_over_several_windows(
    windows: int, per_second: float, ratio: float, min_rps: float, window: float, start: float
) -> None:
    duration = windows * window
    n = int(per_second * duration)
    budget = RetryBudget(ratio=ratio, min_retries_per_second=min_rps, window=window)
    tally = storm(budget, spread(n, start, duration))
    assert tally.attempts <= n * (1 + ratio) + min_rps * duration + EPS
    assert tally.retries > 0 or (ratio * n < 1 and min_rps == 0)


@dataclass
class Traffic:
    budget: RetryBudget
    window: float
    floor: float
    duration: float
    events: list[tuple[float, bool]]  # (time, is a call) in time order; else a retry attempt


@st.composite
def traffic(draw: st.DrawFn) -> Traffic:
    """A budget and a random mix of calls and retry attempts."""
    window = draw(st.sampled_from([0.5, 1.0, 2.5, 10.0]))
    ratio = draw(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]))
    min_rps = draw(st.sampled_from([0.0, 1.0, 3.0, 10.0]))
    start = draw(st.floats(min_value=0.0, max_value=1000.0, allow_nan=False))
    duration = draw(st.floats(min_value=0.01, max_value=5.0)) * window
    rng = random.Random(draw(st.integers(min_value=0, max_value=2**32)))
    n_events = draw(st.integers(min_value=1, max_value=400))
    share_calls = draw(st.floats(min_value=0.05, max_value=1.0))
    events = sorted(
        (start + rng.random() * duration, rng.random() < share_calls) for _ in range(n_events)
    )
    budget = RetryBudget(ratio=ratio, min_retries_per_second=min_rps, window=window)
    return Traffic(budget, window, floor_tokens(min_rps, window), duration, events)


@given(case=traffic())
@settings(max_examples=150, deadline=None)
def test_retries_bounded_for_any_timing(case: Traffic) -> None:
    budget, window, floor = case.budget, case.window, case.floor
    calls = refused = 0
    retry_times: list[float] = []
    call_times: list[float] = []
    for t, is_call in case.events:
        if is_call:
            budget.deposit(t)
            calls += 1
            call_times.append(t)
        elif take(budget, t):
            retry_times.append(t)
        else:
            refused += 1
    # Over the whole run: the floor comes back at most once per window.
    renewals = math.ceil((case.duration + EPS) / window)
    assert len(retry_times) <= budget.ratio * calls + floor * renewals + EPS
    # Over any window-long stretch beginning at a retry: no more than the floor plus
    # the deposits of the calls from a window before it to its end.
    for i, t in enumerate(retry_times):
        in_window = sum(1 for u in retry_times[i:] if u < t + window)
        deposits = sum(1 for c in call_times if t - window < c < t + window)
        assert in_window <= budget.ratio * deposits + floor + EPS


class _RingModel:
    """The windowed sum written the plain way: every add straight into the ring."""

    def __init__(self, window: float, slots: int) -> None:
        self.width, self.slots = window / SLOTS, slots
        self.counts, self.epochs = [0.0] * slots, [-1] * slots

    def add(self, now: float, amount: float) -> None:
        epoch = math.floor(now / self.width)
        i = epoch % self.slots
        if self.epochs[i] != epoch:
            self.epochs[i], self.counts[i] = epoch, 0.0
        self.counts[i] += amount

    def total(self, now: float) -> float:
        oldest = math.floor(now / self.width) - self.slots + 1
        return sum(c for c, e in zip(self.counts, self.epochs, strict=True) if e >= oldest)


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["add", "total"]),
            st.floats(min_value=-0.05, max_value=0.4),  # clock steps, some backwards
            st.sampled_from([1.0, 0.1, 2.5]),
        ),
        max_size=80,
    ),
    slots=st.sampled_from([SLOTS, SLOTS + 1]),
)
def test_the_counter_keeps_the_last_slot_apart_and_sums_as_the_plain_ring(
    steps: list[tuple[str, float, float]], slots: int
) -> None:
    """The counter keeps the slot added to last out of the ring until another
    begins or the sum is read; every sum equals that of a ring every add went to."""
    counter, model = _WindowedCounter(1.0, slots), _RingModel(1.0, slots)
    now = 1000.0
    for op, step, amount in steps:
        now += step
        if op == "add":
            counter.add(now, amount)
            model.add(now, amount)
        else:
            assert counter.total(now) == pytest.approx(model.total(now))
    assert counter.total(now + 0.05) == pytest.approx(model.total(now + 0.05))
