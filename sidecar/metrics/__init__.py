"""The sidecar's metrics: the registry of every metric, the method-label cap, the per-call figures.

`registry` defines `SidecarMetrics`, `labels` the name prefix, the fixed label
values and `MethodLabels`, `calls` the per-call figures exported on scrape
(`CallMetrics`). Every name is re-exported here.
"""

from sidecar.metrics.calls import LATENCY_BUCKETS, CallMetrics, MethodStats
from sidecar.metrics.labels import (
    BREAKER_TRANSITIONS,
    CONNECTION_STATES,
    CONTROL_ACTIONS,
    HEALTH_CHECK_RESULTS,
    LABEL_DOCS,
    OTHER,
    PREFIX,
    PROTOCOL_ERROR_KINDS,
    RELOAD_RESULTS,
    MethodLabels,
    split_name,
)
from sidecar.metrics.registry import SidecarMetrics, UnsetGauge

__all__ = [
    "BREAKER_TRANSITIONS",
    "CONNECTION_STATES",
    "CONTROL_ACTIONS",
    "HEALTH_CHECK_RESULTS",
    "LABEL_DOCS",
    "LATENCY_BUCKETS",
    "OTHER",
    "PREFIX",
    "PROTOCOL_ERROR_KINDS",
    "RELOAD_RESULTS",
    "CallMetrics",
    "MethodLabels",
    "MethodStats",
    "SidecarMetrics",
    "UnsetGauge",
    "split_name",
]
