"""Typed configuration: one YAML file, environment overrides, flags; validated once.

Keys are the contract in the design (§8): scripts and users write them, so
keys are added freely and never renamed. Unknown keys are errors: they are
nearly always typos. Precedence: flags > ``SIDECAR_*`` environment > file >
defaults. `load_config` raises one `ConfigError` listing every problem.

The modules, each with one job:

- `base`: the section base model, key paths, outcome names;
- `units`: durations, sizes and addresses, parsed and formatted;
- `upstream`, `policy`, `fallback`, `operations`, `hedge`, `overrides`, `model`:
  the pydantic models, a module per group of sections, `SidecarConfig` on
  top; every field carries its default and the description from which
  docs/config-reference.md is generated;
- `names`: the one table of flags and short environment variables;
- `keys`: walking the models by key path;
- `env`: the ``SIDECAR_*`` layer; `load`: files, merging, relative paths;
- `messages`: validation errors as one readable paragraph;
- `dump`: a config as YAML again;
- `methods`: which per-method settings and patterns apply to a wire name;
- `checks`: what a valid config still needs to run, and warnings;
- `tls`: the ``tls`` and ``upstream.tls`` sections and the checks of their files.

This package re-exports their public names.
"""

from __future__ import annotations

from sidecar.config.base import (
    FailureOutcome,
    FieldProblem,
    KeyPath,
    Outcome,
    RetryableOutcome,
    Section,
)
from sidecar.config.checks import config_warnings, require_upstream
from sidecar.config.dump import dump_yaml, to_yaml_data
from sidecar.config.env import env_overrides, env_sources, is_service_link
from sidecar.config.fallback import CacheConfig, FallbackConfig
from sidecar.config.keys import annotation_at, format_key, split_optional
from sidecar.config.load import load_config
from sidecar.config.messages import redact
from sidecar.config.methods import is_idempotent, matches_any, method_overrides
from sidecar.config.model import SidecarConfig
from sidecar.config.names import ENV_SHORTCUTS, FLAG_KEYS, SHORT_NAMES, env_name
from sidecar.config.operations import ControlConfig, LogConfig, MetricsConfig, ReadinessConfig
from sidecar.config.overrides import MethodConfig, MethodFallback, RetryOverride, StaticException
from sidecar.config.policy import BreakerConfig, BudgetConfig, RetryConfig, StateConfig
from sidecar.config.tls import ServerTlsConfig, UpstreamTlsConfig, certificate_validity
from sidecar.config.units import (
    Address,
    Duration,
    PositiveDuration,
    Size,
    field_kind,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_size,
    require_positive,
    split_address,
)
from sidecar.config.upstream import EjectionConfig, UpstreamConfig

__all__ = [
    "ENV_SHORTCUTS",
    "FLAG_KEYS",
    "SHORT_NAMES",
    "Address",
    "BreakerConfig",
    "BudgetConfig",
    "CacheConfig",
    "ControlConfig",
    "Duration",
    "EjectionConfig",
    "FailureOutcome",
    "FallbackConfig",
    "FieldProblem",
    "KeyPath",
    "LogConfig",
    "MethodConfig",
    "MethodFallback",
    "MetricsConfig",
    "Outcome",
    "PositiveDuration",
    "ReadinessConfig",
    "RetryConfig",
    "RetryOverride",
    "RetryableOutcome",
    "Section",
    "ServerTlsConfig",
    "SidecarConfig",
    "Size",
    "StateConfig",
    "StaticException",
    "UpstreamConfig",
    "UpstreamTlsConfig",
    "annotation_at",
    "certificate_validity",
    "config_warnings",
    "dump_yaml",
    "env_name",
    "env_overrides",
    "env_sources",
    "field_kind",
    "format_duration",
    "format_key",
    "format_size",
    "is_idempotent",
    "is_service_link",
    "load_config",
    "matches_any",
    "method_overrides",
    "parse_address",
    "parse_duration",
    "parse_size",
    "redact",
    "require_positive",
    "require_upstream",
    "split_address",
    "split_optional",
    "to_yaml_data",
]
