"""Typed configuration: one YAML file, environment overrides, flags; validated once.

Keys are the contract in the design (§8): scripts and users write them, so
keys are added freely and never renamed. Durations are written ``250ms``,
``2s``, ``1m`` (a bare number means seconds) and held as float seconds;
sizes are written ``16MiB``, ``64KiB`` (a bare number means bytes) and held as
int bytes. Unknown keys are errors: they are nearly always typos.

Precedence: flags > ``SIDECAR_*`` environment > file > defaults. Every key can
be set from the environment as ``SIDECAR_<SECTION>__<KEY>`` (for example
``SIDECAR_RETRY__MAX_ATTEMPTS=4``), and the common ones have short names
(`ENV_SHORTCUTS`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.errors import ConfigError

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(-?\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: Any) -> float:
    """``"250ms"`` → 0.25; numbers are seconds. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 250ms, 2s or 1m (units: ms, s, m, h)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """``"16MiB"`` → 16777216; numbers are bytes. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 16MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(
            "expected a size such as 64KiB or 16MiB (units: B, KiB, MiB, GiB, KB, MB, GB)"
        )
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_address(value: Any) -> str:
    """Check ``host:port`` (IPv6 as ``[::1]:port``) and return it unchanged."""
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:9090")
    split_address(value)
    return value


def split_address(value: str) -> tuple[str, int]:
    """``"host:port"`` → (host, port). Raises ValueError on a malformed address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:9090")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[str, BeforeValidator(parse_address)]

Outcome = Literal[
    "ok",
    "declared_exception",
    "app_exception",
    "internal_error",
    "connect_error",
    "connection_closed",
    "timeout",
    "protocol_error",
]
RetryableOutcome = Literal[
    "internal_error", "connect_error", "connection_closed", "timeout", "protocol_error"
]
FailureOutcome = RetryableOutcome


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EjectionConfig(_Section):
    """Passive ejection of upstream addresses that keep failing."""

    consecutive_failures: int = Field(5, ge=1)
    base_time: Duration = 5.0
    max_time: Duration = 300.0
    max_percent: int = Field(50, ge=0, le=100)


class UpstreamConfig(_Section):
    """Where calls go and how the connections to there are kept."""

    addresses: tuple[Address, ...] = ()
    transport: Literal["same", "framed", "buffered"] = "same"
    pool_size: int = Field(64, ge=1)
    connect_timeout: Duration = 0.5
    idle_timeout: Duration = 60.0
    ejection: EjectionConfig = EjectionConfig()


class BudgetConfig(_Section):
    """The retry budget shared by all calls to one upstream."""

    ratio: float = Field(0.2, ge=0)
    min_retries_per_second: float = Field(10.0, ge=0)
    window: Duration = 10.0

    @field_validator("window")
    @classmethod
    def _positive_window(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("the budget window must be longer than zero")
        return value


class RetryConfig(_Section):
    """How a failed call is tried again."""

    max_attempts: int = Field(3, ge=1, le=100)
    initial_backoff: Duration = 0.025
    multiplier: float = Field(2.0, ge=1.0)
    max_backoff: Duration = 1.0
    per_try_timeout: Duration = 1.0
    deadline: Duration = 5.0
    retry_on: tuple[RetryableOutcome, ...] = ("connect_error", "connection_closed", "timeout")
    idempotent: tuple[str, ...] = ("get*", "list*", "ping")
    budget: BudgetConfig = BudgetConfig()

    @model_validator(mode="after")
    def _positive_timeouts(self) -> RetryConfig:
        for key in ("per_try_timeout", "deadline"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be longer than zero")
        return self


class RetryOverride(_Section):
    """Per-method retry settings; unset keys inherit from ``retry``."""

    max_attempts: int | None = Field(None, ge=1, le=100)
    initial_backoff: Duration | None = None
    multiplier: float | None = Field(None, ge=1.0)
    max_backoff: Duration | None = None
    per_try_timeout: Duration | None = None
    deadline: Duration | None = None
    retry_on: tuple[RetryableOutcome, ...] | None = None


class BreakerConfig(_Section):
    """The circuit breaker in front of the upstream."""

    scope: Literal["upstream", "method"] = "upstream"
    fail_max: int = Field(5, ge=1)
    reset_timeout: Duration = 30.0
    success_threshold: int = Field(1, ge=1)
    half_open_max_calls: int = Field(1, ge=1)
    trip_on: tuple[FailureOutcome, ...] = (
        "internal_error",
        "connect_error",
        "connection_closed",
        "timeout",
        "protocol_error",
    )


class CacheConfig(_Section):
    """Where fallback replies are kept, and for how long."""

    backend: Literal["memory", "sqlite", "redis"] = "memory"
    path: str | None = None
    ttl: Duration = 600.0
    max_entries: int = Field(100_000, ge=1)
    max_bytes: Size = 256 << 20

    @model_validator(mode="after")
    def _sqlite_needs_path(self) -> CacheConfig:
        if self.backend == "sqlite" and not self.path:
            raise ValueError("backend sqlite needs fallback.cache.path")
        return self


class FallbackConfig(_Section):
    """When and from where replies are served while the upstream cannot answer."""

    serve_on: tuple[Literal["breaker_open", "retries_exhausted"], ...] = (
        "breaker_open",
        "retries_exhausted",
    )
    methods: tuple[str, ...] | None = None
    cache_declared_exceptions: bool = False
    cache: CacheConfig = CacheConfig()


class StaticException(_Section):
    """A declared exception of the method, served as a static fallback."""

    name: str
    value: dict[str, Any] = Field(default_factory=dict)


class MethodFallback(_Section):
    """A fixed reply for one method, checked against the IDL at start-up."""

    static: Any = None
    static_exception: StaticException | None = None
    cache: bool | None = None

    @model_validator(mode="after")
    def _one_static(self) -> MethodFallback:
        if self.static is not None and self.static_exception is not None:
            raise ValueError("set static or static_exception, not both")
        return self


class MethodConfig(_Section):
    """Per-method overrides; the key is a method name or ``Service:method``."""

    idempotent: bool | None = None
    retry: RetryOverride = RetryOverride()
    fallback: MethodFallback = MethodFallback()


class StateConfig(_Section):
    """Shared state for a fleet of sidecars."""

    redis_url: str | None = None
    timeout: Duration = 0.05
    refresh_interval: Duration = 0.25
    key_prefix: str = "thrift-sidecar"


class MetricsConfig(_Section):
    """The admin HTTP endpoint: metrics, health, state."""

    listen: Address | None = "0.0.0.0:9464"
    max_method_labels: int = Field(200, ge=1)


class LogConfig(_Section):
    """Log level and format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class SidecarConfig(_Section):
    """The whole configuration."""

    listen: Address = "0.0.0.0:9090"
    transport: Literal["auto", "framed", "buffered"] = "auto"
    max_frame_size: Size = 16 << 20
    max_connections: int = Field(10_000, ge=1)
    max_depth: int = Field(64, ge=1, le=10_000)
    idle_timeout: Duration = 300.0
    drain_timeout: Duration = 10.0
    idl: str | None = None
    upstream: UpstreamConfig = UpstreamConfig()
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    fallback: FallbackConfig = FallbackConfig()
    methods: dict[str, MethodConfig] = Field(default_factory=dict)
    state: StateConfig = StateConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()

    @field_validator("max_frame_size")
    @classmethod
    def _frame_size_range(cls, value: int) -> int:
        if not 64 <= value <= (1 << 31) - 1:
            raise ValueError("max_frame_size must be between 64B and 2GiB - 1")
        return value


# Short environment names for the common keys (design §8); every key also has
# the generic SIDECAR_<SECTION>__<KEY> form.
ENV_SHORTCUTS: dict[str, tuple[str, ...]] = {
    "SIDECAR_LISTEN": ("listen",),
    "SIDECAR_UPSTREAM": ("upstream", "addresses"),
    "SIDECAR_TRANSPORT": ("transport",),
    "SIDECAR_UPSTREAM_TRANSPORT": ("upstream", "transport"),
    "SIDECAR_METRICS_LISTEN": ("metrics", "listen"),
    "SIDECAR_IDL": ("idl",),
    "SIDECAR_REDIS_URL": ("state", "redis_url"),
    "SIDECAR_LOG_LEVEL": ("log", "level"),
    "SIDECAR_LOG_FORMAT": ("log", "format"),
}
_LIST_KEYS = {
    ("upstream", "addresses"),
    ("retry", "retry_on"),
    ("retry", "idempotent"),
    ("breaker", "trip_on"),
    ("fallback", "serve_on"),
    ("fallback", "methods"),
}
_NOT_FROM_ENV = {"SIDECAR_CONFIG"}


def env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    """Key paths and values set by ``SIDECAR_*`` variables."""
    found: dict[tuple[str, ...], Any] = {}
    for name, raw in environ.items():
        if not name.startswith("SIDECAR_") or name in _NOT_FROM_ENV:
            continue
        path = ENV_SHORTCUTS.get(name)
        if path is None:
            path = tuple(part.lower() for part in name[len("SIDECAR_") :].split("__"))
        found[path] = _env_value(path, raw)
    return found


def _env_value(path: tuple[str, ...], raw: str) -> Any:
    if path in _LIST_KEYS:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if raw.lower() in ("null", "none", ""):
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    return raw


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> SidecarConfig:
    """Read, merge and validate the configuration.

    Args:
        path: the YAML file, or None for defaults only.
        environ: the environment to read ``SIDECAR_*`` from (``os.environ`` if None;
            pass ``{}`` to ignore the environment).
        overrides: key paths set by command-line flags; they win over everything.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or bad value. The
            message names the file, the key path and the value.
    """
    source = str(path) if path is not None else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(Path(path))
    layers = [env_overrides(os.environ if environ is None else environ), dict(overrides or {})]
    for layer in layers:
        for key_path, value in layer.items():
            _set_path(data, key_path, value)
    try:
        config = SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    base = Path(path).parent if path is not None else Path.cwd()
    return _resolve_paths(config, base)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}"
        )
    return data


def _set_path(data: dict[str, Any], key_path: tuple[str, ...], value: Any) -> None:
    node = data
    for key in key_path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[key_path[-1]] = value


def _describe(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            problem = "unknown key" + _did_you_mean(err["loc"])
        else:
            problem = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = (
            ""
            if kind in ("extra_forbidden", "missing") or isinstance(value, dict)
            else f" (got {value!r})"
        )
        lines.append(f"  {key}: {problem}{shown}")
    return "\n".join(lines)


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    import difflib

    model: type[BaseModel] = SidecarConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve_paths(config: SidecarConfig, base: Path) -> SidecarConfig:
    """Paths in the file are relative to the file; check that the IDL exists."""
    updates: dict[str, Any] = {}
    if config.idl is not None:
        idl = Path(config.idl)
        if not idl.is_absolute():
            idl = (base / idl).resolve()
        if not idl.is_file():
            raise ConfigError(f"idl: file not found (got {config.idl!r}, looked at {idl})")
        updates["idl"] = str(idl)
    cache = config.fallback.cache
    if cache.path is not None and not Path(cache.path).is_absolute():
        new_cache = cache.model_copy(update={"path": str((base / cache.path).resolve())})
        updates["fallback"] = config.fallback.model_copy(update={"cache": new_cache})
    return config.model_copy(update=updates) if updates else config


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Does a method name (or ``Service:method``) match any glob pattern?

    A pattern without ``:`` is matched against the bare method name; a pattern
    with ``:`` against the full ``Service:method`` name.
    """
    method = name.rpartition(":")[2]
    for pattern in patterns:
        target = name if ":" in pattern else method
        if fnmatch.fnmatchcase(target, pattern):
            return True
    return False
