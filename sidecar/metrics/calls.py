"""The metrics that change on every call, kept as plain numbers and exported on scrape.

``requests_total``, ``request_duration_seconds`` and ``upstream_attempts_total``
per method label (`MethodStats`), exported by one collector (`CallMetrics`)
registered in the `SidecarMetrics` registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar, Final, NamedTuple

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


class Count:
    """One counter: a plain int the compiled build increments in place.

    A dict of ``str -> int`` costs a lookup, a boxed int and a store per
    update; a dict of ``Count`` costs the lookup only, and the store goes to a
    native attribute. A scrape reads ``value`` from another thread: each read
    is of one whole int.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


# What `MethodStats` holds as its last count before its first update: counted
# into by nobody (no str is None), exported by nobody.
_UNUSED: Final = Count()


class MethodStats:
    """The per-call figures of one method label (see `CallMetrics`)."""

    __slots__ = (
        "_last_address",
        "_last_attempt",
        "_last_outcome",
        "_last_request",
        "_last_result",
        "attempts",
        "buckets",
        "duration_sum",
        "label",
        "method",
        "requests",
        "service",
    )

    def __init__(self, label: str) -> None:
        self.label = label
        self.service, self.method = split_name(label)
        self.requests: dict[str, Count] = {}
        # upstream address -> result -> count: two lookups of str keys, no tuple
        # to build and hash on each attempt.
        self.attempts: dict[str, dict[str, Count]] = {}
        # One per bound, and the last one for +Inf.
        self.buckets = [Count() for _ in range(len(LATENCY_BUCKETS) + 1)]
        self.duration_sum = 0.0
        # The count updated last, with its key: a method's calls mostly repeat one
        # outcome on one address, and come with the same str objects (the outcome's
        # label, the pool's address), so a comparison of identities finds it again
        # without a dict lookup (about 130 instructions each in the compiled build).
        # Any other str, equal or not, takes the dicts' way.
        self._last_outcome: str | None = None
        self._last_request = _UNUSED
        self._last_address: str | None = None
        self._last_result: str | None = None
        self._last_attempt = _UNUSED

    def request(self, outcome: str, seconds: float) -> None:
        """One call answered, with the outcome the client saw, after ``seconds``."""
        if outcome is self._last_outcome:
            count = self._last_request
        else:
            found = self.requests.get(outcome)
            if found is None:
                found = self.requests[outcome] = Count()
            count = self._last_request = found
            self._last_outcome = outcome
        count.value += 1
        # bisect_left by hand, from the bottom: most calls land in the first
        # few buckets, and the compiled build compares unboxed floats here
        # where bisect would be a call into C comparing float objects.
        bounds = LATENCY_BUCKETS
        last = len(bounds)
        i = 0
        while i < last and bounds[i] < seconds:
            i += 1
        self.buckets[i].value += 1
        self.duration_sum += seconds

    def attempt(self, address: str, result: str) -> None:
        """One attempt made on an upstream address."""
        if address is self._last_address and result is self._last_result:
            self._last_attempt.value += 1
            return
        results = self.attempts.get(address)
        if results is None:
            results = self.attempts[address] = {}
        count = results.get(result)
        if count is None:
            count = results[result] = Count()
        count.value += 1
        self._last_address = address
        self._last_result = result
        self._last_attempt = count

    def show_request(self, outcome: str) -> None:
        """Export the ``outcome`` series of requests_total from now on, at zero until counted."""
        if outcome not in self.requests:
            self.requests[outcome] = Count()

    def show_attempt(self, address: str, result: str) -> None:
        """Export the (``address``, ``result``) series of upstream_attempts_total from now on."""
        results = self.attempts.setdefault(address, {})
        if result not in results:
            results[result] = Count()

    def copy(self) -> MethodFigures:
        """The figures as plain numbers, read while the loop may go on counting.

        Scrapes run on a render thread (`sidecar.admin.render`) while the loop
        updates these containers. Each container is first copied by one call
        into C (``list`` of a builtin dict's items or of a list), which CPython
        runs without letting another thread in, so no copy sees a dict change
        size; the counts are then read one by one. Figures of one method may be
        a few calls apart, as with any scrape of figures kept apart.
        """
        requests = {outcome: count.value for outcome, count in list(self.requests.items())}
        buckets = tuple(count.value for count in list(self.buckets))
        attempts = {
            (address, result): count.value
            for address, results in list(self.attempts.items())
            for result, count in list(results.items())
        }
        return MethodFigures(self, requests, buckets, self.duration_sum, attempts)


class MethodFigures(NamedTuple):
    """One method's figures copied for a scrape (`MethodStats.copy`)."""

    stats: MethodStats
    requests: dict[str, int]
    buckets: tuple[int, ...]
    duration_sum: float
    attempts: dict[tuple[str, str], int]


class CallMetrics(Collector):
    """The metrics that change on every call, as plain numbers, exported on scrape.

    ``requests_total``, ``request_duration_seconds`` and
    ``upstream_attempts_total`` are updated two or three times per call.
    prometheus_client's Counter and Histogram take a lock and several method
    calls per update, about 1 µs per call in all (measured); here an update is
    a dict lookup or two and an increment of a `Count`, on the event loop's
    thread, without a lock; a scrape on the render thread reads copies
    (`MethodStats.copy`). The
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

    def _copies(self) -> list[MethodFigures]:
        """Each method's figures, copied so that the loop may go on counting meanwhile."""
        return [stats.copy() for stats in list(self._methods.values())]

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
