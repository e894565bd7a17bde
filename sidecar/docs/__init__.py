"""Reference documents generated from the code, so that they cannot drift from it.

``python -m sidecar.docs config`` prints the configuration reference (every
key's dotted path, type, default and meaning) built from the pydantic models
in `sidecar.config` and their field descriptions; ``python -m sidecar.docs
metrics`` prints the metrics reference (every metric's name, type, labels and
meaning) read off the live registry of a fresh `sidecar.metrics.SidecarMetrics`.
``--check FILE`` exits 1 when FILE differs from it, ``--write FILE`` rewrites
FILE. The checked-in copies are ``docs/config-reference.md`` and
``docs/metrics-reference.md``; tests fail when they are stale.

`config_reference` and `metrics_reference` generate the two documents,
`command` is the command line; their public names are re-exported here.
"""

from sidecar.docs.command import TARGETS, main
from sidecar.docs.config_reference import (
    KeyDoc,
    config_keys,
    iter_keys,
    key_paths,
    render_config_reference,
)
from sidecar.docs.metrics_reference import MetricDoc, metric_docs, render_metrics_reference

__all__ = [
    "TARGETS",
    "KeyDoc",
    "MetricDoc",
    "config_keys",
    "iter_keys",
    "key_paths",
    "main",
    "metric_docs",
    "render_config_reference",
    "render_metrics_reference",
]
