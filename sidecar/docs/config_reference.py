"""The configuration reference, generated from the config models (``docs/config-reference.md``).

Every key's dotted path, type, default and meaning, built from the pydantic
models in `sidecar.config` and their field descriptions; a field without a
description is an error.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
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
from sidecar.config.hedge import normalise_hedge_delay
from sidecar.docs.markdown import cell

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
    elif any(getattr(m, "func", None) is normalise_hedge_delay for m in _meta(annotation, field)):
        text = "duration or percentile (`p95`)"
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
    elif typing.get_origin(inner) in (typing.Union, types.UnionType) and set(
        typing.get_args(inner)
    ) == {int, Literal["auto"]}:
        text = "integer (1 to 64) or `auto`"
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
     do not edit. tests/test_docs.py fails when this file differs from what the code
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
                f"| `{k.path}` | {cell(k.type)} | {cell(k.default)} | {cell(k.description)} |"
            )
    return "\n".join(out) + "\n"
