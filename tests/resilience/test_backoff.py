"""Full-jitter exponential backoff: exact values with a seeded generator, bounds always."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.backoff import Backoff

initials = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)
multipliers = st.floats(min_value=1.0, max_value=10.0, allow_nan=False)
maxima = st.floats(min_value=0.0, max_value=100.0, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


def reference_wait(
    rng: random.Random, initial: float, multiplier: float, maximum: float, n: int
) -> float:
    """The design's formula, written out (design §4)."""
    return rng.uniform(0, min(maximum, initial * multiplier ** (n - 1)))


def test_known_caps() -> None:
    backoff = Backoff(initial=0.025, multiplier=2.0, maximum=1.0)
    assert [backoff.cap(n) for n in range(1, 10)] == [
        0.025,
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
        1.0,
    ]


def test_retry_numbers_start_at_one() -> None:
    backoff = Backoff(initial=0.1, multiplier=2.0, maximum=1.0)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="start at 1"):
            backoff.cap(bad)
        with pytest.raises(ValueError, match="start at 1"):
            backoff.wait(bad, random.Random(1))


@given(initial=initials, multiplier=multipliers, maximum=maxima, seed=seeds)
@settings(max_examples=80, deadline=None)
def test_waits_are_exactly_the_full_jitter_values(
    initial: float, multiplier: float, maximum: float, seed: int
) -> None:
    backoff = Backoff(initial=initial, multiplier=multiplier, maximum=maximum)
    rng, rng2 = random.Random(seed), random.Random(seed)
    for n in range(1, 60):  # 10.0 ** 59 * 10 is still a finite float
        expected = reference_wait(rng2, initial, multiplier, maximum, n)
        assert backoff.wait(n, rng) == expected, n


@pytest.mark.parametrize(
    ("initial", "multiplier", "maximum"),
    [(0.03, 1.7, 1e9), (0.001, 1.1, 1e9), (0.025, 3.0, 2.0), (0.3, 1.5, 0.2)],
)
def test_exact_for_multipliers_whose_powers_round(
    initial: float, multiplier: float, maximum: float
) -> None:
    # A running product (x *= m) drifts from initial * m ** k after a few steps for
    # such multipliers; the waits must follow the formula, not the running product.
    backoff = Backoff(initial=initial, multiplier=multiplier, maximum=maximum)
    rng, rng2 = random.Random(42), random.Random(42)
    for n in range(1, 100):
        assert backoff.cap(n) == min(maximum, initial * multiplier ** (n - 1)), n
        assert backoff.wait(n, rng) == reference_wait(rng2, initial, multiplier, maximum, n)


huge = st.one_of(
    st.integers(min_value=1, max_value=2_000),
    st.integers(min_value=10**6, max_value=10**30),
    st.sampled_from([2**63, 10**100, 10**400]),
)


@pytest.mark.timeout(60)
@given(initial=initials, multiplier=multipliers, maximum=maxima, n=huge, seed=seeds)
@settings(max_examples=200, deadline=None)
def test_always_within_bounds_even_for_huge_n(
    initial: float, multiplier: float, maximum: float, n: int, seed: int
) -> None:
    backoff = Backoff(initial=initial, multiplier=multiplier, maximum=maximum)
    cap = backoff.cap(n)
    assert 0.0 <= cap <= maximum
    # The multiplier is at least 1, so no cap is below the first one.
    assert cap >= min(maximum, initial)
    wait = backoff.wait(n, random.Random(seed))
    assert 0.0 <= wait <= cap


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("initial", "multiplier", "maximum", "expected"),
    [
        (0.0, 2.0, 1.0, 0.0),  # zero initial backoff: zero forever
        (0.1, 1.0, 1.0, 0.1),  # multiplier 1: constant
        (0.1, 2.0, 1.0, 1.0),  # past the cap
        (0.1, 1.0000001, 5.0, 5.0),  # slow growth still reaches the cap
        (2.0, 2.0, 1.0, 1.0),  # initial above the cap
    ],
)
def test_huge_retry_numbers_finish_and_do_not_overflow(
    initial: float, multiplier: float, maximum: float, expected: float
) -> None:
    backoff = Backoff(initial=initial, multiplier=multiplier, maximum=maximum)
    for n in (10**9, 10**18, 10**30):
        assert backoff.cap(n) == expected


def test_integer_settings_do_not_build_huge_integers() -> None:
    # Backoff(1, 2, 60) with ints: 2 ** (10 ** 12) as an int would never finish.
    backoff = Backoff(initial=1, multiplier=2, maximum=60)
    assert backoff.cap(10**12) == 60
    assert backoff.cap(3) == 4


def test_jitter_spreads_over_the_whole_range() -> None:
    backoff = Backoff(initial=1.0, multiplier=2.0, maximum=4.0)
    rng = random.Random(7)
    waits = [backoff.wait(3, rng) for _ in range(2_000)]
    assert min(waits) < 0.05 * 4.0
    assert max(waits) > 0.95 * 4.0
    assert all(0.0 <= w <= 4.0 for w in waits)
    # Roughly uniform: each quarter gets a fair share.
    quarters = [sum(1 for w in waits if q <= w < q + 1.0) for q in range(4)]
    assert min(quarters) > 2_000 / 4 * 0.8


def test_seeded_generators_give_reproducible_waits() -> None:
    backoff = Backoff(initial=0.05, multiplier=2.0, maximum=1.0)
    first = [backoff.wait(n, random.Random(3)) for n in range(1, 8)]
    again = [backoff.wait(n, random.Random(3)) for n in range(1, 8)]
    other = [backoff.wait(n, random.Random(4)) for n in range(1, 8)]
    assert first == again
    assert first != other
