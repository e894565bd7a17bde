"""Every metric the sidecar exports, defined in one place.

Names follow the Prometheus conventions (prefix ``thrift_sidecar_``, base
units, ``_total`` for counters) and the list in the design (§8). Metrics live
in a registry owned by the `SidecarMetrics` instance, never the global
default, so tests and several sidecars in one process do not collide.

Method names arrive on the wire, so their label values are capped
(`MethodLabels`): names known from the config or the IDL always get their own
label, other names get one until ``max_method_labels`` distinct names are in
use, and everything after that is ``other``. Every metric with a ``method``
label (and the per-method breakers) uses these values, so a client cannot
blow up the series count.

Series that exist before anything happens: the ``init_*`` methods create the
label sets of what is known at start-up (the upstream and its addresses, the
breakers, the configured and IDL methods, the protocol error kinds) at zero,
so that ``rate()`` and alerts see the first failure rather than a new series.

`LABEL_DOCS` and each metric's help text are what ``docs/metrics-reference.md``
is generated from (``python -m sidecar.docs metrics``).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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

# The `kind` label of client protocol errors: the ``kind=`` values raised in
# sidecar/protocol/ and ``internal`` (a bug caught in server.py). A test in
# tests/ops checks that this list covers the code.
PROTOCOL_ERROR_KINDS = (
    "garbage",
    "oversized",
    "truncated",
    "too_deep",
    "bad_version",
    "bad_type",
    "compact",
    "http",
    "unsupported",
    "internal",
)
# The moves a breaker makes (pybreaker's state names).
BREAKER_TRANSITIONS = (
    ("closed", "open"),
    ("open", "half-open"),
    ("half-open", "open"),
    ("half-open", "closed"),
)
CONNECTION_STATES = ("busy", "idle")
RELOAD_RESULTS = ("ok", "error")

# What each label means, for docs/metrics-reference.md.
LABEL_DOCS: dict[str, str] = {
    "service": "The service part of a multiplexed name (`Interop` in `Interop:getItem`); "
    "empty for a bare name.",
    "method": "The method name. In `requests_total` and `request_duration_seconds` the bare "
    "method (the service has its own label); elsewhere the name as sent, `Service:method` "
    "for multiplexed calls. Capped: names from the config and the IDL, then new names until "
    "`metrics.max_method_labels` are in use, then `other`.",
    "outcome": "What the client got: the last attempt's outcome (`ok`, `declared_exception`, "
    "`app_exception`, `internal_error`, `connect_error`, `connection_closed`, `timeout`, "
    "`protocol_error`), or `fallback` (a cached or static reply), `circuit_open` (rejected "
    "by the breaker, no fallback), `bad_request` (not a CALL or ONEWAY message), "
    "`sidecar_error` (a bug in the sidecar, answered with INTERNAL_ERROR and logged).",
    "upstream": "One upstream address `host:port` (attempts, connections, ejections), or "
    "all the upstream's addresses joined by commas (the retry budget, which they share).",
    "result": "`upstream_attempts_total`: the attempt's outcome (`ok` ... `protocol_error`, "
    "as for `outcome`); `config_reloads_total`: `ok` or `error`.",
    "reason": "`retries_total`: the outcome of the attempt that was retried "
    "(`connect_error`, `connection_closed`, `timeout`, `internal_error`, `protocol_error`). "
    "`retries_given_up_total`: why not retried: `not_retryable` (outcome not in "
    "`retry.retry_on`), `attempts_exhausted`, `unsafe` (sent, and not idempotent or oneway), "
    "`deadline`, `budget_exhausted`, `probe` (a half-open probe gets one attempt), "
    "`circuit_open` (the circuit opened meanwhile).",
    "breaker": "The breaker's name: the upstream (its addresses joined by commas), then "
    "`/method` when `breaker.scope: method`.",
    "from_state": "`closed`, `open` or `half-open`.",
    "to_state": "`closed`, `open` or `half-open`.",
    "source": "`cache` (the last good reply to the same arguments) or `static` (the "
    "method's static reply from the config).",
    "state": "`busy` (a call in flight) or `idle`.",
    "kind": "What was wrong: " + ", ".join(f"`{k}`" for k in PROTOCOL_ERROR_KINDS) + ".",
    "operation": "The shared-state operation that failed.",
    "version": "The sidecar's version.",
}


class MethodLabels:
    """Maps wire method names to a bounded set of label values.

    Names known from the config or the IDL (``known``, and `add_known` on a
    reload) always get their own label. Other names get one on first sight
    while fewer than ``limit`` labels are in use; after that they all share
    `OTHER`. At most ``max(limit, known) + 1`` values exist.
    """

    def __init__(self, known: Iterable[str], limit: int) -> None:
        self._labels: dict[str, str] = {}
        self._limit = limit
        self.configured: list[str] = []
        for name in known:
            if name not in self._labels:
                self._labels[name] = name
                self.configured.append(name)
        self._free = max(0, limit - len(self._labels))

    @property
    def limit(self) -> int:
        """``metrics.max_method_labels``."""
        return self._limit

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

    def add_known(self, names: Iterable[str]) -> list[str]:
        """Give configured names their own label, past the limit if need be (a reload).

        Returns:
            The names that were not configured before.
        """
        added = []
        for name in names:
            self._labels[name] = name
            if name not in self.configured:
                self.configured.append(name)
                added.append(name)
        return added

    def known(self) -> list[str]:
        """Label values in use."""
        return sorted(set(self._labels.values()))

    def in_use(self) -> int:
        """How many names have a label of their own (`OTHER` not counted)."""
        return len(self._labels)


def split_name(name: str) -> tuple[str, str]:
    """``"Svc:m"`` → ("Svc", "m"); a bare name has service ``""``."""
    service, sep, method = name.rpartition(":")
    return (service, method) if sep else ("", name)


class SidecarMetrics:
    """The sidecar's metrics, registered in ``registry``.

    Attributes:
        registry: where they are registered (a fresh one unless given).
        label_names: each exported metric name (``..._total`` for counters)
            and its label names, for the generated reference.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.label_names: dict[str, tuple[str, ...]] = {}
        # requests_total, request_duration_seconds, upstream_attempts_total
        self.calls = CallMetrics()
        self.registry.register(self.calls)
        for name, labels in CallMetrics.LABELS.items():
            self.label_names[name] = labels
        self.retries = self._counter(
            "retries_total",
            "Retries made, by method and the outcome of the attempt that was retried.",
            ["method", "reason"],
        )
        self.retries_given_up = self._counter(
            "retries_given_up_total",
            "Failed attempts that were not retried, by method and why not.",
            ["method", "reason"],
        )
        self.retry_budget_exhausted = self._counter(
            "retry_budget_exhausted_total",
            "Retries refused because the upstream's retry budget was empty.",
            ["upstream"],
        )
        self.retry_budget_tokens = self._gauge(
            "retry_budget_tokens",
            "Retry tokens available now (a retry takes one; below 1, retries are refused).",
            ["upstream"],
        )
        self.breaker_state = self._gauge(
            "breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["breaker"]
        )
        self.breaker_transitions = self._counter(
            "breaker_transitions_total",
            "Circuit breaker state changes, by old and new state.",
            ["breaker", "from_state", "to_state"],
        )
        self.breaker_last_opened = self._gauge(
            "breaker_last_opened_timestamp_seconds",
            "Unix time the breaker last opened (0: never since start-up).",
            ["breaker"],
        )
        self.breaker_rejections = self._counter(
            "breaker_rejections_total",
            "Calls not sent because the breaker was open (or its probes were all in use).",
            ["breaker"],
        )
        self.breaker_failures = self._gauge(
            "breaker_consecutive_failures",
            "Consecutive failures counted by the breaker (it opens at breaker.fail_max).",
            ["breaker"],
        )
        self.breaker_shared_state = self._gauge(
            "breaker_shared_state",
            "Fleet mode: the breaker's state as Redis last held it (0 closed, 1 half-open, "
            "2 open); absent in local mode.",
            ["breaker"],
        )
        self.breaker_shared_failures = self._gauge(
            "breaker_shared_consecutive_failures",
            "Fleet mode: consecutive failures counted by the whole fleet, as Redis last held "
            "them; absent in local mode.",
            ["breaker"],
        )
        self.upstream_ejections = self._counter(
            "upstream_ejections_total",
            "Upstream addresses taken out of rotation after repeated failures.",
            ["upstream"],
        )
        self.upstream_ejected = self._gauge(
            "upstream_ejected", "1 while the upstream address is out of rotation.", ["upstream"]
        )
        self.upstream_connections = self._gauge(
            "upstream_connections",
            "Open connections to an upstream address, by whether a call is in flight on them.",
            ["upstream", "state"],
        )
        self.fallback_replies = self._counter(
            "fallback_replies_total",
            "Replies served from a fallback instead of the upstream, by method and source.",
            ["method", "source"],
        )
        self.fallback_cache_entries = self._gauge(
            "fallback_cache_entries", "Replies held by the fallback cache."
        )
        self.fallback_cache_bytes = self._gauge(
            "fallback_cache_bytes",
            "Bytes held by the fallback cache, as counted against fallback.cache.max_bytes.",
        )
        self.client_connections = self._gauge("client_connections", "Open client connections.")
        self.client_connections_rejected = self._counter(
            "client_connections_rejected_total",
            "Client connections closed at once: max_connections reached, or draining.",
        )
        self.client_idle_closes = self._counter(
            "client_idle_closes_total",
            "Client connections closed after idle_timeout without a call.",
        )
        self.protocol_errors = self._counter(
            "protocol_errors_total",
            "Client connections closed for breaking the protocol, by kind.",
            ["kind"],
        )
        self.config_reloads = self._counter(
            "config_reloads_total", "Config reloads (SIGHUP), by result.", ["result"]
        )
        self.state_backend_errors = self._counter(
            "state_backend_errors_total",
            "Failed operations on the shared state backend (Redis), by operation.",
            ["operation"],
        )
        self.state_backend_up = UnsetGauge(
            PREFIX + "state_backend_up",
            "1 while the shared state backend (Redis) answers, 0 when not; "
            "absent in local mode and until the first answer.",
        )
        self.registry.register(self.state_backend_up)
        self.label_names[PREFIX + "state_backend_up"] = ()
        self.build_info = self._gauge(
            "build_info", "Always 1; the label tells the version.", ["version"]
        )
        self.build_info.labels(__version__).set(1)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        for kind in PROTOCOL_ERROR_KINDS:
            self.protocol_errors.labels(kind)
        self._breakers_seen: set[str] = set()

    def _counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        self.label_names[PREFIX + name] = tuple(labels)
        return Counter(PREFIX + name, doc, labels, registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        self.label_names[PREFIX + name] = tuple(labels)
        return Gauge(PREFIX + name, doc, labels, registry=self.registry)

    # series known at start-up (all idempotent: existing values are kept)

    def init_upstream(self, name: str, addresses: Iterable[str]) -> None:
        """The series of one upstream and its addresses."""
        self.retry_budget_exhausted.labels(name)
        self.retry_budget_tokens.labels(name)
        for address in addresses:
            self.upstream_ejections.labels(address)
            self.upstream_ejected.labels(address)
            for state in CONNECTION_STATES:
                self.upstream_connections.labels(address, state)

    def init_breaker(self, name: str) -> None:
        """The series of one breaker (cheap when already done: called every second)."""
        if name in self._breakers_seen:
            return
        self._breakers_seen.add(name)
        self.breaker_state.labels(name)
        self.breaker_last_opened.labels(name)
        self.breaker_rejections.labels(name)
        self.breaker_failures.labels(name)
        for old, new in BREAKER_TRANSITIONS:
            self.breaker_transitions.labels(name, old, new)

    def init_method(
        self, label: str, addresses: Iterable[str], fallback_sources: Iterable[str] = ()
    ) -> None:
        """The series of one known method label: ``ok`` calls and attempts, the latency
        histogram, and the fallback sources it can be served from."""
        stats = self.calls.method(label)
        stats.requests.setdefault("ok", 0)
        for address in addresses:
            stats.attempts.setdefault((address, "ok"), 0)
        for source in fallback_sources:
            self.fallback_replies.labels(label, source)


class UnsetGauge(Collector):
    """A gauge without labels that is not exported until it is first set.

    prometheus_client's Gauge always exports a sample (0 before any ``set``),
    which would read as "down" for a backend that is not configured at all.
    """

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self.value: float | None = None

    def set(self, value: float) -> None:
        self.value = float(value)

    def describe(self) -> list[Metric]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation)
        if self.value is not None:
            family.add_metric([], self.value)
        yield family


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
