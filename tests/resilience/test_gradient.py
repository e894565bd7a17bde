"""Envoy's gradient controller with a fake clock: minRTT measurement, windows, the formula."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from sidecar.resilience.gradient import GradientLimit, GradientSettings
from sidecar.resilience.limits import ConcurrencyLimit

SETTINGS = GradientSettings(
    min_concurrency=2,
    max_concurrency=100,
    update_interval=0.1,
    sample_percentile=50,
    min_rtt_interval=10.0,
    min_rtt_requests=5,
    min_rtt_buffer=25,
    jitter=0,
)


def measured(settings: GradientSettings = SETTINGS, rtt: float = 0.010) -> GradientLimit:
    """A controller whose first minRTT measurement (``rtt`` each call) is done, at t = 1."""
    g = GradientLimit(settings, random.Random(1))
    g.advance(0.0)
    assert g.measuring
    assert g.limit == settings.min_concurrency
    for i in range(settings.min_rtt_requests):
        g.sample(0.0 + i * 0.001, 0.0 + i * 0.001 + rtt)
    assert not g.measuring
    assert g.min_rtt == pytest.approx(rtt)
    return g


def window(g: GradientLimit, start: float, rtts: list[float]) -> None:
    """Calls finishing within one window from ``start``, then the window closes."""
    g.advance(start)  # closes the window before (empty: no change)
    for rtt in rtts:
        g.sample(start, start + rtt)
    g.advance(start + g.settings.update_interval + 0.05)


def expected(limit: int, min_rtt: float, sample_rtt: float, buffer: float = 25) -> int:
    gradient = max(0.5, min(2.0, min_rtt * (1 + buffer / 100) / sample_rtt))
    scaled = limit * gradient
    return max(2, min(100, int(scaled + math.sqrt(scaled))))


def test_the_first_call_starts_a_min_rtt_measurement_at_min_concurrency() -> None:
    g = GradientLimit(SETTINGS, random.Random(1))
    g.advance(5.0)
    assert g.measuring
    assert g.limit == 2
    for i in range(4):
        g.sample(5.0, 5.02 + i * 0.01)
    assert g.measuring, "five calls make a measurement"
    g.sample(5.0, 5.01)
    assert not g.measuring
    assert g.min_rtt == pytest.approx(0.03)  # the median of 20, 30, 40, 50 and 10 ms
    assert g.limit == 2  # the limit before the measurement: min_concurrency at the start


def test_calls_that_started_before_the_measurement_give_no_sample() -> None:
    g = GradientLimit(SETTINGS, random.Random(1))
    g.advance(1.0)
    for _ in range(10):
        g.sample(0.5, 1.5)  # started before the measurement began
    assert g.measuring
    assert g.min_rtt is None


def test_latency_near_min_rtt_grows_the_limit_and_a_queue_shrinks_it() -> None:
    g = measured(rtt=0.010)
    t = 1.0
    window(g, t, [0.010] * 20)  # gradient 1.25: growth plus headroom
    assert g.limit == expected(2, 0.010, 0.010)
    limits = [g.limit]
    for _ in range(6):
        t += 0.2
        window(g, t, [0.010] * 20)
        limits.append(g.limit)
    assert limits == sorted(limits)
    assert limits[-1] > limits[0]
    grown = g.limit
    t += 0.2
    window(g, t, [0.080] * 20)  # eight times slower: the gradient stops at 0.5
    assert g.limit == expected(grown, 0.010, 0.080)
    assert g.limit < grown


def test_the_gradient_is_clamped_and_the_limit_kept_in_range() -> None:
    g = measured(rtt=0.010)
    t = 1.0
    for _ in range(40):  # very fast calls: the gradient is at most 2
        t += 0.2
        before = g.limit
        window(g, t, [0.0001] * 20)
        assert g.limit == expected(before, 0.010, 0.0001)
    assert g.limit == 100  # max_concurrency


def test_the_window_percentile_is_used() -> None:
    settings = GradientSettings(**{**_fields(SETTINGS), "sample_percentile": 90})
    g = measured(settings, rtt=0.010)
    window(g, 1.0, [0.010] * 80 + [0.050] * 20)
    assert g.sample_rtt == pytest.approx(0.050)


def test_min_rtt_is_measured_again_after_its_interval_with_jitter() -> None:
    settings = GradientSettings(**{**_fields(SETTINGS), "jitter": 15})
    g = GradientLimit(settings, random.Random(3))
    g.advance(0.0)
    for _ in range(5):
        g.sample(0.0, 0.01)
    window(g, 1.0, [0.01] * 5)
    grown = g.limit
    g.advance(10.0)  # the interval, without its jitter: not yet
    assert not g.measuring
    g.advance(11.51)  # past the interval plus 15 %
    assert g.measuring
    assert g.limit == 2
    for _ in range(5):
        g.sample(11.6, 11.62)
    assert not g.measuring
    assert g.min_rtt == pytest.approx(0.02)
    assert g.limit == grown  # restored


def test_five_windows_at_min_concurrency_measure_min_rtt_again() -> None:
    g = measured(rtt=0.010)
    t = 1.0
    for n in range(1, 6):
        t += 0.2
        window(g, t, [1.0] * 5)  # a hundred times min_rtt: the limit stays at the floor
        assert g.limit == 2
        assert g.measuring == (n == 5), n


def test_no_calls_no_change() -> None:
    g = measured()
    before = g.limit
    for t in (1.0, 2.0, 5.0, 9.9):
        g.advance(t)
    assert g.limit == before
    assert g.sample_rtt is None


def test_a_fixed_limit_is_a_ceiling_over_the_adaptive_one() -> None:
    g = measured(rtt=0.010)
    t = 1.0
    for _ in range(20):
        t += 0.2
        window(g, t, [0.005] * 20)
    assert g.limit > 10
    limit = ConcurrencyLimit(10, g)
    assert limit.limit == 10
    assert all(limit.try_acquire(t) for _ in range(10))
    assert not limit.try_acquire(t)
    limit.configure(None, g)
    assert limit.limit == g.limit
    assert limit.try_acquire(t)


def test_releases_feed_the_adaptive_limit() -> None:
    g = GradientLimit(SETTINGS, random.Random(1))
    limit = ConcurrencyLimit(None, g)
    assert limit.try_acquire(0.0)  # starts the measurement: 2 at once
    assert limit.try_acquire(0.0)
    assert not limit.try_acquire(0.0)
    limit.release(0.0, 0.01)
    limit.release()  # no sample (a failed or retried call)
    assert g.measuring
    for _ in range(4):
        assert limit.try_acquire(0.02)
        limit.release(0.02, 0.03)
    assert not g.measuring
    assert g.min_rtt == pytest.approx(0.01)


def _fields(settings: GradientSettings) -> dict[str, float]:
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings)}
