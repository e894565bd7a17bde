"""The effective config as YAML: units written back, loads back as the same config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from sidecar.config import SidecarConfig, dump_yaml, load_config, to_yaml_data
from sidecar.config.units import parse_duration, parse_size
from sidecar.docs import key_paths
from tests.config.files import SHIPPED, write


def test_effective_config_dump_loads_back_the_same(tmp_path: Path) -> None:
    config = load_config(SHIPPED, environ={})
    text = dump_yaml(to_yaml_data(config))
    assert "max_frame_size: 16MiB" in text
    assert "initial_backoff: 25ms" in text
    assert "retry_on: [connect_error, connection_closed, timeout]" in text
    again = load_config(write(tmp_path, text), environ={})
    assert again == config


def test_shipped_config_states_every_default() -> None:
    """config/sidecar.yaml's values are the defaults, except the marked examples."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    defaults = to_yaml_data(SidecarConfig())
    examples = {"idl", "methods"}
    for key, value in defaults.items():
        if key in examples:
            continue
        if key == "upstream":
            value = {**value, "addresses": shipped["upstream"]["addresses"]}
        assert _normalise(shipped[key]) == _normalise(value), key


def _normalise(value: Any) -> Any:
    """Parse units so that `10.0` and `10`, or `5m` and `300s`, compare equal."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, str):
        for parse in (parse_duration, parse_size):
            try:
                return float(parse(value))
            except ValueError:
                pass
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _yaml_key_paths(data: Any, prefix: str = "") -> set[str]:
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            name = "<method>" if prefix == "methods." else str(key)
            path = prefix + name
            found.add(path)
            if key in ("static", "value") and prefix.endswith(("fallback.", "static_exception.")):
                continue  # the value of a static reply is the service's data, not keys
            found |= _yaml_key_paths(value, path + ".")
    return found


def _commented_keys(text: str) -> set[str]:
    """Keys of the commented ``# tls:``, ``# health_check:`` and
    ``# adaptive_concurrency:`` example blocks (all off in the shipped file)."""
    found: set[str] = set()
    section = ""
    block: str | None = None
    for line in text.splitlines():
        if re.match(r"^(\w+):", line):
            section = line.split(":", 1)[0]
        opening = re.match(r"^\s*#\s*(tls|health_check|adaptive_concurrency):", line)
        if opening:
            block = opening.group(1)
            continue
        match = re.match(r"^\s*#\s+(\w+):", line)
        if block is None or match is None:
            if not re.match(r"^\s*#\s{3,}", line):  # a comment's continuation keeps the block
                block = None
            continue
        if block == "tls":
            prefix = "upstream.tls." if section == "upstream" else "tls."
        elif block == "health_check":
            prefix = "health_check."
        else:
            prefix = f"upstream.{block}." if section == "upstream" else f"{block}."
        found.add(prefix + match.group(1))
    return found


def test_shipped_config_mentions_every_key() -> None:
    text = SHIPPED.read_text()
    written = _yaml_key_paths(yaml.safe_load(text)) | _commented_keys(text)
    written.discard("methods")
    missing = sorted(set(key_paths()) - written - {"methods"})
    assert not missing, f"config/sidecar.yaml does not mention {missing}"
    unknown = sorted(written - set(key_paths()) - {"methods.<method>"})
    assert not unknown
