"""What the demo reads: the sidecar's ``/metrics``, as a user reads them, and their changes.

`MetricsView` is one scrape parsed with prometheus_client's parser;
`Snapshot` is what the clients, the sidecar and the fault injector had
counted at one moment; `Interval` is the difference between two snapshots,
as the table and the summary show it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from sidecar.demo.traffic_counts import TrafficCounts
from sidecar.testing.faults import FaultStats

PREFIX = "thrift_sidecar_"
BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}


class MetricsView:
    """One scrape of ``/metrics``, parsed with prometheus_client's parser."""

    def __init__(self, text: str = "") -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def by_label(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Sums of ``name`` grouped by the values of ``keys``."""
        grouped: dict[tuple[str, ...], float] = {}
        for sample, have, value in self.samples:
            if sample == name:
                key = tuple(have.get(k, "") for k in keys)
                grouped[key] = grouped.get(key, 0.0) + value
        return grouped

    def breaker_state(self) -> str:
        """The worst state of any breaker (open > half-open > closed)."""
        values = [v for s, _, v in self.samples if s == PREFIX + "breaker_state"]
        return BREAKER_STATES.get(int(max(values, default=0)), "?")


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q``-quantile from cumulative bucket counts by upper bound, as PromQL computes it.

    Linear interpolation inside the bucket where the rank falls; None when
    there are no observations; the largest finite bound when the rank falls
    in the ``+Inf`` bucket.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Snapshot:
    """What the clients, the sidecar and the fault injector had counted at one moment."""

    at: float
    traffic: TrafficCounts
    metrics: MetricsView
    faults: FaultStats


@dataclass
class Interval:
    """The difference between two snapshots, as the table and summary show it."""

    seconds: float
    traffic: TrafficCounts
    faults_injected: int
    retries: float
    cache: float
    static: float
    p50: float | None
    breaker: str
    transitions: list[tuple[str, str, int]]
    shed: float = 0.0

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Interval:
        ma, mb = a.metrics, b.metrics
        fallback_a = ma.by_label(PREFIX + "fallback_replies_total", "source")
        fallback_b = mb.by_label(PREFIX + "fallback_replies_total", "source")
        transitions = []
        ta = ma.by_label(PREFIX + "breaker_transitions_total", "from_state", "to_state")
        tb = mb.by_label(PREFIX + "breaker_transitions_total", "from_state", "to_state")
        for (old, new), count in sorted(tb.items()):
            delta = int(count - ta.get((old, new), 0.0))
            if delta > 0:
                transitions.append((old, new, delta))
        transitions = in_order(transitions, ma.breaker_state())
        ba = ma.by_label(PREFIX + "request_duration_seconds_bucket", "le")
        bb = mb.by_label(PREFIX + "request_duration_seconds_bucket", "le")
        buckets = {float(le): bb[(le,)] - ba.get((le,), 0.0) for (le,) in bb}
        return cls(
            seconds=b.at - a.at,
            traffic=b.traffic - a.traffic,
            faults_injected=_injected(b.faults) - _injected(a.faults),
            retries=mb.total(PREFIX + "retries_total") - ma.total(PREFIX + "retries_total"),
            cache=fallback_b.get(("cache",), 0.0) - fallback_a.get(("cache",), 0.0),
            static=fallback_b.get(("static",), 0.0) - fallback_a.get(("static",), 0.0),
            p50=histogram_quantile(0.5, buckets),
            breaker=mb.breaker_state(),
            transitions=transitions,
            shed=mb.total(PREFIX + "calls_shed_total") - ma.total(PREFIX + "calls_shed_total"),
        )


def in_order(transitions: list[tuple[str, str, int]], start: str) -> list[tuple[str, str, int]]:
    """Transitions counted in one interval, in the order they can have happened from ``start``.

    The counter says only how often each change happened; following the
    states from the one at the start of the interval puts them in sequence
    (``open → half-open`` before ``half-open → open``).
    """
    left = {(old, new): count for old, new, count in transitions}
    ordered: list[tuple[str, str, int]] = []
    state = start
    while True:
        steps = [(old, new) for (old, new), count in left.items() if old == state and count]
        if not steps:
            break
        # Prefer a change that leads on to the others (a walk that uses them all).
        step = max(steps, key=lambda s: sum(n for (o, _), n in left.items() if o == s[1]))
        left[step] -= 1
        if ordered and ordered[-1][:2] == step:
            ordered[-1] = (*step, ordered[-1][2] + 1)
        else:
            ordered.append((*step, 1))
        state = step[1]
    ordered += [(old, new, count) for (old, new), count in left.items() if count]
    return ordered


def _injected(stats: FaultStats) -> int:
    return stats.calls - stats.action("ok")
