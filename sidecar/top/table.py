"""Rates and latency quantiles over the interval between two snapshots, and the state rows.

Per method called at least once: calls, errors, retries and fallbacks per
second, the share of calls that did not fail, and p50/p99 from the change of
the latency histogram's buckets (linear within a bucket, as Prometheus's
``histogram_quantile`` does). With no earlier snapshot, the counters are
taken from zero over the sidecar's uptime. Breakers and upstream addresses
come from ``/state``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sidecar.top.snapshot import MethodCounts, Snapshot


@dataclass(frozen=True)
class MethodRow:
    """One method over one interval. Latencies in seconds; None when no call was answered."""

    method: str
    calls_per_second: float
    success: float | None
    errors_per_second: float
    retries_per_second: float
    fallbacks_per_second: float
    p50: float | None
    p99: float | None


@dataclass(frozen=True)
class BreakerRow:
    name: str
    state: str
    failures: int
    rejected: int
    probe_in: float | None


@dataclass(frozen=True)
class AddressRow:
    address: str
    ejected: bool
    open: int
    busy: int


@dataclass(frozen=True)
class Table:
    """What one frame shows: ``interval`` is the seconds the rates are over."""

    interval: float
    methods: list[MethodRow]
    breakers: list[BreakerRow]
    addresses: list[AddressRow]
    state: dict[str, Any]


def table(before: Snapshot | None, after: Snapshot) -> Table:
    """The frame for the change from ``before`` to ``after`` (from zero when None)."""
    if before is None:
        interval = float(after.state.get("uptime_seconds") or 0.0)
        old: dict[str, MethodCounts] = {}
    else:
        interval = after.at - before.at
        old = before.methods
    rows = [  # methods never called (series made at start-up) are left out
        method_row(name, old.get(name, MethodCounts()), counts, interval)
        for name, counts in sorted(after.methods.items())
        if counts.calls > 0
    ]
    state = after.state
    return Table(interval, rows, breaker_rows(state), address_rows(state), state)


def method_row(name: str, old: MethodCounts, new: MethodCounts, interval: float) -> MethodRow:
    """One method's rates; a counter that went down (a restart) counts from zero."""

    def rate(a: float, b: float) -> float:
        delta = b - a if b >= a else b
        return delta / interval if interval > 0 else 0.0

    restarted = new.calls < old.calls
    if restarted:
        old = MethodCounts()
    calls = new.calls - old.calls
    errors = new.errors - old.errors
    buckets = {bound: count - old.buckets.get(bound, 0.0) for bound, count in new.buckets.items()}
    return MethodRow(
        method=name,
        calls_per_second=rate(old.calls, new.calls),
        success=(calls - errors) / calls if calls > 0 else None,
        errors_per_second=rate(old.errors, new.errors),
        retries_per_second=rate(old.retries, new.retries),
        fallbacks_per_second=rate(old.fallbacks, new.fallbacks),
        p50=quantile(0.5, buckets),
        p99=quantile(0.99, buckets),
    )


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (upper bound -> count), or None if empty.

    Linear interpolation inside the bucket it falls in, from 0 for the first
    bucket; in the ``+Inf`` bucket, the largest finite bound (what can be said).
    """
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            return lower + (bound - lower) * ((rank - below) / inside if inside > 0 else 1.0)
        lower, below = bound, count
    return lower


def breaker_rows(state: dict[str, Any]) -> list[BreakerRow]:
    return [
        BreakerRow(
            name=str(b.get("name", "")),
            state=str(b.get("state", "?")),
            failures=int(b.get("consecutive_failures") or 0),
            rejected=int(b.get("rejected_calls") or 0),
            probe_in=b.get("probe_in_seconds"),
        )
        for b in state.get("breakers") or []
    ]


def address_rows(state: dict[str, Any]) -> list[AddressRow]:
    upstream = state.get("upstream") or {}
    ejected = set(upstream.get("ejected") or [])
    pools: dict[str, tuple[int, int]] = {}
    for pool in state.get("pools") or []:
        opened, busy = pools.get(pool["address"], (0, 0))
        pools[pool["address"]] = (opened + int(pool["open"]), busy + int(pool["busy"]))
    return [
        AddressRow(str(a), a in ejected, *pools.get(a, (0, 0)))
        for a in upstream.get("addresses") or []
    ]
