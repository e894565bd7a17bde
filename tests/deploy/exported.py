"""The metric names the sidecar exports, as docs/metrics-reference.md lists them.

The reference is generated from the sidecar's registry (tests/test_docs.py
keeps it current), so rules and dashboards are checked against it without
starting a sidecar. `series_names` gives the names a scrape shows: a
histogram's ``_bucket``, ``_sum`` and ``_count`` series.
"""

from __future__ import annotations

import re

from tests.support.sidecar import REPO_ROOT

METRICS_REFERENCE = REPO_ROOT / "docs" / "metrics-reference.md"

# Exported once the event-loop lag gauge lands; the alert rules already use it.
EVENT_LOOP_LAG = "thrift_sidecar_event_loop_lag_seconds"

# A PromQL metric name that is not part of a recorded name (level:metric:operations).
METRIC_NAME = re.compile(r"(?<![\w:])thrift_sidecar_\w+(?![\w:])")


def reference_metrics() -> dict[str, str]:
    """Metric name → type, from the reference's table."""
    rows = re.findall(
        r"^\| `(thrift_sidecar_\w+)` \| (\w+) \|", METRICS_REFERENCE.read_text(), re.M
    )
    assert rows, f"no metric table in {METRICS_REFERENCE}"
    return dict(rows)


def series_names(metrics: dict[str, str]) -> set[str]:
    names = set()
    for name, kind in metrics.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def used_metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))
