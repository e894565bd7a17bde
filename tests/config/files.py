"""Config files for the tests: write one, or load one and return its error message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import load_config
from sidecar.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_IDL = REPO / "idl" / "example.thrift"
SHIPPED = REPO / "config" / "sidecar.yaml"
DEMO = REPO / "config" / "demo.yaml"


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "c.yaml") -> Path:
    """``data`` (YAML text, or data dumped as YAML) in ``tmp_path/name``."""
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict[str, Any] | str, **kwargs: Any) -> str:
    """The message of the `ConfigError` that loading ``data`` must raise (no environment)."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), environ=kwargs.pop("environ", {}), **kwargs)
    return str(info.value)
