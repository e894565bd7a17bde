"""The metrics that change on every call, kept as plain numbers and exported on scrape.

``requests_total``, ``request_duration_seconds`` and ``upstream_attempts_total``
per method label (`MethodStats`), exported by one collector (`CallMetrics`)
registered in the `SidecarMetrics` registry.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import ClassVar, Final

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar.metrics.labels import PREFIX, split_name

# Latency buckets in seconds: 250 µs to 10 s, denser where a proxied call
# usually lands (sub-millisecond to tens of milliseconds). Typed as a tuple of any
# length: the compiled build keeps a fixed-length tuple of floats unboxed and would
# box all of them again for every bisect.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
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
    a dict increment and a bisect, on the event loop's thread, without a
    lock; a scrape on the render thread reads copies (`_copies`). The
    exposition is the same as prometheus_client's own types would give.
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
        for stats, counts, buckets, duration_sum, tries in self._copies():
            for outcome, count in counts.items():
                requests.add_metric([stats.service, stats.method, outcome], count)
            cumulative = []
            total = 0
            for bound, count in zip(bounds, buckets, strict=True):
                total += count
                cumulative.append((bound, total))
            durations.add_metric([stats.service, stats.method], cumulative, duration_sum)
            for (address, result), count in tries.items():
                attempts.add_metric([address, stats.label, result], count)
        yield requests
        yield durations
        yield attempts

    def _copies(
        self,
    ) -> list[
        tuple[MethodStats, dict[str, int], tuple[int, ...], float, dict[tuple[str, str], int]]
    ]:
        """Each method's figures, copied so that the loop may go on counting meanwhile.

        Scrapes run on a render thread (`sidecar.admin.render`) while the loop
        updates these dicts. Each copy is one call into C (``list``, ``dict``,
        ``tuple`` of a builtin container with str keys), which CPython runs
        without letting another thread in, so no copy sees a dict change size.
        Figures of different methods may be a few calls apart, as with any
        scrape; the figures of one container are consistent.
        """
        return [
            (s, dict(s.requests), tuple(s.buckets), s.duration_sum, dict(s.attempts))
            for s in list(self._methods.values())
        ]

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
