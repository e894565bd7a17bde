"""One reading of a sidecar: per-method counters from its metrics, and its ``/state``.

A `Snapshot` is made from metric families, whether parsed from the
``/metrics`` text by prometheus_client's parser (`Snapshot.from_text`, as
``sidecar top`` does) or collected from the registry itself (as the admin
index does). Counters only: what matters is their change between two
snapshots (`sidecar.top.table`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics.labels import PREFIX

REQUESTS = PREFIX + "requests_total"
RETRIES = PREFIX + "retries_total"
DURATION_BUCKET = PREFIX + "request_duration_seconds_bucket"

# Outcomes the client did not see as an error: the upstream's answer (a
# declared exception is one: the service answered), or a fallback reply.
NOT_ERRORS = frozenset({"ok", "declared_exception", "fallback"})


@dataclass
class MethodCounts:
    """The counters of one method at one moment.

    Attributes:
        outcomes: calls answered, by outcome.
        retries: retries made.
        buckets: the latency histogram: upper bound (seconds, ``inf`` last) -> cumulative count.
    """

    outcomes: dict[str, float] = field(default_factory=dict)
    retries: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    @property
    def calls(self) -> float:
        return sum(self.outcomes.values())

    @property
    def errors(self) -> float:
        return sum(v for k, v in self.outcomes.items() if k not in NOT_ERRORS)

    @property
    def fallbacks(self) -> float:
        return self.outcomes.get("fallback", 0.0)


@dataclass
class Snapshot:
    """Per-method counters and the ``/state`` document, read at ``at`` (monotonic seconds)."""

    at: float
    methods: dict[str, MethodCounts]
    state: dict[str, Any]

    @classmethod
    def from_text(cls, text: str, state: dict[str, Any], at: float) -> Snapshot:
        """From the Prometheus text format, parsed by prometheus_client."""
        return cls.from_families(text_string_to_metric_families(text), state, at)

    @classmethod
    def from_families(
        cls, families: Iterable[Metric], state: dict[str, Any], at: float
    ) -> Snapshot:
        """From metric families (parsed, or collected from a registry)."""
        methods: dict[str, MethodCounts] = {}

        def of(labels: dict[str, str]) -> MethodCounts:
            name = method_name(labels)
            found = methods.get(name)
            if found is None:
                found = methods[name] = MethodCounts()
            return found

        for family in families:
            for sample in family.samples:
                if sample.name == REQUESTS:
                    counts = of(sample.labels)
                    outcome = sample.labels.get("outcome", "")
                    counts.outcomes[outcome] = counts.outcomes.get(outcome, 0.0) + sample.value
                elif sample.name == RETRIES:
                    of(sample.labels).retries += sample.value
                elif sample.name == DURATION_BUCKET:
                    bound = float(sample.labels.get("le", "+Inf"))
                    buckets = of(sample.labels).buckets
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        return cls(at, methods, state)


def method_name(labels: dict[str, str]) -> str:
    """The name a row is shown under: ``Service:method``, or the bare method.

    Metrics with a ``service`` label carry the bare method beside it; the
    others carry ``Service:method`` in ``method``: both give the same name.
    """
    method = labels.get("method", "")
    service = labels.get("service", "")
    return f"{service}:{method}" if service else method
