"""Reference documents generated from the code, so that they cannot drift from it.

``python -m sidecar.docs config`` prints the configuration reference (every
key's dotted path, type, default and meaning) built from the pydantic models
in `sidecar.config` and their field descriptions; ``python -m sidecar.docs
metrics`` prints the metrics reference (every metric's name, type, labels and
meaning) read off the live registry of a fresh `sidecar.metrics.SidecarMetrics`.
``--check FILE`` exits 1 when FILE differs from it, ``--write FILE`` rewrites
FILE. The checked-in copies are ``docs/config-reference.md`` and
``docs/metrics-reference.md``; tests fail when they are stale.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from sidecar.config import (
    ENV_SHORTCUTS,
    SidecarConfig,
    field_kind,
    format_duration,
    format_size,
    require_positive,
    split_optional,
)

# How a mapping key is shown in a key path (``methods.<method>.idempotent``).
_MAP_KEY = {"methods": "<method>"}


@dataclass(frozen=True)
class KeyDoc:
    """One documented key."""

    path: str
    type: str
    default: str
    description: str
    section: bool


def _model(annotation: Any) -> type[BaseModel] | None:
    inner, _ = split_optional(annotation)
    if isinstance(inner, type) and issubclass(inner, BaseModel):
        return inner
    return None


def iter_keys(
    model: type[BaseModel] = SidecarConfig, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo]]:
    """Every key below ``model`` as (dotted path, field), sections before their keys."""
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        yield path, field
        child = _model(field.annotation)
        origin = typing.get_origin(field.annotation)
        if child is not None:
            yield from iter_keys(child, path + ".")
        elif origin is dict:
            value_type = typing.get_args(field.annotation)[1]
            if isinstance(value_type, type) and issubclass(value_type, BaseModel):
                yield from iter_keys(value_type, f"{path}.{_MAP_KEY.get(path, '<key>')}.")


def key_paths() -> list[str]:
    """Every key path of the configuration, e.g. ``retry.budget.ratio``."""
    return [path for path, _ in iter_keys()]


def _bounds(field: FieldInfo) -> str:
    low = high = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = item.ge
        elif isinstance(item, annotated_types.Le):
            high = item.le
    if low is not None and high is not None:
        return f", {low:g} to {high:g}"
    if low is not None:
        return f", at least {low:g}"
    return ""


def _type_name(annotation: Any, field: FieldInfo | None = None) -> str:
    inner, nullable = split_optional(annotation)
    kind = field_kind(annotation, field.metadata if field else ())
    bounds = _bounds(field) if field is not None else ""
    origin = typing.get_origin(inner)
    if kind == "duration":
        text = "duration"
        if any(getattr(m, "func", None) is require_positive for m in _meta(annotation, field)):
            text += ", more than 0"
    elif kind == "size":
        text = "size"
    elif kind == "address":
        text = "HOST:PORT"
    elif _model(inner) is not None:
        text = "section"
    elif origin is Literal or (origin is typing.Annotated and _literal(inner)):
        text = "one of " + ", ".join(f"`{v}`" for v in _literal(inner))
    elif origin is tuple:
        item = typing.get_args(inner)[0]
        item_kind = field_kind(item)
        if _literal(item):
            text = "list of " + ", ".join(f"`{v}`" for v in _literal(item))
        elif item_kind == "address":
            text = "list of HOST:PORT"
        else:
            text = "list of glob patterns" if item is str else f"list of {_type_name(item)}"
    elif origin is dict:
        value_type = typing.get_args(inner)[1]
        text = "mapping of sections" if _model(value_type) else "mapping"
    elif inner is bool:
        text = "boolean"
    elif inner is int:
        text = "integer" + bounds
    elif inner is float:
        text = "number" + bounds
    elif inner is str:
        text = "string"
    elif inner is Any:
        text = "any YAML value"
    else:  # pragma: no cover - a new type: teach this function its name
        raise TypeError(f"no documented name for {inner!r}")
    return f"{text}, or null" if nullable else text


def _meta(annotation: Any, field: FieldInfo | None) -> list[Any]:
    found = list(field.metadata) if field is not None else []
    for arg in (annotation, *typing.get_args(annotation)):
        found += [m for m in getattr(arg, "__metadata__", ()) if hasattr(m, "func")]
    return [m for m in found if hasattr(m, "func")]


def _literal(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    return ()


def _default(field: FieldInfo) -> str:
    if _model(field.annotation) is not None and field.default is not None:
        return ""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "(required)"
    value = field.get_default(call_default_factory=True)
    kind = field_kind(field.annotation, field.metadata)
    return f"`{_render(value, kind)}`"


def _render(value: Any, kind: str | None) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_render(v, None) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v, None)}" for k, v in value.items()) + "}"
    if kind == "duration":
        return format_duration(value)
    if kind == "size":
        return format_size(value)
    return str(value)


def config_keys() -> list[KeyDoc]:
    """Every key with its type, default and description.

    Raises:
        ValueError: a field has no description (every field must say what it is for).
    """
    docs = []
    for path, field in iter_keys():
        if not field.description:
            raise ValueError(f"config key {path} has no Field(description=...)")
        section = _model(field.annotation) is not None
        docs.append(
            KeyDoc(
                path=path,
                type=_type_name(field.annotation, field),
                default=_default(field),
                description=field.description,
                section=section,
            )
        )
    return docs


_CONFIG_INTRO = """\
# Configuration reference

<!-- Generated by `python -m sidecar.docs config` from the models in sidecar/config/;
     do not edit. tests/ops/test_docs.py fails when this file differs from what the code
     generates. -->

Every key of the sidecar's YAML config file, with its type, default and
meaning. Every key is optional. `config/sidecar.yaml` shows them all with
their defaults and a one-line comment each; `sidecar check-config FILE`
validates a file and prints the effective configuration.

- **Precedence**: command-line flags > `SIDECAR_*` environment variables >
  the config file > the defaults below.
- **Environment**: any key as `SIDECAR_<SECTION>__<KEY>` (upper case, `__`
  between levels), e.g. `SIDECAR_RETRY__MAX_ATTEMPTS=4`; lists are
  comma-separated; `null` sets null; an empty variable counts as unset.
  `SIDECAR_CONFIG` names the config file; a variable that names no key is an
  error, except the service-link variables Kubernetes injects for a Service
  named `sidecar` or `sidecar-…` (`SIDECAR_SERVICE_HOST`, `SIDECAR_PORT`,
  `SIDECAR_PORT_9090_TCP_ADDR`, ...), which are ignored. Short names for the
  common keys:{shortcuts}
- **Durations** are written `250ms`, `2s`, `1m`, `1h` (a bare number means
  seconds); **sizes** `64KiB`, `16MiB`, `1GiB` (also `KB`, `MB`, `GB`; a bare
  number means bytes).
- **Errors**: an unknown key or a bad value stops `sidecar run` and
  `sidecar check-config` with exit status 2 and a message that names the key
  path, the bad value, and the variable or flag that set it.
- `<method>` stands for an exact method name (`getItem`) or
  `Service:method`; patterns are not allowed there.
"""


def render_config_reference() -> str:
    """The Markdown text of ``docs/config-reference.md``."""
    shortcuts = "".join(
        f"\n  - `{name}`: `{'.'.join(path)}`" for name, path in sorted(ENV_SHORTCUTS.items())
    )
    out = [_CONFIG_INTRO.replace("{shortcuts}", shortcuts).rstrip("\n")]
    keys = config_keys()
    groups: list[tuple[str, str, list[KeyDoc]]] = [("Top level", "", [])]
    for name, field in SidecarConfig.model_fields.items():
        model = _model(field.annotation)
        if model is None and typing.get_origin(field.annotation) is not dict:
            groups[0][2].extend(k for k in keys if k.path == name)
            continue
        doc = (model.__doc__ or "").strip().splitlines()[0] if model else field.description
        members = [k for k in keys if k.path.startswith(name + ".")]
        groups.append((f"`{name}`", doc or "", members))
    for title, doc, members in groups:
        if not members:
            continue
        out.append(f"\n## {title}\n")
        if doc:
            out.append(f"{doc}\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for k in members:
            out.append(
                f"| `{k.path}` | {_cell(k.type)} | {_cell(k.default)} | {_cell(k.description)} |"
            )
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


@dataclass(frozen=True)
class MetricDoc:
    """One documented metric, as exported."""

    name: str
    type: str
    labels: tuple[str, ...]
    help: str


def metric_docs() -> list[MetricDoc]:
    """Every metric of a fresh `SidecarMetrics`, read off its live registry, in order.

    Raises:
        ValueError: a metric whose label names were not recorded, or a label
            without an entry in `sidecar.metrics.LABEL_DOCS`.
    """
    from sidecar.metrics import LABEL_DOCS, SidecarMetrics

    metrics = SidecarMetrics()
    docs = []
    for family in metrics.registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        if name not in metrics.label_names:
            raise ValueError(f"metric {name} is not in SidecarMetrics.label_names")
        labels = metrics.label_names[name]
        for label in labels:
            if label not in LABEL_DOCS:
                raise ValueError(f"label {label!r} of {name} has no entry in LABEL_DOCS")
        docs.append(MetricDoc(name, family.type, labels, family.documentation))
    return docs


_METRICS_INTRO = """\
# Metrics reference

<!-- Generated by `python -m sidecar.docs metrics` from the registry of
     sidecar/metrics.py; do not edit. tests/ops/test_docs.py fails when this
     file differs from what the code generates. -->

Every metric the sidecar exports on `GET /metrics` of its admin address
(`metrics.listen`, default `0.0.0.0:9464`), in the Prometheus text format.

- Names: prefix `thrift_sidecar_`, base units (seconds, bytes), `_total` on
  counters. The process and Python metrics of prometheus_client are not
  exported (the sidecar uses a registry of its own), nor are the `_created`
  series prometheus_client adds to counters.
- Bounded labels: `method` comes from the wire, so its values are capped
  (methods from the config and the IDL, then new names until
  `metrics.max_method_labels`, default 200, then `other`); nothing is
  labelled by peer, seqid or error text.
- Series that exist from start-up, at 0: per configured or IDL method,
  `requests_total{{outcome="ok"}}`, the latency histogram,
  `upstream_attempts_total{{result="ok"}}` per address and
  `fallback_replies_total` for the sources it can be served from; per
  breaker, its state, timestamps, rejections and the four transitions; per
  upstream, the budget metrics; per address, ejections and connections;
  every `protocol_errors_total` kind; both `config_reloads_total` results.
- `request_duration_seconds` is a histogram: `_bucket{{le=...}}`, `_sum`
  and `_count`, with bounds {buckets} seconds.
"""


_METRICS_QUERIES = """
## Queries

```promql
# Share of calls per method that failed for the client: the upstream failed and no fallback
# was served, or the circuit was open (answers, declared exceptions included, are not failures).
sum by (method) (rate(thrift_sidecar_requests_total{
    outcome!~"ok|declared_exception|app_exception|fallback"}[5m]))
  / sum by (method) (rate(thrift_sidecar_requests_total[5m]))

# 99th percentile latency per method, retries and backoff included.
histogram_quantile(0.99,
  sum by (le, method) (rate(thrift_sidecar_request_duration_seconds_bucket[5m])))

# Attempts per call reaching the upstream (1.0: no retries; the budget keeps it near 1 + ratio).
sum(rate(thrift_sidecar_upstream_attempts_total[5m]))
  / sum(rate(thrift_sidecar_requests_total{outcome!~"circuit_open|bad_request"}[5m]))

# An open breaker (alert), and how often breakers open.
max by (breaker) (thrift_sidecar_breaker_state) == 2
increase(thrift_sidecar_breaker_transitions_total{to_state="open"}[1h])

# Retries refused because the budget ran dry: the upstream is failing more than retries can hide.
rate(thrift_sidecar_retry_budget_exhausted_total[5m]) > 0

# Method names spilling into "other": raise metrics.max_method_labels or configure the IDL.
rate(thrift_sidecar_requests_total{method="other"}[5m]) > 0
```
"""


def render_metrics_reference() -> str:
    """The Markdown text of ``docs/metrics-reference.md``."""
    from sidecar.metrics import LABEL_DOCS, LATENCY_BUCKETS

    docs = metric_docs()
    buckets = ", ".join(f"{b:g}" for b in LATENCY_BUCKETS)
    out = [_METRICS_INTRO.format(buckets=buckets).rstrip("\n")]
    out.append("\n## Metrics\n")
    out.append("| metric | type | labels | meaning |")
    out.append("|---|---|---|---|")
    for d in docs:
        labels = ", ".join(f"`{label}`" for label in d.labels) or "-"
        out.append(f"| `{d.name}` | {d.type} | {labels} | {_cell(d.help)} |")
    used = sorted({label for d in docs for label in d.labels})
    out.append("\n## Labels\n")
    out.append("| label | meaning and values |")
    out.append("|---|---|")
    for label in used:
        out.append(f"| `{label}` | {_cell(LABEL_DOCS[label])} |")
    out.append(_METRICS_QUERIES.rstrip("\n"))
    return "\n".join(out) + "\n"


TARGETS: dict[str, tuple[Callable[[], str], str]] = {
    "config": (render_config_reference, "docs/config-reference.md"),
    "metrics": (render_metrics_reference, "docs/metrics-reference.md"),
}


def main(argv: list[str] | None = None) -> int:
    """Print, write or check a generated document. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.docs", description="Reference documents generated from the code."
    )
    parser.add_argument("target", choices=sorted(TARGETS), help="which document")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="FILE", help="write the document to FILE")
    group.add_argument("--check", metavar="FILE", help="exit 1 if FILE is not up to date")
    args = parser.parse_args(argv)
    render, default_path = TARGETS[args.target]
    text = render()
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    elif args.check:
        path = Path(args.check)
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(
                f"{path} is out of date; regenerate it with "
                f"`python -m sidecar.docs {args.target} --write {default_path}`",
                file=sys.stderr,
            )
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
