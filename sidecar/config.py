"""Typed configuration: one YAML file, environment overrides, flags; validated once.

Keys are the contract in the design (§8): scripts and users write them, so
keys are added freely and never renamed. Durations are written ``250ms``,
``2s``, ``1m`` (a bare number means seconds) and held as float seconds;
sizes are written ``16MiB``, ``64KiB`` (a bare number means bytes) and held as
int bytes. Unknown keys are errors: they are nearly always typos.

Precedence: flags > ``SIDECAR_*`` environment > file > defaults. Every key can
be set from the environment as ``SIDECAR_<SECTION>__<KEY>`` (for example
``SIDECAR_RETRY__MAX_ATTEMPTS=4``), and the common ones have short names
(`ENV_SHORTCUTS`). An empty variable counts as unset.

Errors: `load_config` raises one `ConfigError` listing every problem, each
with its dotted key path, what was wrong, the bad value, and where the value
came from when that was not the file (an environment variable or a flag).
Relative paths (``idl``, ``fallback.cache.path``) are relative to the config
file when written there, and to the working directory when given by a flag or
the environment.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.errors import ConfigError

KeyPath = tuple[str, ...]

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
# Exact method names (``getItem``) or ``Service:method``; Thrift identifiers
# may contain dots, and multiplexed service names often do.
_METHOD_KEY = re.compile(r"^(?:[A-Za-z_][\w.]*:)?[A-Za-z_][\w.]*$")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class FieldProblem(ValueError):
    """A validation problem that belongs to a key below the one being validated.

    Model validators see a whole section; raising this lets the error message
    name the exact key (``fallback.cache.path``) and its value.
    """

    def __init__(self, key: str | KeyPath, message: str, value: Any = None) -> None:
        super().__init__(message)
        self.key: KeyPath = tuple(key.split(".")) if isinstance(key, str) else key
        self.value = value


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
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number")
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


def format_duration(seconds: float) -> str:
    """0.25 → ``"250ms"``, 600 → ``"10m"``: the inverse of `parse_duration`, for people."""
    ms = round(seconds * 1000, 3)
    if ms and ms % 3_600_000 == 0:
        return f"{_number(ms / 3_600_000)}h"
    if ms and ms % 60_000 == 0:
        return f"{_number(ms / 60_000)}m"
    if ms >= 1000 or ms == 0:
        return f"{_number(ms / 1000)}s"
    return f"{_number(ms)}ms"


def _number(value: float) -> str:
    """Shortest exact decimal: 1026.102 → ``1026.102``, 25.0 → ``25``."""
    text = repr(round(value, 6))
    return text.removesuffix(".0")


def format_size(size: int) -> str:
    """16777216 → ``"16MiB"``: the inverse of `parse_size`, for people."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_address(value: Any) -> str:
    """Check ``host:port`` (IPv6 as ``[::1]:port``) and return it unchanged."""
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:9090")
    split_address(value)
    return value


def split_address(value: str) -> tuple[str, int]:
    """``"host:port"`` → (host, port). Raises ValueError on a malformed address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:9090")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def require_positive(value: float) -> float:
    """Validator: a duration that must be longer than zero."""
    if value <= 0:
        raise ValueError("must be longer than zero")
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(require_positive)
]
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

    @model_validator(mode="before")
    @classmethod
    def _empty_means_defaults(cls, data: Any) -> Any:
        """``retry:`` with every key under it commented out is YAML null: use the defaults."""
        return {} if data is None else data


class EjectionConfig(_Section):
    """Passive ejection of upstream addresses that keep failing."""

    consecutive_failures: int = Field(
        5, ge=1, description="Failures in a row that eject an address from the rotation."
    )
    base_time: Duration = Field(
        5.0,
        description="How long the first ejection lasts; it doubles with each ejection in "
        "a row of the same address, up to max_time.",
    )
    max_time: Duration = Field(300.0, description="Longest an address stays ejected.")
    max_percent: int = Field(
        50,
        ge=0,
        le=100,
        description="At most this percentage of the addresses is ejected at once "
        "(at least one address always stays in).",
    )


class UpstreamConfig(_Section):
    """Where calls go and how the connections to there are kept."""

    addresses: tuple[Address, ...] = Field(
        (),
        description="Upstream service addresses; `sidecar run` needs at least one, from this key, "
        "--upstream or SIDECAR_UPSTREAM. A retry prefers another address.",
    )
    transport: Literal["same", "framed", "buffered"] = Field(
        "same",
        description="Transport the upstream speaks; `same` uses each client's own.",
    )
    pool_size: int = Field(
        64, ge=1, description="Most open connections per upstream address (one call each)."
    )
    connect_timeout: PositiveDuration = Field(
        0.5, description="Time allowed to open a TCP connection to the upstream."
    )
    idle_timeout: PositiveDuration = Field(
        60.0, description="An unused upstream connection is closed after this long."
    )
    ejection: EjectionConfig = Field(
        EjectionConfig(), description="Passive ejection of failing addresses."
    )


class BudgetConfig(_Section):
    """The retry budget shared by all calls to one upstream."""

    ratio: float = Field(
        0.2, ge=0, description="Retries allowed per call made (0.2: at most 20% extra load)."
    )
    min_retries_per_second: float = Field(
        10.0, ge=0, description="Retries always allowed, however few calls are made."
    )
    window: PositiveDuration = Field(
        10.0, description="Time over which calls and retries are counted."
    )


class RetryConfig(_Section):
    """How a failed call is tried again."""

    max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts per call, the first included (1: never retry)."
    )
    initial_backoff: Duration = Field(
        0.025, description="Upper bound of the first wait before a retry (full jitter)."
    )
    multiplier: float = Field(
        2.0, ge=1.0, description="Each further wait's upper bound grows by this factor."
    )
    max_backoff: Duration = Field(1.0, description="Cap on the upper bound of any wait.")
    per_try_timeout: PositiveDuration = Field(
        1.0, description="Time allowed for one attempt's reply."
    )
    deadline: PositiveDuration = Field(
        5.0,
        description="Time allowed for the whole call, retries and waits included; "
        "no wait starts that cannot finish before it.",
    )
    retry_on: tuple[RetryableOutcome, ...] = Field(
        ("connect_error", "connection_closed", "timeout"),
        description="Outcomes that are retried. A call that was sent is retried only if its "
        "method is idempotent; one that never left the sidecar (connect_error) whatever "
        "the method.",
    )
    idempotent: tuple[str, ...] = Field(
        ("get*", "list*", "ping"),
        description="Glob patterns of methods that are safe to repeat (`name` or "
        "`Service:name`); only these are retried after the call was sent, and cached.",
    )
    budget: BudgetConfig = Field(
        BudgetConfig(), description="The retry budget that stops retry storms."
    )


class RetryOverride(_Section):
    """Per-method retry settings; unset keys inherit from ``retry``."""

    max_attempts: int | None = Field(None, ge=1, le=100, description="See retry.max_attempts.")
    initial_backoff: Duration | None = Field(None, description="See retry.initial_backoff.")
    multiplier: float | None = Field(None, ge=1.0, description="See retry.multiplier.")
    max_backoff: Duration | None = Field(None, description="See retry.max_backoff.")
    per_try_timeout: PositiveDuration | None = Field(None, description="See retry.per_try_timeout.")
    deadline: PositiveDuration | None = Field(None, description="See retry.deadline.")
    retry_on: tuple[RetryableOutcome, ...] | None = Field(None, description="See retry.retry_on.")


class BreakerConfig(_Section):
    """The circuit breaker in front of the upstream."""

    scope: Literal["upstream", "method"] = Field(
        "upstream",
        description="One breaker per upstream, or one per upstream and method.",
    )
    fail_max: int = Field(5, ge=1, description="Failures in a row that open the breaker.")
    reset_timeout: Duration = Field(
        30.0, description="How long the breaker stays open before letting a probe through."
    )
    success_threshold: int = Field(
        1, ge=1, description="Successful probes in a row that close it again."
    )
    half_open_max_calls: int = Field(
        1, ge=1, description="Probes allowed at once while half-open; other calls are rejected."
    )
    trip_on: tuple[FailureOutcome, ...] = Field(
        (
            "internal_error",
            "connect_error",
            "connection_closed",
            "timeout",
            "protocol_error",
        ),
        description="Outcomes that count as breaker failures.",
    )


class CacheConfig(_Section):
    """Where fallback replies are kept, and for how long."""

    backend: Literal["memory", "sqlite", "redis"] = Field(
        "memory",
        description="memory (this process), sqlite (a file that survives restarts) or "
        "redis (shared by a fleet; uses state.redis_url).",
    )
    path: str | None = Field(
        None, description="The SQLite file, for backend sqlite; relative to this file."
    )
    ttl: Duration = Field(600.0, description="A cached reply older than this is never served.")
    max_entries: int = Field(100_000, ge=1, description="Most replies kept (least recent go).")
    max_bytes: Size = Field(256 << 20, description="Most bytes of replies kept.")

    @model_validator(mode="after")
    def _sqlite_needs_path(self) -> CacheConfig:
        if self.backend == "sqlite" and not self.path:
            raise FieldProblem(
                "path", "required with backend sqlite: the file that keeps the cached replies"
            )
        return self


class FallbackConfig(_Section):
    """When and from where replies are served while the upstream cannot answer."""

    serve_on: tuple[Literal["breaker_open", "retries_exhausted"], ...] = Field(
        ("breaker_open", "retries_exhausted"),
        description="When a fallback reply is served: while the breaker rejects calls, "
        "and/or when every attempt failed.",
    )
    methods: tuple[str, ...] | None = Field(
        None,
        description="Glob patterns of methods whose replies are cached; null means the "
        "retry.idempotent patterns. Non-idempotent methods are never cached.",
    )
    cache_declared_exceptions: bool = Field(
        False, description="Also cache replies that carry a declared exception."
    )
    cache: CacheConfig = Field(CacheConfig(), description="The store of cached replies.")


class StaticException(_Section):
    """A declared exception of the method, served as a static fallback."""

    name: str = Field(description="The exception's name in the IDL (declared by the method).")
    value: dict[str, Any] = Field(
        default_factory=dict, description="Its fields by name, checked against the IDL."
    )


class MethodFallback(_Section):
    """A fixed reply for one method, checked against the IDL at start-up."""

    static: Any = Field(
        None,
        description="The method's return value in YAML (structs as mappings, enums by "
        "name, `{}` for void); needs `idl`. Served when nothing is cached.",
    )
    static_exception: StaticException | None = Field(
        None, description="Or a declared exception to answer with; needs `idl`."
    )
    cache: bool | None = Field(
        None,
        description="Cache this method's replies or not, overriding fallback.methods "
        "(only idempotent methods are ever cached).",
    )

    @model_validator(mode="after")
    def _one_static(self) -> MethodFallback:
        if self.static is not None and self.static_exception is not None:
            raise FieldProblem("static_exception", "set static or static_exception, not both")
        return self


class MethodConfig(_Section):
    """Per-method overrides; the key is a method name or ``Service:method``."""

    idempotent: bool | None = Field(
        None, description="Safe to repeat or not, overriding the retry.idempotent patterns."
    )
    retry: RetryOverride = Field(
        RetryOverride(), description="Retry settings for this method; unset keys inherit."
    )
    fallback: MethodFallback = Field(
        MethodFallback(), description="Fallback settings for this method."
    )


class StateConfig(_Section):
    """Shared state for a fleet of sidecars."""

    redis_url: str | None = Field(
        None,
        description="redis://host:6379/0 (or rediss://, unix://) turns on fleet mode: "
        "breaker state shared by every sidecar.",
    )
    timeout: Duration = Field(0.05, description="Time allowed for one Redis operation.")
    refresh_interval: Duration = Field(
        0.25, description="How often shared state is read back from Redis."
    )
    key_prefix: str = Field("thrift-sidecar", description="Prefix of every Redis key written.")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(_REDIS_SCHEMES):
            raise ValueError(
                "expected a Redis URL such as redis://127.0.0.1:6379/0 "
                "(schemes: redis://, rediss://, unix://)"
            )
        return value


class MetricsConfig(_Section):
    """The admin HTTP endpoint: metrics, health, state."""

    listen: Address | None = Field(
        "0.0.0.0:9464",
        description="Address of /metrics, /healthz, /readyz and /state; null turns it off.",
    )
    max_method_labels: int = Field(
        200,
        ge=1,
        description="Most distinct method label values; further names are counted as `other`.",
    )


class LogConfig(_Section):
    """Log level and format."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = Field(
        "info", description="Least severe level logged."
    )
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line."
    )


class SidecarConfig(_Section):
    """The whole configuration."""

    listen: Address = Field("0.0.0.0:9090", description="Where Thrift clients connect.")
    transport: Literal["auto", "framed", "buffered"] = Field(
        "auto",
        description="Client-side transport; auto detects framed or buffered per connection.",
    )
    max_frame_size: Size = Field(
        16 << 20,
        description="Largest message accepted from a client or an upstream (64B to 2GiB).",
    )
    max_connections: int = Field(
        10_000, ge=1, description="Most client connections at once; more are refused."
    )
    max_depth: int = Field(
        64,
        ge=1,
        le=10_000,
        description="Deepest nesting of structs and containers accepted in a message.",
    )
    idle_timeout: PositiveDuration = Field(
        300.0, description="A client connection with no call for this long is closed."
    )
    drain_timeout: Duration = Field(
        10.0,
        description="On SIGTERM/SIGINT, time allowed for calls in flight to finish.",
    )
    idl: str | None = Field(
        None,
        description="The upstream's Thrift IDL (optional): checks method names and "
        "encodes static replies. Relative to this file.",
    )
    upstream: UpstreamConfig = Field(UpstreamConfig(), description="The upstream service.")
    retry: RetryConfig = Field(RetryConfig(), description="Retries.")
    breaker: BreakerConfig = Field(BreakerConfig(), description="The circuit breaker.")
    fallback: FallbackConfig = Field(FallbackConfig(), description="Fallback replies.")
    methods: dict[str, MethodConfig] = Field(
        default_factory=dict,
        description="Per-method overrides, keyed by exact method name or Service:method.",
    )
    state: StateConfig = Field(StateConfig(), description="Fleet mode.")
    metrics: MetricsConfig = Field(MetricsConfig(), description="The admin HTTP endpoint.")
    log: LogConfig = Field(LogConfig(), description="Logging.")

    @field_validator("max_frame_size")
    @classmethod
    def _frame_size_range(cls, value: int) -> int:
        if not 64 <= value <= (1 << 31) - 1:
            raise ValueError("must be between 64B and 2GiB - 1")
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _no_methods(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("methods")
    @classmethod
    def _method_names(cls, value: dict[str, MethodConfig]) -> dict[str, MethodConfig]:
        for name in value:
            if not isinstance(name, str) or not _METHOD_KEY.match(name):
                raise FieldProblem(
                    (str(name),),
                    "not a method name: per-method settings take an exact name such as "
                    "getItem or Catalog:getItem, not a pattern (patterns go in "
                    "retry.idempotent and fallback.methods)",
                    name,
                )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> SidecarConfig:
        if self.metrics.listen is not None and _same_port(self.listen, self.metrics.listen):
            raise FieldProblem(
                "metrics.listen",
                f"the admin endpoint cannot share the port of listen ({self.listen}); "
                "pick another port, or null to turn the endpoint off",
                self.metrics.listen,
            )
        if self.fallback.cache.backend == "redis" and self.state.redis_url is None:
            raise FieldProblem(
                "fallback.cache.backend",
                "backend redis needs state.redis_url (or --redis-url, SIDECAR_REDIS_URL)",
                "redis",
            )
        return self


_WILDCARD_HOSTS = ("0.0.0.0", "::", "*")


def _same_port(a: str, b: str) -> bool:
    """Would binding both addresses clash? (Port 0 asks for a free port: never.)"""
    (host_a, port_a), (host_b, port_b) = split_address(a), split_address(b)
    if port_a != port_b or port_a == 0:
        return False
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


# Short environment names for the common keys (design §8); every key also has
# the generic SIDECAR_<SECTION>__<KEY> form.
ENV_SHORTCUTS: dict[str, KeyPath] = {
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
# Variables that are not config keys: the config file itself (read by the CLI).
_NOT_FROM_ENV = {"SIDECAR_CONFIG"}


def env_name(path: KeyPath) -> str:
    """The generic environment variable for a key path: ``SIDECAR_RETRY__MAX_ATTEMPTS``."""
    return "SIDECAR_" + "__".join(path).upper()


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → X; anything else unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _child(node: Any, key: str | int) -> tuple[Any, str | int]:
    """One step down a key path through the models' annotations.

    Args:
        node: a model class, a ``dict[str, X]`` / ``tuple[X, ...]`` annotation, or None.
        key: the next key (field names are matched case-insensitively).

    Returns:
        (the annotation below, the key as the config spells it); (None, key) off the map.
    """
    node = _unwrap(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        name = key.lower() if isinstance(key, str) else key
        field = node.model_fields.get(str(name))
        return (_unwrap(field.annotation) if field else None), name
    origin = typing.get_origin(node)
    if origin is dict:
        return typing.get_args(node)[1], key
    if origin is tuple:
        return typing.get_args(node)[0], key
    return None, key


def annotation_at(path: Iterable[str | int]) -> Any:
    """The annotation of the key at ``path`` (None when there is no such key)."""
    node: Any = SidecarConfig
    for key in path:
        node, _ = _child(node, key)
        if node is None:
            return None
    return node


def _env_layer(environ: Mapping[str, str]) -> tuple[dict[KeyPath, Any], dict[KeyPath, str]]:
    values: dict[KeyPath, Any] = {}
    names: dict[KeyPath, str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith("SIDECAR_") or name in _NOT_FROM_ENV or raw.strip() == "":
            continue
        path = ENV_SHORTCUTS.get(name)
        if path is None:
            path = _env_path(name[len("SIDECAR_") :].split("__"))
        values[path] = _env_value(path, raw)
        names[path] = name
    return values, names


def _env_path(parts: list[str]) -> KeyPath:
    node: Any = SidecarConfig
    path: list[str] = []
    for part in parts:
        node, spelled = _child(node, part)
        # Keys of mappings (method names) keep their case; field names are lower case.
        path.append(str(spelled) if node is not None else part.lower())
    return tuple(path)


def _env_value(path: KeyPath, raw: str) -> Any:
    if raw.strip().lower() in ("null", "none"):
        return None
    if typing.get_origin(annotation_at(path)) is tuple:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def env_overrides(environ: Mapping[str, str]) -> dict[KeyPath, Any]:
    """Key paths and values set by ``SIDECAR_*`` variables."""
    return _env_layer(environ)[0]


def env_sources(environ: Mapping[str, str]) -> dict[KeyPath, str]:
    """Key paths set by ``SIDECAR_*`` variables, with the name of each variable."""
    return _env_layer(environ)[1]


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
        data = _read_yaml(Path(path))
    env_values, env_names = _env_layer(os.environ if environ is None else environ)
    origins: dict[KeyPath, str] = {p: f"environment variable {n}" for p, n in env_names.items()}
    flags = dict(overrides or {})
    for key_path in flags:
        origins[key_path] = (override_names or {}).get(key_path, "a command-line flag")
    for layer in (env_values, flags):
        for key_path, value in layer.items():
            _set_path(data, key_path, value)
    try:
        config = SidecarConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, origins)) from None
    return _resolve_paths(config, source, origins)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({exc})") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
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


class _StrictLoader(yaml.SafeLoader):
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


def _set_path(data: dict[str, Any], key_path: KeyPath, value: Any) -> None:
    node = data
    for key in key_path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[key_path[-1]] = value


def format_key(loc: Iterable[str | int]) -> str:
    """``("retry", "retry_on", 1)`` → ``retry.retry_on[1]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _origin(loc: tuple[str | int, ...], origins: Mapping[KeyPath, str]) -> str | None:
    for end in range(len(loc), 0, -1):
        found = origins.get(tuple(str(p) for p in loc[:end]))
        if found:
            return found
    return None


def _describe(exc: ValidationError, source: str | None, origins: Mapping[KeyPath, str]) -> str:
    """One paragraph: a header and one line per problem (key, what is wrong, the value)."""
    problems: list[tuple[str, str | None]] = []
    for err in exc.errors():
        loc: tuple[str | int, ...] = tuple(err["loc"])
        value = err.get("input")
        show_value = err["type"] not in ("extra_forbidden", "missing")
        problem_exc = (err.get("ctx") or {}).get("error")
        if isinstance(problem_exc, FieldProblem):
            loc = (*loc, *problem_exc.key)
            value = problem_exc.value
            show_value = value is not None
        origin = _origin(loc, origins)
        text = format_key(loc)
        if origin:
            text += f" (from {origin})"
        text += ": " + _problem(err, loc, origin)
        if show_value and not isinstance(value, dict | BaseModel):
            text += f" (got {_show(value)})"
        problems.append((text, origin))
    return _paragraph(problems, source)


def _paragraph(problems: list[tuple[str, str | None]], source: str | None) -> str:
    in_file = source is not None and all(origin is None for _, origin in problems)
    header = f"invalid configuration in {source}" if in_file else "invalid configuration"
    if len(problems) == 1:
        return f"{header}: {problems[0][0]}"
    lines = [f"{header} ({len(problems)} problems):"]
    lines += [f"  {text}" for text, _ in problems]
    return "\n".join(lines)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


_PLAIN_MESSAGES = {
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "tuple_type": "expected a list, written [a, b] or as '- a' lines",
    "list_type": "expected a list, written [a, b] or as '- a' lines",
    "dict_type": "expected a mapping of keys (key: value lines)",
    "model_type": "expected a mapping of keys (key: value lines)",
    "model_attributes_type": "expected a mapping of keys (key: value lines)",
    "missing": "required key is missing",
}


def _problem(err: Any, loc: tuple[str | int, ...], origin: str | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(loc, origin)
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        text = "must be one of " + ", ".join(options)
        value = err.get("input")
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), options, n=1)
            if close:
                text += f" (did you mean {close[0]!r}?)"
        return text
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {
            "greater_than_equal": ("ge", "must be at least"),
            "greater_than": ("gt", "must be more than"),
            "less_than_equal": ("le", "must be at most"),
            "less_than": ("lt", "must be less than"),
        }[kind]
        return f"{words[1]} {ctx.get(words[0])}"
    if kind in _PLAIN_MESSAGES:
        return _PLAIN_MESSAGES[kind]
    message = str(err["msg"]).removeprefix("Value error, ")
    return message.removeprefix("Input should be ").removeprefix("Assertion failed, ")


def _did_you_mean(loc: tuple[str | int, ...], origin: str | None) -> str:
    node = annotation_at(loc[:-1]) if loc[:-1] else SidecarConfig
    node = _unwrap(node)
    if not (isinstance(node, type) and issubclass(node, BaseModel)):
        return ""
    keys = list(node.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    if close:
        if origin and origin.startswith("environment variable"):
            return f" (did you mean {env_name((*map(str, loc[:-1]), close[0]))}?)"
        return f" (did you mean {close[0]!r}?)"
    where = format_key(loc[:-1]) if loc[:-1] else "the top level"
    return f"; the keys of {where} are: {', '.join(keys)}"


def _resolve_paths(
    config: SidecarConfig, source: str | None, origins: Mapping[KeyPath, str]
) -> SidecarConfig:
    """Paths from the file are relative to the file, others to the working directory."""

    def base_for(key_path: KeyPath) -> Path:
        if source is None or _origin(key_path, origins):
            return Path.cwd()
        return Path(source).parent

    updates: dict[str, Any] = {}
    if config.idl is not None:
        idl = Path(config.idl)
        if not idl.is_absolute():
            idl = (base_for(("idl",)) / idl).resolve()
        if not idl.is_file():
            origin = _origin(("idl",), origins)
            why = "is a directory" if idl.is_dir() else "file not found"
            raise ConfigError(
                _paragraph(
                    [
                        (
                            f"idl{f' (from {origin})' if origin else ''}: {why}: "
                            f"{config.idl!r} (looked at {idl})",
                            origin,
                        )
                    ],
                    source,
                )
            )
        updates["idl"] = str(idl)
    cache = config.fallback.cache
    if cache.path is not None and not Path(cache.path).is_absolute():
        resolved = str((base_for(("fallback", "cache", "path")) / cache.path).resolve())
        new_cache = cache.model_copy(update={"path": resolved})
        updates["fallback"] = config.fallback.model_copy(update={"cache": new_cache})
    return config.model_copy(update=updates) if updates else config


def field_kind(annotation: Any, metadata: Iterable[Any] = ()) -> str | None:
    """``duration``, ``size`` or ``address`` for fields of those types, else None."""
    found: list[Any] = list(metadata)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for arg in (annotation, *(typing.get_args(annotation) if union else ())):
        if typing.get_origin(arg) is Annotated:
            found += list(getattr(arg, "__metadata__", ()))
    for item in found:
        func = getattr(item, "func", None)
        if func is parse_duration:
            return "duration"
        if func is parse_size:
            return "size"
        if func is parse_address:
            return "address"
    return None


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
