"""`LatencyWindow`: the recent answer times of a method and their percentile (the ``pNN`` delay)."""

from __future__ import annotations

import random

import pytest

from sidecar.resilience.latency import LatencyWindow


def test_no_value_until_min_samples() -> None:
    window = LatencyWindow(100, min_samples=10)
    for i in range(9):
        window.add(0.001 * (i + 1))
        assert window.percentile(95) is None
    window.add(0.010)
    assert window.percentile(95) == 0.010


def test_nearest_rank_percentile() -> None:
    window = LatencyWindow(100, min_samples=1)
    samples = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    random.Random(3).shuffle(samples)
    for s in samples:
        window.add(s)
    assert window.percentile(50) == 0.050
    assert window.percentile(95) == 0.095
    assert window.percentile(99) == 0.099
    assert window.percentile(99.9) == 0.100
    assert window.percentile(1) == 0.001


def test_only_the_most_recent_samples_count() -> None:
    window = LatencyWindow(50, min_samples=10)
    for _ in range(50):
        window.add(0.200)  # an old slow period
    for _ in range(50):
        window.add(0.002)  # replaced entirely by fast answers
    assert len(window) == 50
    assert window.percentile(95) == 0.002


def test_the_value_follows_recent_latency_within_a_refresh() -> None:
    """The percentile is computed again after 5% of the window is replaced, not per sample."""
    window = LatencyWindow(1000, min_samples=100)
    for _ in range(1000):
        window.add(0.001)
    assert window.percentile(95) == 0.001
    for _ in range(49):
        window.add(0.100)
    assert window.percentile(95) == 0.001  # kept: 49 < 50 new samples
    window.add(0.100)
    assert window.percentile(95) == 0.001  # 50 slow of 1000: the 95th is still fast
    for _ in range(50):
        window.add(0.100)
    assert window.percentile(95) == 0.100  # 100 slow of 1000: now above the 95th


def test_another_percentile_is_computed_at_once() -> None:
    window = LatencyWindow(100, min_samples=1)
    for i in range(1, 101):
        window.add(float(i))
    assert window.percentile(50) == 50.0
    assert window.percentile(90) == 90.0


def test_sizes() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        LatencyWindow(0, 1)
    window = LatencyWindow(5, min_samples=50)  # min_samples capped at the size
    for _ in range(5):
        window.add(1.0)
    assert window.percentile(50) == 1.0
