"""The concurrency limit's bookkeeping: slots taken and given back, shedding, a changed limit."""

from __future__ import annotations

import random

import pytest

from sidecar.resilience.limits import ConcurrencyLimit


def test_calls_over_the_limit_are_shed_until_a_slot_is_given_back() -> None:
    limit = ConcurrencyLimit(2)
    assert limit.try_acquire()
    assert limit.try_acquire()
    assert not limit.try_acquire()
    assert not limit.try_acquire()
    assert (limit.in_flight, limit.shed) == (2, 2)
    limit.release()
    assert limit.try_acquire()
    assert (limit.in_flight, limit.shed) == (2, 2)


def test_no_limit_counts_but_never_sheds() -> None:
    limit = ConcurrencyLimit(None)
    for _ in range(1000):
        assert limit.try_acquire()
    assert (limit.in_flight, limit.shed, limit.limit) == (1000, 0, None)


def test_a_lower_limit_keeps_the_calls_in_flight_and_sheds_new_ones() -> None:
    limit = ConcurrencyLimit(4)
    for _ in range(4):
        assert limit.try_acquire()
    limit.configure(2)
    assert not limit.try_acquire()
    limit.release()
    limit.release()
    assert limit.in_flight == 2
    assert not limit.try_acquire()  # still 2 in flight: at the new limit
    limit.release()
    assert limit.try_acquire()
    limit.configure(None)
    assert limit.try_acquire()
    assert limit.in_flight == 3


def test_a_higher_limit_admits_more_at_once() -> None:
    limit = ConcurrencyLimit(1)
    assert limit.try_acquire()
    assert not limit.try_acquire()
    limit.configure(3)
    assert limit.try_acquire()
    assert limit.try_acquire()
    assert not limit.try_acquire()


@pytest.mark.parametrize("bad", [0, -1])
def test_a_limit_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ConcurrencyLimit(bad)
    limit = ConcurrencyLimit(3)
    with pytest.raises(ValueError, match="at least 1"):
        limit.configure(bad)
    assert limit.limit == 3


def test_giving_back_a_slot_never_taken_is_a_bug() -> None:
    limit = ConcurrencyLimit(1)
    with pytest.raises(RuntimeError, match="never taken"):
        limit.release()


def test_random_interleavings_never_exceed_the_limit() -> None:
    rng = random.Random(11)
    for _ in range(200):
        cap = rng.randint(1, 8)
        limit = ConcurrencyLimit(cap)
        held = admitted = shed = 0
        for _ in range(300):
            if held and rng.random() < 0.45:
                limit.release()
                held -= 1
            elif limit.try_acquire():
                held += 1
                admitted += 1
            else:
                shed += 1
                assert held == cap
            assert limit.in_flight == held <= cap
        assert limit.shed == shed
