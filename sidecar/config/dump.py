"""A config as YAML again: durations and sizes with units, keys in model order.

Loading the text back (as a config file) gives the same config; ``sidecar
check-config`` prints the effective configuration this way.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from sidecar.config.units import field_kind, format_duration, format_size


def to_yaml_data(model: BaseModel) -> dict[str, Any]:
    """A model as plain YAML data, with durations and sizes written with units.

    Loading the result again (as a config file) gives the same config.
    """
    out: dict[str, Any] = {}
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        kind = field_kind(field.annotation, field.metadata)
        out[name] = _plain(value, kind)
    return out


class _Dumper(yaml.SafeDumper):
    """Lists of plain values on one line (``[a, b]``), as people write them."""


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> yaml.Node:
    flow = all(not isinstance(v, dict | list) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


def dump_yaml(data: Any) -> str:
    """YAML text of `to_yaml_data` output, keys in model order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def _plain(value: Any, kind: str | None) -> Any:
    if isinstance(value, BaseModel):
        return to_yaml_data(value)
    if isinstance(value, dict):
        return {k: _plain(v, None) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v, None) for v in value]
    if value is None or isinstance(value, bool):
        return value
    if kind == "duration":
        return format_duration(value)
    if kind == "size":
        return format_size(value)
    return value
