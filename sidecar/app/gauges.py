"""The metric series that exist from start-up, and the gauges read off the running parts.

Counters are counted where things happen; what is a level (breaker state,
open connections, budget tokens, cache size, ejected addresses) is read off
the parts once a second and before each scrape (`Gauges.refresh`), a rate
breaker's failure and slow-call ratios among them. Breaker
transitions are counted, logged and reflected in the gauges as they happen
(`transition_listener`, pybreaker's listener).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sidecar.config import SidecarConfig
from sidecar.fallback.store import FallbackStore
from sidecar.fleet import Fleet
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.proxy.context import CallContext
from sidecar.resilience.breaker import STATE_OPEN, STATE_VALUES, TransitionCallback

log = logging.getLogger("sidecar")
breaker_log = logging.getLogger("sidecar.breaker")


def transition_listener(
    metrics: SidecarMetrics, reset_timeout: Callable[[], float]
) -> TransitionCallback:
    """pybreaker's listener: count, set the gauges, and log one line per transition.

    A transition adopted from another worker (``adopted``) sets the gauges and
    is logged at info, but is not counted: the worker that made it counts it,
    so the workers' counts add up to the sidecar's.
    """

    def on_transition(name: str, old: str, new: str, adopted: bool) -> None:
        metrics.init_breaker(name)
        metrics.breaker_state.labels(name).set(STATE_VALUES.get(new, 0))
        if new == STATE_OPEN:
            metrics.breaker_last_opened.labels(name).set(time.time())
        extra = {"breaker": name, "from_state": old, "to_state": new}
        if adopted:
            breaker_log.info(
                "circuit breaker %s: %s -> %s (another worker's change)",
                name,
                old,
                new,
                extra=extra,
            )
            return
        metrics.breaker_transitions.labels(name, old, new).inc()
        if new == STATE_OPEN:
            breaker_log.warning(
                "circuit breaker %s: %s -> %s; calls get a fallback or an error for %gs, "
                "then probes are let through",
                name,
                old,
                new,
                reset_timeout(),
                extra=extra,
            )
        else:
            breaker_log.info("circuit breaker %s: %s -> %s", name, old, new, extra=extra)

    return on_transition


class Gauges:
    """Creates the start-up series and refreshes the gauges of one sidecar."""

    def __init__(self, metrics: SidecarMetrics, labels: MethodLabels) -> None:
        self._metrics = metrics
        self._labels = labels
        self._series_ready = False
        self._ejected_before: frozenset[str] = frozenset()
        # The store whose error counts were last read, and those counts.
        self._store: FallbackStore | None = None
        self._store_errors: dict[str, int] = {}

    def config_changed(self) -> None:
        """New methods or fallback sources may exist: create their series on the next refresh."""
        self._series_ready = False

    def init_series(self, config: SidecarConfig, context: CallContext) -> None:
        """Create the series known at start-up at zero (see `sidecar.metrics`).

        The upstream and its addresses, every breaker (with ``breaker.scope:
        method``, one per configured or IDL method), and per configured or
        IDL method: ``ok`` requests and attempts, the latency histogram, and
        the fallback sources it can be served from, and the hedge counters of a
        hedged method. Idempotent.
        """
        m = self._metrics
        addresses = list(config.upstream.addresses)
        m.init_upstream(context.upstream_name, addresses)
        serves_fallbacks = bool(config.fallback.serve_on)
        for name in self._labels.configured:
            policy = context.policies.for_name(name)
            sources = []
            if serves_fallbacks and policy.cacheable:
                sources.append("cache")
            if serves_fallbacks and policy.static_reply is not None:
                sources.append("static")
            m.init_method(policy.label, addresses, sources, hedged=policy.hedge is not None)
            context.breakers.for_label(policy.label)
        for breaker in context.breakers.all():
            m.init_breaker(breaker.name)
        self._series_ready = True

    def refresh(
        self,
        config: SidecarConfig,
        context: CallContext,
        store: FallbackStore,
        fleet: Fleet | None,
    ) -> None:
        """Update the gauges read off the parts; logs an address coming back into rotation."""
        if not self._series_ready:
            self.init_series(config, context)
        m = self._metrics
        m.retry_budget_tokens.labels(context.upstream_name).set(
            context.budget.balance(context.loop.time())
        )
        limiter = context.limiter
        m.calls_in_flight.labels(context.upstream_name).set(limiter.in_flight)
        if limiter.limit is None:
            m.concurrency_limit.clear()
        else:
            m.concurrency_limit.labels(context.upstream_name).set(limiter.limit)
        for breaker in context.breakers.all():
            m.init_breaker(breaker.name)
            m.breaker_state.labels(breaker.name).set(STATE_VALUES.get(breaker.state, 0))
            m.breaker_failures.labels(breaker.name).set(breaker.fail_counter)
            rates = breaker.rates()
            if rates is not None:
                m.breaker_failure_ratio.labels(breaker.name).set(rates[0] / 100)
                m.breaker_slow_call_ratio.labels(breaker.name).set(rates[1] / 100)
        if fleet is not None:  # the fleet's view beside the local one
            for name, shared in fleet.breakers.shared_views():
                m.breaker_shared_state.labels(name).set(STATE_VALUES.get(shared.state, 0))
                m.breaker_shared_failures.labels(name).set(shared.fail_counter)
        upstreams = context.upstreams
        ejected = frozenset(upstreams.ejected())
        for address in sorted(self._ejected_before - ejected):
            log.info(
                "upstream address %s is back in rotation", address, extra={"upstream": address}
            )
        self._ejected_before = ejected
        per_address = {address: (0, 0) for address in upstreams.addresses}
        for address in upstreams.addresses:
            m.upstream_ejected.labels(address).set(1 if address in ejected else 0)
        for pool in upstreams.pools():
            busy, idle = per_address.get(pool.address, (0, 0))
            per_address[pool.address] = (
                busy + pool.open_connections - pool.idle_connections,
                idle + pool.idle_connections,
            )
        for address, (busy, idle) in per_address.items():
            m.upstream_connections.labels(address, "busy").set(busy)
            m.upstream_connections.labels(address, "idle").set(idle)
        stats = store.stats()
        m.fallback_cache_entries.set(stats.entries)
        m.fallback_cache_bytes.set(stats.bytes)
        m.fallback_store_up.set(1 if stats.healthy else 0)
        if store is not self._store:  # a new store (a reload) counts from 0
            self._store, self._store_errors = store, {}
        for operation, count in stats.errors:  # the store counts; the counter follows
            seen = self._store_errors.get(operation, 0)
            if count > seen:
                m.fallback_store_errors.labels(operation).inc(count - seen)
                self._store_errors[operation] = count
