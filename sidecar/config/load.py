"""`load_config`: read the YAML file, lay the environment and flags over it, validate once.

Precedence: flags > ``SIDECAR_*`` environment > file > defaults. A key
written twice in one YAML mapping is an error, not a silent "last one wins".
Relative paths (``idl``, ``fallback.cache.path``, the files of ``tls`` and
``upstream.tls``) are relative to the config file when written there, and to
the working directory when given by a flag or the environment. TLS files are
read once here (`sidecar.config.tls.check_tls_files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config.base import KeyPath
from sidecar.config.env import env_layer
from sidecar.config.messages import describe, origin_of, paragraph
from sidecar.config.model import SidecarConfig
from sidecar.config.tls import TlsFileProblem, check_tls_files, tls_sections, with_absolute_paths
from sidecar.errors import ConfigError


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[KeyPath, Any] | None = None,
    override_names: Mapping[KeyPath, str] | None = None,
) -> SidecarConfig:
    """Read, merge and validate the configuration.

    Args:
        path: the YAML file, or None for defaults only.
        environ: the environment to read ``SIDECAR_*`` from (``os.environ`` if None;
            pass ``{}`` to ignore the environment).
        overrides: key paths set by command-line flags; they win over everything.
        override_names: the flag that set each override (``--listen``), for messages.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or bad value. The
            message names the file, the key path, the value, and the
            environment variable or flag that set it.
    """
    source = str(path) if path is not None else None
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(Path(path))
    env_values, env_names = env_layer(os.environ if environ is None else environ)
    origins: dict[KeyPath, str] = {p: f"environment variable {n}" for p, n in env_names.items()}
    flags = dict(overrides or {})
    for key_path in flags:
        origins[key_path] = (override_names or {}).get(key_path, "a command-line flag")
    for layer in (env_values, flags):
        for key_path, value in layer.items():
            set_path(data, key_path, value)
    try:
        config = SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe(exc, source, origins)) from None
    return _resolve_paths(config, source, origins)


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} for an empty file).

    Raises:
        ConfigError: unreadable, not UTF-8, not YAML, a key written twice, or
            a top level that is not a mapping of names.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({exc})") from None
    try:
        data = yaml.load(text, Loader=StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        hint = " (YAML indents with spaces, not tabs)" if "'\\t'" in problem else ""
        raise ConfigError(
            f"invalid configuration in {path}: not valid YAML{where}: {problem}"
            + (f" ({context})" if context else "")
            + hint
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid configuration in {path}: the top level must be a mapping of keys "
            f"(key: value lines), not a {_yaml_kind(data)}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"invalid configuration in {path}: {bad[0]!r}: keys must be names")
    return data


class StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that rejects a key written twice in one mapping.

    PyYAML keeps the last of two equal keys without a word, which hides the
    first setting; here it is an error that names both lines.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key_node.value!r} appears twice in one mapping (first on line "
                    f"{seen[key] + 1}); only one can count",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_kind(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "plain string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def set_path(data: dict[str, Any], key_path: KeyPath, value: Any) -> None:
    """Set ``value`` at ``key_path`` in nested mappings, making (or replacing) those on the way."""
    node = data
    for key in key_path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[key_path[-1]] = value


def _resolve_paths(
    config: SidecarConfig, source: str | None, origins: Mapping[KeyPath, str]
) -> SidecarConfig:
    """Paths from the file are relative to the file, others to the working directory."""

    def base_for(key_path: KeyPath) -> Path:
        if source is None or origin_of(key_path, origins):
            return Path.cwd()
        return Path(source).parent

    updates: dict[str, Any] = {}
    if config.idl is not None:
        idl = Path(config.idl)
        if not idl.is_absolute():
            idl = (base_for(("idl",)) / idl).resolve()
        if not idl.is_file():
            origin = origin_of(("idl",), origins)
            why = "is a directory" if idl.is_dir() else "file not found"
            key = f"idl (from {origin})" if origin else "idl"
            line = f"{key}: {why}: {config.idl!r} (looked at {idl})"
            raise ConfigError(paragraph([(line, origin)], source))
        updates["idl"] = str(idl)
    cache = config.fallback.cache
    if cache.path is not None and not Path(cache.path).is_absolute():
        resolved = str((base_for(("fallback", "cache", "path")) / cache.path).resolve())
        new_cache = cache.model_copy(update={"path": resolved})
        updates["fallback"] = config.fallback.model_copy(update={"cache": new_cache})
    for at, section in tls_sections(config):
        section = with_absolute_paths(section, base_for, at)
        try:
            check_tls_files(at, section)
        except TlsFileProblem as exc:
            origin = origin_of(exc.key, origins)
            key = ".".join(exc.key) + (f" (from {origin})" if origin else "")
            raise ConfigError(paragraph([(f"{key}: {exc}", origin)], source)) from None
        if at == ("tls",):
            updates["tls"] = section
        else:
            upstream = updates.get("upstream", config.upstream)
            updates["upstream"] = upstream.model_copy(update={"tls": section})
    return config.model_copy(update=updates) if updates else config
