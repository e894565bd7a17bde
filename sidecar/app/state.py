"""The ``/state`` document: what an operator asks a sick sidecar first.

Read off the running parts at the moment of the request; JSON-ready values only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Protocol

from sidecar import __version__
from sidecar.app.build import Parts
from sidecar.config import SidecarConfig
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.proxy.context import CallContext
from sidecar.proxy.hedge import HedgePlan
from sidecar.resilience.breaker import Breaker
from sidecar.resilience.limits import ConcurrencyLimit

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase


class Described(Protocol):
    """What ``/state`` reads of a sidecar (`sidecar.app.lifecycle.Sidecar`)."""

    config: SidecarConfig
    config_version: int
    ready: bool
    started_at: float
    upstream_name: str
    metrics: SidecarMetrics
    labels: MethodLabels
    parts: Parts | None
    last_reload_error: str | None
    pending_restart: tuple[str, ...]


def state_document(sidecar: Described) -> dict[str, Any]:
    """The ``/state`` document of a running sidecar.

    Keys: ``version``, ``config_version``, ``ready``, ``uptime_seconds``,
    ``listen``, ``upstream`` (addresses, ejected ones), ``breakers`` (state,
    counters, settings, seconds until a probe), ``pools`` (per address and
    transport), ``retry_budget``, ``concurrency`` (calls in flight, their limit,
    calls shed since start-up), ``hedging`` (the hedge budget, each hedged
    method's delay now and answer times held, the hedge counters), ``fallback_store`` and
    ``fallback_store_losses`` (writes dropped or failed, reads missed),
    ``shared_state`` (fleet mode: the Redis URL without password, whether it
    answers, the last error, each breaker's state as Redis holds it),
    ``config`` (reloads, the last error, changes waiting for a restart),
    ``method_labels``, ``client_connections``, ``oneway`` (methods learned
    to be oneway from the wire) and ``health_check`` (settings and each
    address's probe record, or ``enabled: false``).
    """
    parts = sidecar.parts
    if parts is None:
        return {"version": __version__, "ready": False}
    metrics = sidecar.metrics
    context = parts.server.context
    now = context.loop.time()
    transitions = _samples(metrics.breaker_transitions, "breaker_transitions_total")
    ejected = context.upstreams.ejected()
    stats = parts.store.stats()
    budget = sidecar.config.retry.budget
    exhausted = _samples(metrics.retry_budget_exhausted, "retry_budget_exhausted_total")
    reloads = _samples(metrics.config_reloads, "config_reloads_total")
    hedge_budget = sidecar.config.hedge.budget
    hedges = _samples(metrics.hedges, "hedges_total")
    won = _samples(metrics.hedges_won, "hedges_won_total")
    refused = _samples(metrics.hedge_budget_exhausted, "hedge_budget_exhausted_total")
    return {
        "version": __version__,
        "config_version": sidecar.config_version,
        "ready": sidecar.ready,
        "uptime_seconds": round(time.time() - sidecar.started_at, 3),
        "listen": sidecar.config.listen,
        "upstream": {
            "name": sidecar.upstream_name,
            "addresses": list(sidecar.config.upstream.addresses),
            "ejected": ejected,
        },
        "breakers": [_breaker(b, transitions) for b in parts.breakers.all()],
        "pools": [
            {
                "address": pool.address,
                "transport": pool.transport_kind.value,
                "open": pool.open_connections,
                "idle": pool.idle_connections,
                "busy": pool.open_connections - pool.idle_connections,
                "max": pool.size,
                "ejected": pool.address in ejected,
            }
            for pool in context.upstreams.pools()
        ],
        "retry_budget": {
            "tokens": round(context.budget.balance(now), 3),
            "exhausted_total": int(exhausted.get((sidecar.upstream_name,), 0)),
            "ratio": budget.ratio,
            "min_retries_per_second": budget.min_retries_per_second,
            "window_seconds": budget.window,
        },
        "concurrency": _concurrency(context.limiter),
        "hedging": {
            **context.hedging.describe(now, _hedge_plans(sidecar, context)),
            "ratio": hedge_budget.ratio,
            "min_hedges_per_second": hedge_budget.min_hedges_per_second,
            "window_seconds": hedge_budget.window,
            "hedges_total": int(sum(hedges.values())),
            "won_total": int(sum(won.values())),
            "exhausted_total": int(sum(refused.values())),
        },
        "fallback_store": {
            "backend": stats.backend,
            "entries": stats.entries,
            "bytes": stats.bytes,
            "healthy": stats.healthy,
        },
        "fallback_store_losses": {
            "dropped_writes": stats.dropped_writes,
            "failed_writes": stats.failed_writes,
            "missed_reads": stats.missed_reads,
        },
        "shared_state": parts.fleet.describe() if parts.fleet else {"enabled": False},
        "config": {
            "version": sidecar.config_version,
            "reloads_ok": int(reloads.get(("ok",), 0)),
            "reloads_failed": int(reloads.get(("error",), 0)),
            "last_reload_error": sidecar.last_reload_error,
            "restart_needed_for": list(sidecar.pending_restart),
        },
        "method_labels": {"in_use": sidecar.labels.in_use(), "max": sidecar.labels.limit},
        "client_connections": len(parts.server.connections),
        "oneway": parts.oneway.describe(),
        "health_check": parts.health.describe() if parts.health else {"enabled": False},
    }


def _concurrency(limiter: ConcurrencyLimit) -> dict[str, Any]:
    adaptive = limiter.adaptive
    described: dict[str, Any] = {
        "in_flight": limiter.in_flight,
        "max_in_flight": limiter.limit,
        "shed_total": limiter.shed,
        "adaptive": None,
    }
    if adaptive is not None:
        described["adaptive"] = {
            "limit": adaptive.limit,
            "measuring_min_rtt": adaptive.measuring,
            "min_rtt_seconds": adaptive.min_rtt,
            "sample_rtt_seconds": adaptive.sample_rtt,
        }
    return described


def _breaker(breaker: Breaker, transitions: dict[tuple[str, ...], float]) -> dict[str, Any]:
    opened = breaker.opened_at
    probe_in = breaker.probe_in()
    return {
        "name": breaker.name,
        "state": breaker.state,
        "consecutive_failures": breaker.fail_counter,
        "half_open_successes": breaker.success_counter,
        "probes_in_flight": breaker.probes_in_flight,
        "rejected_calls": breaker.rejected,
        "last_opened": opened.isoformat() if opened else None,
        "probe_in_seconds": round(probe_in, 3) if probe_in is not None else None,
        "transitions": {
            f"{old}->{new}": int(v)
            for (name, old, new), v in sorted(transitions.items())
            if name == breaker.name and v
        },
        "fail_max": breaker.fail_max,
        "reset_timeout_seconds": breaker.reset_timeout,
    }


def _hedge_plans(sidecar: Described, context: CallContext) -> dict[str, HedgePlan]:
    """The hedge plans of the configured and IDL methods that hedge, by method label."""
    plans = {}
    for name in sidecar.labels.configured:
        policy = context.policies.for_name(name)
        if policy.hedge is not None:
            plans[policy.label] = policy.hedge
    return plans


def _samples(metric: MetricWrapperBase, sample_name: str) -> dict[tuple[str, ...], float]:
    """The values of one labelled metric by label values, read through its public ``collect``."""
    found: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(sample_name):
                found[tuple(sample.labels.values())] = sample.value
    return found
