"""Every metric the sidecar exports, defined in one place.

Names follow the Prometheus conventions (prefix ``thrift_sidecar_``, base
units, ``_total`` for counters) and the list in the design (§8). Metrics live
in a registry owned by the `SidecarMetrics` instance, never the global
default, so tests and several sidecars in one process do not collide.

Method names arrive on the wire, so their label values are capped
(`MethodLabels`): names known from the config or the IDL always get their own
label, other names get one until ``max_method_labels`` distinct names are in
use, and everything after that is ``other``. A client cannot blow up the
series count.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__

PREFIX = "thrift_sidecar_"
OTHER = "other"

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


class MethodLabels:
    """Maps wire method names to a bounded set of label values."""

    def __init__(self, known: Iterable[str], limit: int) -> None:
        self._labels: dict[str, str] = {}
        self._limit = limit
        for name in known:
            self._labels[name] = name
        self._free = max(0, limit - len(self._labels))

    def label(self, name: str) -> str:
        """The label value for a method name (``Service:method`` or bare)."""
        found = self._labels.get(name)
        if found is not None:
            return found
        if self._free > 0:
            self._free -= 1
            self._labels[name] = name
            return name
        return OTHER

    def known(self) -> list[str]:
        """Label values in use."""
        return sorted(set(self._labels.values()))


def split_name(name: str) -> tuple[str, str]:
    """``"Svc:m"`` → ("Svc", "m"); a bare name has service ``""``."""
    service, sep, method = name.rpartition(":")
    return (service, method) if sep else ("", name)


class SidecarMetrics:
    """The sidecar's metrics, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = PREFIX
        # requests_total, request_duration_seconds, upstream_attempts_total
        self.calls = CallMetrics()
        r.register(self.calls)
        self.retries = Counter(
            p + "retries_total",
            "Retries made, by the outcome of the attempt that was retried.",
            ["method", "reason"],
            registry=r,
        )
        self.retries_given_up = Counter(
            p + "retries_given_up_total",
            "Failed attempts not retried, by why not.",
            ["method", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            p + "retry_budget_exhausted_total",
            "Retries refused because the upstream's retry budget was empty.",
            ["upstream"],
            registry=r,
        )
        self.retry_budget_tokens = Gauge(
            p + "retry_budget_tokens",
            "Retry tokens available now.",
            ["upstream"],
            registry=r,
        )
        self.breaker_state = Gauge(
            p + "breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["breaker"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            p + "breaker_transitions_total",
            "Circuit breaker state changes.",
            ["breaker", "from_state", "to_state"],
            registry=r,
        )
        self.breaker_last_opened = Gauge(
            p + "breaker_last_opened_timestamp_seconds",
            "Unix time the breaker last opened (0: never).",
            ["breaker"],
            registry=r,
        )
        self.breaker_rejections = Counter(
            p + "breaker_rejections_total",
            "Calls not sent because the breaker was open (or its probes were all in use).",
            ["breaker"],
            registry=r,
        )
        self.breaker_failures = Gauge(
            p + "breaker_consecutive_failures",
            "Consecutive failures counted by the breaker.",
            ["breaker"],
            registry=r,
        )
        self.upstream_ejections = Counter(
            p + "upstream_ejections_total",
            "Upstream addresses taken out of rotation after repeated failures.",
            ["upstream"],
            registry=r,
        )
        self.upstream_ejected = Gauge(
            p + "upstream_ejected",
            "1 while the upstream address is out of rotation.",
            ["upstream"],
            registry=r,
        )
        self.upstream_connections = Gauge(
            p + "upstream_connections",
            "Open connections to an upstream address, by whether they are in use.",
            ["upstream", "state"],
            registry=r,
        )
        self.fallback_replies = Counter(
            p + "fallback_replies_total",
            "Replies served from a fallback instead of the upstream, by source.",
            ["method", "source"],
            registry=r,
        )
        self.fallback_cache_entries = Gauge(
            p + "fallback_cache_entries", "Entries in the fallback cache.", registry=r
        )
        self.fallback_cache_bytes = Gauge(
            p + "fallback_cache_bytes", "Bytes held by the fallback cache.", registry=r
        )
        self.client_connections = Gauge(
            p + "client_connections", "Open client connections.", registry=r
        )
        self.client_connections_rejected = Counter(
            p + "client_connections_rejected_total",
            "Client connections closed at once because max_connections was reached.",
            registry=r,
        )
        self.client_idle_closes = Counter(
            p + "client_idle_closes_total",
            "Client connections closed after idle_timeout without a call.",
            registry=r,
        )
        self.protocol_errors = Counter(
            p + "protocol_errors_total",
            "Client connections closed for breaking the protocol, by kind.",
            ["kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            p + "config_reloads_total",
            "Config reloads (SIGHUP), by result.",
            ["result"],
            registry=r,
        )
        self.state_backend_errors = Counter(
            p + "state_backend_errors_total",
            "Failed operations on the shared state backend (Redis), by operation.",
            ["operation"],
            registry=r,
        )
        self.state_backend_up = Gauge(
            p + "state_backend_up",
            "1 while the shared state backend answers, 0 when not, absent in local mode.",
            registry=r,
        )
        self.build_info = Gauge(
            p + "build_info", "Always 1; the labels tell the version.", ["version"], registry=r
        )
        self.build_info.labels(__version__).set(1)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)


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

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, HistogramMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                PREFIX + "requests",
                "Client calls answered, by the outcome the client saw.",
                labels=["service", "method", "outcome"],
            ),
            HistogramMetricFamily(
                PREFIX + "request_duration_seconds",
                "Time from a call's arrival to its reply being written, retries included.",
                labels=["service", "method"],
            ),
            CounterMetricFamily(
                PREFIX + "upstream_attempts",
                "Attempts sent (or tried) to an upstream address, by result.",
                labels=["upstream", "method", "result"],
            ),
        )
