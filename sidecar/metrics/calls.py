"""The metrics that change on every call, kept as plain numbers and exported on scrape.

``requests_total``, ``request_duration_seconds`` and ``upstream_attempts_total``
per method label (`MethodStats`), exported by one collector (`CallMetrics`)
registered in the `SidecarMetrics` registry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import ClassVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.metrics.labels import PREFIX, split_name

# Latency buckets in seconds: 250 µs to 10 s, denser where a proxied call
# usually lands (sub-millisecond to tens of milliseconds).
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class MethodStats:
    """The per-call figures of one method label (see `CallMetrics`)."""

    __slots__ = ("attempts", "buckets", "duration_sum", "label", "method", "requests", "service")

    def __init__(self, label: str) -> None:
        self.label = label
        self.service, self.method = split_name(label)
        self.requests: dict[str, int] = {}
        self.attempts: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.duration_sum = 0.0

    def request(self, outcome: str, seconds: float) -> None:
        """One call answered, with the outcome the client saw, after ``seconds``."""
        requests = self.requests
        requests[outcome] = requests.get(outcome, 0) + 1
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def attempt(self, address: str, result: str) -> None:
        """One attempt made on an upstream address."""
        key = (address, result)
        attempts = self.attempts
        attempts[key] = attempts.get(key, 0) + 1


class CallMetrics(Collector):
    """The metrics that change on every call, as plain numbers, exported on scrape.

    ``requests_total``, ``request_duration_seconds`` and
    ``upstream_attempts_total`` are updated two or three times per call.
    prometheus_client's Counter and Histogram take a lock and several method
    calls per update, about 1 µs per call in all (measured); here an update is
    a dict increment and a bisect. Updates and scrapes both run on the event
    loop's thread, so nothing is shared across threads. The exposition is the
    same as prometheus_client's own types would give.
    """

    # Exported names and their labels.
    LABELS: ClassVar[dict[str, tuple[str, ...]]] = {
        PREFIX + "requests_total": ("service", "method", "outcome"),
        PREFIX + "request_duration_seconds": ("service", "method"),
        PREFIX + "upstream_attempts_total": ("upstream", "method", "result"),
    }

    def __init__(self) -> None:
        self._methods: dict[str, MethodStats] = {}

    def method(self, label: str) -> MethodStats:
        """The figures of one method label, made on first use."""
        stats = self._methods.get(label)
        if stats is None:
            stats = self._methods[label] = MethodStats(label)
        return stats

    def describe(self) -> list[Metric]:
        return list(self._families())

    def collect(self) -> Iterator[Metric]:
        requests, durations, attempts = self._families()
        bounds = [repr(float(b)) for b in LATENCY_BUCKETS] + ["+Inf"]
        for stats in list(self._methods.values()):
            for outcome, count in list(stats.requests.items()):
                requests.add_metric([stats.service, stats.method, outcome], count)
            cumulative = []
            total = 0
            for bound, count in zip(bounds, stats.buckets, strict=True):
                total += count
                cumulative.append((bound, total))
            durations.add_metric([stats.service, stats.method], cumulative, stats.duration_sum)
            for (address, result), count in list(stats.attempts.items()):
                attempts.add_metric([address, stats.label, result], count)
        yield requests
        yield durations
        yield attempts

    @classmethod
    def _families(cls) -> tuple[CounterMetricFamily, HistogramMetricFamily, CounterMetricFamily]:
        labels = cls.LABELS
        return (
            CounterMetricFamily(
                PREFIX + "requests",
                "Client calls answered, by the outcome the client saw.",
                labels=labels[PREFIX + "requests_total"],
            ),
            HistogramMetricFamily(
                PREFIX + "request_duration_seconds",
                "Time from a call's arrival at the pipeline to its reply (or fallback) being "
                "ready, retries and waits included.",
                labels=labels[PREFIX + "request_duration_seconds"],
            ),
            CounterMetricFamily(
                PREFIX + "upstream_attempts",
                "Attempts sent (or tried) to an upstream address, by result.",
                labels=labels[PREFIX + "upstream_attempts_total"],
            ),
        )
