"""Sliding windows (by count, by time) and the thresholds of a rate breaker, on given times."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.window import CountWindow, RateSettings, RateWindow, TimeWindow, Totals


def test_totals_rates_in_percent() -> None:
    assert Totals(calls=8, failures=2, slow=6).failure_rate == 25.0
    assert Totals(calls=8, failures=2, slow=6).slow_rate == 75.0
    assert Totals(0, 0, 0).failure_rate == 0.0
    assert Totals(0, 0, 0).slow_rate == 0.0


def test_count_window_keeps_the_last_n_calls() -> None:
    window = CountWindow(4)
    for failed in (True, True, False, False):
        window.record(failed, False, 0.0)
    assert window.totals(0.0) == Totals(4, 2, 0)
    # Two successes push the two failures out; two slow calls come in.
    window.record(False, True, 0.0)
    assert window.totals(0.0) == Totals(4, 1, 1)
    window.record(False, True, 0.0)
    assert window.totals(0.0) == Totals(4, 0, 2)
    window.reset()
    assert window.totals(0.0) == Totals(0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 20),
    results=st.lists(st.tuples(st.booleans(), st.booleans()), max_size=80),
)
def test_count_window_equals_counting_the_last_n(
    size: int, results: list[tuple[bool, bool]]
) -> None:
    window = CountWindow(size)
    for failed, slow in results:
        window.record(failed, slow, 0.0)
    last = results[-size:] if results else []
    assert window.totals(0.0) == Totals(len(last), sum(f for f, _ in last), sum(s for _, s in last))


def test_time_window_drops_calls_older_than_its_seconds() -> None:
    window = TimeWindow(3)
    window.record(True, False, 100.2)  # second 100
    window.record(False, True, 101.9)  # second 101
    window.record(True, False, 102.0)  # second 102
    assert window.totals(102.5) == Totals(3, 2, 1)
    assert window.totals(103.0) == Totals(2, 1, 1)  # second 100 left the window
    assert window.totals(104.99) == Totals(1, 1, 0)
    assert window.totals(105.0) == Totals(0, 0, 0)
    # After a pause longer than the window, everything is gone and it starts again.
    window.record(False, False, 1_000.0)
    assert window.totals(1_000.0) == Totals(1, 0, 0)


def test_time_window_treats_a_clock_stepping_back_as_standing_still() -> None:
    window = TimeWindow(2)
    window.record(True, False, 50.5)
    window.record(True, False, 49.0)  # counted in the newest second
    assert window.totals(50.9) == Totals(2, 2, 0)
    assert window.totals(52.0) == Totals(0, 0, 0)


@settings(max_examples=200, deadline=None)
@given(
    seconds=st.integers(1, 10),
    steps=st.lists(
        st.tuples(st.floats(0, 4, allow_nan=False), st.booleans(), st.booleans()), max_size=60
    ),
)
def test_time_window_equals_counting_the_last_seconds(
    seconds: int, steps: list[tuple[float, bool, bool]]
) -> None:
    window = TimeWindow(seconds)
    now = 0.0
    seen: list[tuple[float, bool, bool]] = []
    for gap, failed, slow in steps:
        now += gap
        window.record(failed, slow, now)
        seen.append((now, failed, slow))
    end = now + 0.5
    first = int(end) - seconds + 1  # the oldest whole second still in the window
    kept = [(f, s) for t, f, s in seen if int(t) >= first]
    assert window.totals(end) == Totals(len(kept), sum(f for f, _ in kept), sum(s for _, s in kept))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one call"):
        CountWindow(0)
    with pytest.raises(ValueError, match="at least one second"):
        TimeWindow(0)


def test_under_minimum_calls_nothing_opens() -> None:
    window = RateWindow(RateSettings(window_size=10, minimum_calls=5, failure_rate_threshold=50))
    # Four failures out of four: 100 %, but fewer than minimum_calls.
    assert [window.record(True, None, 0.0) for _ in range(4)] == [False] * 4
    assert window.record(True, None, 0.0) is True  # the fifth reaches minimum_calls


def test_the_threshold_is_reached_at_equality() -> None:
    window = RateWindow(RateSettings(window_size=4, minimum_calls=4, failure_rate_threshold=25))
    results = [window.record(failed, None, 0.0) for failed in (False, False, False, True)]
    assert results == [False, False, False, True]  # 1 in 4 = 25 %


def test_slow_calls_alone_can_open() -> None:
    window = RateWindow(
        RateSettings(
            window_size=10,
            minimum_calls=10,
            failure_rate_threshold=50,
            slow_call_duration=0.5,
            slow_call_rate_threshold=60,
        )
    )
    # Every call succeeds; six in ten take longer than 0.5 s (0.5 itself is not slow).
    durations = [0.1, 0.9, 0.5, 0.9, 0.1, 0.9, 0.1, 0.9, 0.9, 0.9]
    opens = [window.record(False, d, 0.0) for d in durations]
    assert opens == [False] * 9 + [True]
    assert window.totals(0.0) == Totals(10, 0, 6)


def test_without_slow_call_duration_no_call_is_slow() -> None:
    window = RateWindow(RateSettings(window_size=3, minimum_calls=3, slow_call_rate_threshold=1))
    assert [window.record(False, 99.0, 0.0) for _ in range(3)] == [False] * 3
    assert window.totals(0.0).slow == 0
