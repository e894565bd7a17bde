"""Every metric the sidecar exports, registered in one place (`SidecarMetrics`).

Names follow the Prometheus conventions (prefix ``thrift_sidecar_``, base
units, ``_total`` for counters) and the list in the design (§8). Metrics live
in a registry owned by the `SidecarMetrics` instance, never the global
default, so tests and several sidecars in one process do not collide.

Series that exist before anything happens: the ``init_*`` methods create the
label sets of what is known at start-up (the upstream and its addresses, the
breakers, the configured and IDL methods, the protocol error kinds) at zero,
so that ``rate()`` and alerts see the first failure rather than a new series.
Each metric's help text is what ``docs/metrics-reference.md`` is generated from
(``python -m sidecar.docs metrics``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__, native
from sidecar.metrics.calls import CallMetrics
from sidecar.metrics.labels import (
    BREAKER_TRANSITIONS,
    CONNECTION_REJECT_REASONS,
    CONNECTION_STATES,
    CONTROL_ACTIONS,
    FALLBACK_STORE_OPERATIONS,
    HEALTH_CHECK_RESULTS,
    PREFIX,
    PROTOCOL_ERROR_KINDS,
    RELOAD_RESULTS,
    TLS_HANDSHAKE_REASONS,
)


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
        # process_* of prometheus_client: CPU seconds, memory, open and max fds, start time.
        process = ProcessCollector(registry=self.registry)
        for family in process.collect():
            kind = "_total" if family.type == "counter" else ""
            self.label_names[family.name + kind] = ()
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
        self.calls_shed = self._counter(
            "calls_shed_total",
            "Calls shed at once because upstream.max_in_flight calls were in flight to the "
            "upstream; each got a fallback or an error, or, oneway, was dropped.",
            ["upstream"],
        )
        self.calls_in_flight = self._gauge(
            "calls_in_flight",
            "Calls in flight to the upstream now, from admission to answer (retries and "
            "backoff included): what upstream.max_in_flight limits.",
            ["upstream"],
        )
        self.concurrency_limit = self._gauge(
            "concurrency_limit",
            "The upstream's limit of calls in flight (upstream.max_in_flight); absent with no "
            "limit.",
            ["upstream"],
        )
        self.hedges = self._counter(
            "hedges_total",
            "Hedges started: the same call sent again on another connection because the "
            "attempt had no answer after hedge.delay; each took a hedge budget token. One "
            "whose connection could not be had, or was still being opened when another "
            "attempt answered, sent nothing.",
            ["method"],
        )
        self.hedges_won = self._counter(
            "hedges_won_total",
            "Hedges whose answer came first and was delivered (the other attempt's was dropped).",
            ["method"],
        )
        self.hedge_budget_exhausted = self._counter(
            "hedge_budget_exhausted_total",
            "Hedges not sent because the hedge budget was empty.",
            ["method"],
        )
        self.breaker_state = self._gauge(
            "breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["breaker"]
        )
        self.breaker_transitions = self._counter(
            "breaker_transitions_total",
            "Circuit breaker state changes, by old and new state; with workers, counted by the "
            "worker that made the change (the others adopt it).",
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
        self.breaker_failure_ratio = self._gauge(
            "breaker_failure_ratio",
            "breaker.mode rate: failed calls among the calls in the breaker's sliding window, "
            "0 to 1 (it opens at breaker.failure_rate_threshold percent, once the window holds "
            "breaker.minimum_calls); absent in consecutive mode.",
            ["breaker"],
        )
        self.breaker_slow_call_ratio = self._gauge(
            "breaker_slow_call_ratio",
            "breaker.mode rate: calls slower than breaker.slow_call_duration among the calls in "
            "the breaker's sliding window, 0 to 1; absent in consecutive mode.",
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
        self.upstream_stray_replies = self._counter(
            "upstream_stray_replies_total",
            "Replies from an upstream address to no call the sidecar sent (dropped; the "
            "connection is closed once its calls are answered).",
            ["upstream"],
        )
        self.upstream_ejected = self._gauge(
            "upstream_ejected", "1 while the upstream address is out of rotation.", ["upstream"]
        )
        self.health_check_probes = self._counter(
            "health_check_probes_total",
            "Health check probes of an upstream address (health_check), by result: pass, or "
            "the outcome that failed it. Probes are not client calls: requests_total and "
            "upstream_attempts_total never count them.",
            ["upstream", "result"],
        )
        self.upstream_healthy = self._gauge(
            "upstream_healthy",
            "Health checks' verdict on an upstream address: 1 healthy, 0 after "
            "health_check.unhealthy_threshold failed probes in a row (until "
            "healthy_threshold pass); absent while health checks are off.",
            ["upstream"],
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
        self.fallback_store_up = self._gauge(
            "fallback_store_up",
            "1 while the fallback store works; 0 from a failed read or write, a cache file "
            "deleted or replaced, or a fall-back to memory, until a read works again.",
        )
        self.fallback_store_errors = self._counter(
            "fallback_store_errors_total",
            "Failed operations of the SQLite fallback store, by operation.",
            ["operation"],
        )
        self.client_connections = self._gauge("client_connections", "Open client connections.")
        self.event_loop_lag = self._gauge(
            "event_loop_lag_seconds",
            "How late the event loop ran its last once-a-second housekeeping timer: the "
            "backlog of the one loop that serves every call (near 0 when it keeps up).",
        )
        self.client_connections_rejected = self._counter(
            "client_connections_rejected_total",
            "Client connections closed at once, by reason: max_connections reached (as "
            "configured, or as lowered to fit the open-file limit), or draining.",
            ["reason"],
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
        self.tls_handshake_errors = self._counter(
            "tls_handshake_errors_total",
            "TLS handshakes that failed, by side and reason; the connection was closed "
            "(client side) or the attempt failed as a connect_error (upstream side).",
            ["side", "reason"],
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
        self.control_actions = self._counter(
            "control_actions_total",
            "Changes made by hand through the control listener (control.listen), by action.",
            ["action"],
        )
        self.build_info = self._gauge(
            "build_info",
            "Always 1; the labels tell the version and the build: mypyc (the per-call "
            "modules compiled), python, or partial (some of them compiled).",
            ["version", "build"],
        )
        self.build_info.labels(__version__, native.build()).set(1)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)
        for kind in PROTOCOL_ERROR_KINDS:
            self.protocol_errors.labels(kind)
        for reason in CONNECTION_REJECT_REASONS:
            self.client_connections_rejected.labels(reason)
        for operation in FALLBACK_STORE_OPERATIONS:
            self.fallback_store_errors.labels(operation)
        self.fallback_store_up.set(1)
        for action in CONTROL_ACTIONS:
            self.control_actions.labels(action)
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
        self.calls_shed.labels(name)
        self.calls_in_flight.labels(name)
        for address in addresses:
            self.upstream_ejections.labels(address)
            self.upstream_stray_replies.labels(address)
            self.upstream_ejected.labels(address)
            for state in CONNECTION_STATES:
                self.upstream_connections.labels(address, state)

    def init_health_checks(self, addresses: Iterable[str]) -> None:
        """The series of health checks of these addresses (when they are turned on)."""
        for address in addresses:
            self.upstream_healthy.labels(address).set(1)
            for result in HEALTH_CHECK_RESULTS:
                self.health_check_probes.labels(address, result)

    def drop_health_checks(self, addresses: Iterable[str]) -> None:
        """Health checks turned off: their verdicts are gone (the probe counts stay)."""
        for address in addresses:
            with contextlib.suppress(KeyError):
                self.upstream_healthy.remove(address)

    def init_tls(self, side: str) -> None:
        """The handshake error series of one side that speaks TLS (``client``, ``upstream``)."""
        for reason in TLS_HANDSHAKE_REASONS:
            self.tls_handshake_errors.labels(side, reason)

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
        self,
        label: str,
        addresses: Iterable[str],
        fallback_sources: Iterable[str] = (),
        hedged: bool = False,
    ) -> None:
        """The series of one known method label: ``ok`` calls and attempts, the latency
        histogram, the fallback sources it can be served from, and its hedge counters."""
        stats = self.calls.method(label)
        stats.show_request("ok")
        for address in addresses:
            stats.show_attempt(address, "ok")
        for source in fallback_sources:
            self.fallback_replies.labels(label, source)
        if hedged:
            self.hedges.labels(label)
            self.hedges_won.labels(label)
            self.hedge_budget_exhausted.labels(label)


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
