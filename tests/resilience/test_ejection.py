"""Passive ejection with injected time: threshold, doubling, cap, reset, and the share limit."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.ejection import EjectionTracker

A, B, C, D = "10.0.0.1:9091", "10.0.0.2:9091", "10.0.0.3:9091", "10.0.0.4:9091"


def tracker(
    addresses: list[str],
    *,
    consecutive_failures: int = 3,
    base_time: float = 1.0,
    max_time: float = 30.0,
    max_percent: int = 50,
) -> EjectionTracker:
    return EjectionTracker(
        addresses,
        consecutive_failures=consecutive_failures,
        base_time=base_time,
        max_time=max_time,
        max_percent=max_percent,
    )


def fail(t: EjectionTracker, address: str, now: float, times: int) -> list[float | None]:
    return [t.record(address, True, now) for _ in range(times)]


@pytest.mark.parametrize("threshold", [1, 2, 3, 5])
def test_ejected_after_consecutive_failures(threshold: int) -> None:
    t = tracker([A, B], consecutive_failures=threshold)
    results = fail(t, A, 10.0, threshold)
    assert results[:-1] == [None] * (threshold - 1)
    assert results[-1] == 1.0
    assert not t.available(A, 10.0)
    assert t.available(B, 10.0)
    assert t.ejected(10.0) == [A]
    assert t.ejections_total == 1


def test_a_success_resets_the_failure_count() -> None:
    t = tracker([A, B], consecutive_failures=3)
    for _ in range(10):
        assert fail(t, A, 1.0, 2) == [None, None]
        assert t.record(A, False, 1.0) is None
    assert t.available(A, 1.0)
    assert t.ejections_total == 0


def test_failures_of_one_address_do_not_count_for_another() -> None:
    t = tracker([A, B, C, D], consecutive_failures=3)
    for _ in range(2):
        for address in (A, B, C, D):
            assert t.record(address, True, 0.0) is None
    assert t.ejected(0.0) == []


def test_returns_when_the_ejection_time_has_passed() -> None:
    t = tracker([A, B], consecutive_failures=2, base_time=5.0)
    assert fail(t, A, 100.0, 2)[-1] == 5.0
    assert not t.available(A, 104.999)
    assert t.available(A, 105.0)
    assert t.ejected(105.0) == []


def test_ejection_time_doubles_and_is_capped() -> None:
    t = tracker([A, B], consecutive_failures=2, base_time=1.0, max_time=10.0)
    now = 0.0
    durations = []
    for _ in range(7):
        duration = fail(t, A, now, 2)[-1]
        assert duration is not None
        durations.append(duration)
        assert not t.available(A, now)
        now += duration  # back in rotation, and failing again at once
        assert t.available(A, now)
    assert durations == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert t.ejections_total == 7


def test_a_success_after_returning_resets_the_doubling() -> None:
    t = tracker([A, B], consecutive_failures=2, base_time=1.0, max_time=100.0)
    assert fail(t, A, 0.0, 2)[-1] == 1.0
    assert fail(t, A, 1.0, 2)[-1] == 2.0
    assert t.record(A, False, 3.0) is None  # returned at 3.0 and answered
    assert fail(t, A, 3.0, 2)[-1] == 1.0


def test_a_success_while_still_ejected_does_not_reset_the_doubling() -> None:
    # A call that was in flight when the address was ejected says little about later.
    t = tracker([A, B], consecutive_failures=2, base_time=1.0, max_time=100.0)
    assert fail(t, A, 0.0, 2)[-1] == 1.0
    assert t.record(A, False, 0.5) is None
    assert fail(t, A, 1.0, 2)[-1] == 2.0


def test_failures_while_ejected_do_not_extend_the_ejection() -> None:
    t = tracker([A, B], consecutive_failures=2, base_time=4.0)
    assert fail(t, A, 0.0, 2)[-1] == 4.0
    assert fail(t, A, 1.0, 10) == [None] * 10
    assert t.available(A, 4.0)
    assert t.ejections_total == 1


def test_a_lone_address_is_never_ejected() -> None:
    t = tracker([A], consecutive_failures=1, max_percent=100)
    for step in range(50):
        assert t.record(A, True, float(step)) is None
        assert t.available(A, float(step))
    assert t.ejected(100.0) == []
    assert t.ejections_total == 0


def test_two_addresses_at_fifty_percent_at_most_one_out() -> None:
    t = tracker([A, B], consecutive_failures=1, max_percent=50)
    assert t.record(A, True, 0.0) == 1.0
    for _ in range(20):
        assert t.record(B, True, 0.5) is None
    assert t.ejected(0.5) == [A]
    assert t.available(B, 0.5)
    # Once A is back, B may go (its failures kept counting).
    assert t.record(B, True, 1.0) == 1.0
    assert t.ejected(1.0) == [B]


@pytest.mark.parametrize(
    ("n", "max_percent", "allowed"),
    [
        (2, 100, 1),  # never the last one, whatever the share
        (3, 100, 2),
        (4, 50, 2),
        (4, 49, 1),
        (3, 50, 1),
        (10, 10, 1),
        (10, 9, 0),
        (5, 0, 0),
        (1, 100, 0),
    ],
)
def test_never_more_than_max_percent_and_never_all(n: int, max_percent: int, allowed: int) -> None:
    addresses = [f"10.0.1.{i}:9091" for i in range(n)]
    t = tracker(addresses, consecutive_failures=1, max_percent=max_percent)
    for _ in range(3):
        for address in addresses:
            t.record(address, True, 0.0)
    assert len(t.ejected(0.0)) == allowed
    assert t.ejections_total == allowed
    assert any(t.available(a, 0.0) for a in addresses)


@given(
    n=st.integers(min_value=1, max_value=6),
    max_percent=st.integers(min_value=0, max_value=100),
    threshold=st.integers(min_value=1, max_value=4),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=5), st.booleans(), st.floats(0.0, 3.0)),
        max_size=200,
    ),
)
@settings(max_examples=200, deadline=None)
def test_share_limit_holds_for_any_history(
    n: int,
    max_percent: int,
    threshold: int,
    steps: list[tuple[int, bool, float]],
) -> None:
    addresses = [f"10.0.2.{i}:9091" for i in range(n)]
    t = tracker(
        addresses,
        consecutive_failures=threshold,
        base_time=1.0,
        max_time=8.0,
        max_percent=max_percent,
    )
    limit = min(n - 1, n * max_percent // 100)
    now = 0.0
    ejections = 0
    for index, failed, advance in steps:
        now += advance
        address = addresses[index % n]
        duration = t.record(address, failed, now)
        if duration is not None:
            ejections += 1
            assert failed
            assert 1.0 <= duration <= 8.0
            assert t.ejected(now).count(address) == 1
        out = t.ejected(now)
        assert len(out) <= limit
        assert len(out) < n  # never all of them
        assert [a for a in addresses if not t.available(a, now)] == out
    assert t.ejections_total == ejections


# held ejections: health checks on


def test_held_ejection_lasts_until_readmitted() -> None:
    t = tracker([A, B], consecutive_failures=2, base_time=1.0)
    t.hold(True, 0.0)
    assert fail(t, A, 10.0, 2)[-1] == math.inf
    assert not t.available(A, 10.0 + 1e6)
    assert t.readmit(A, 20.0)
    assert t.available(A, 20.0)
    assert not t.readmit(A, 21.0)  # already in


def test_take_out_ignores_the_share_limit() -> None:
    t = tracker([A, B], max_percent=0)
    t.hold(True, 0.0)
    assert t.take_out(A, 1.0)
    assert t.take_out(B, 1.0)
    assert t.ejected(2.0) == [A, B]
    assert not t.take_out(A, 3.0)  # already out


def test_turning_holds_on_and_off_keeps_who_is_out() -> None:
    t = tracker([A, B], consecutive_failures=1, base_time=1.0, max_time=30.0)
    assert fail(t, A, 10.0, 1) == [1.0]  # timed: out until 11
    t.hold(True, 10.5)
    assert not t.available(A, 100.0)  # held now
    t.hold(False, 100.0)
    assert not t.available(A, 100.5)
    assert t.available(A, 101.0)  # its timed length (1 s) from when holding stopped
