"""The sections of the configuration below the top level: one pydantic model each.

Every field carries its default and a description; the configuration
reference (docs/config-reference.md) is generated from them. Keys are a
contract (design §8): add freely, rename never.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from sidecar.config.base import FailureOutcome, FieldProblem, RetryableOutcome, Section
from sidecar.config.tls import UpstreamTlsConfig
from sidecar.config.units import Address, Duration, PositiveDuration, Size

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

# A method name as sent on the wire: ``ping`` or ``Service:ping`` (Thrift
# identifiers may contain dots; multiplexed service names often do).
_WIRE_METHOD = re.compile(r"^(?:[A-Za-z_][\w.]*:)?[A-Za-z_][\w.]*$")


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class EjectionConfig(Section):
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


class AdaptiveConcurrencyConfig(Section):
    """A concurrency limit that follows the upstream's latency (Envoy's gradient controller)."""

    min_concurrency: int = Field(
        3,
        ge=1,
        description="The limit while the unloaded latency (minRTT) is measured, and the lowest "
        "limit ever set.",
    )
    max_concurrency: int = Field(1000, ge=1, description="The highest limit ever set.")
    update_interval: PositiveDuration = Field(
        0.1,
        description="The limit is recalculated after each such window, from the latency of the "
        "calls that finished in it.",
    )
    sample_percentile: float = Field(
        50.0,
        gt=0,
        le=100,
        description="Percentile of a window's latencies (and of a minRTT measurement's) used.",
    )
    min_rtt_interval: PositiveDuration = Field(
        60.0,
        description="Time between measurements of the unloaded latency (the limit is held at "
        "min_concurrency while min_rtt_requests calls run).",
    )
    min_rtt_requests: int = Field(
        50, ge=1, description="Calls whose latency makes one minRTT measurement."
    )
    min_rtt_buffer: float = Field(
        25.0,
        ge=0,
        description="Percent added to minRTT before comparing a window's latency with it: "
        "latency within it lets the limit grow.",
    )
    jitter: float = Field(
        15.0,
        ge=0,
        le=100,
        description="Up to this percent of min_rtt_interval is added at random, so that "
        "sidecars do not measure at the same moment.",
    )

    @model_validator(mode="after")
    def _min_below_max(self) -> AdaptiveConcurrencyConfig:
        if self.min_concurrency > self.max_concurrency:
            raise FieldProblem(
                "min_concurrency",
                f"must not be above max_concurrency ({self.max_concurrency})",
                self.min_concurrency,
            )
        return self


class UpstreamConfig(Section):
    """Where calls go and how the connections to there are kept."""

    addresses: tuple[Address, ...] = Field(
        (),
        description="Upstream service addresses; `sidecar run` needs at least one, from this key, "
        "--upstream or SIDECAR_UPSTREAM. A retry prefers another address.",
    )
    transport: Literal["same", "framed", "buffered"] = Field(
        "same",
        description="Transport the upstream speaks; `same` uses each client's own. A THeader "
        "client's calls go upstream in THeader whatever this says.",
    )
    protocol: Literal["same", "binary", "compact"] = Field(
        "same",
        description="Protocol the upstream speaks; `same` uses each client's own. With another "
        "protocol than a client's, the sidecar transcodes its calls and their replies.",
    )
    theader_timeout_header: str | None = Field(
        "client_timeout",
        description="THeader info header in which clients give a call's timeout in "
        "milliseconds; the call's deadline is then the smaller of it and retry.deadline. "
        "null: ignore such headers.",
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
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Most calls in flight to the upstream at once (all its addresses "
        "together), each counted from its admission to its answer, retries and backoff "
        "included; a call over the limit is shed at once: it gets a fallback (with shed in "
        "fallback.serve_on) or a TApplicationException saying it was shed, and counts "
        "against neither the breaker nor the retry budget. null: no limit. With "
        "adaptive_concurrency, a ceiling over the adaptive limit. A reload applies a new value.",
    )
    adaptive_concurrency: AdaptiveConcurrencyConfig | None = Field(
        None,
        description="A limit of calls in flight that follows the upstream's latency (the "
        "gradient controller of Envoy's adaptive concurrency filter); calls over it are shed "
        "as over max_in_flight. null: off. A reload applies new settings (and measures afresh).",
    )
    tls: UpstreamTlsConfig | None = Field(
        None, description="TLS to the upstream; null means plaintext."
    )
    name: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="What error replies to clients call the upstream (`upstream NAME`); null: "
        "`the upstream`. Logs and metrics always name its addresses.",
    )
    addresses_in_replies: bool = Field(
        False,
        description="Name the upstream's host and port in error replies to clients (an "
        "internal detail they do not need); false uses `name`.",
    )


class BudgetConfig(Section):
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


class RetryConfig(Section):
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


class BreakerConfig(Section):
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
    failure_exceptions: tuple[str, ...] = Field(
        (),
        description="Declared exceptions, by their name in the IDL, that count as breaker "
        "failures (e.g. Overloaded) for every method that declares them; needs `idl`. "
        "Other declared exceptions are answers.",
    )
    mode: Literal["consecutive", "rate"] = Field(
        "consecutive",
        description="consecutive: fail_max failures in a row open the breaker. rate: it "
        "opens when the failure rate or the slow-call rate over a sliding window of calls "
        "reaches its threshold (after minimum_calls); fail_max is then not used.",
    )
    window_type: Literal["count", "time"] = Field(
        "count",
        description="mode rate: the window holds the last window_size calls (count) or "
        "the calls of the last window_size seconds (time).",
    )
    window_size: int = Field(
        100, ge=1, le=100_000, description="mode rate: calls (count) or seconds (time)."
    )
    minimum_calls: int = Field(
        100,
        ge=1,
        description="mode rate: calls the window must hold before a rate can open the "
        "breaker; with window_type count, at most window_size.",
    )
    failure_rate_threshold: float = Field(
        50.0,
        gt=0,
        le=100,
        description="mode rate: percentage of failed calls in the window that opens it.",
    )
    slow_call_duration: PositiveDuration | None = Field(
        None,
        description="mode rate: a call that takes longer than this (retries included) is "
        "slow; null: no call is slow.",
    )
    slow_call_rate_threshold: float = Field(
        100.0,
        gt=0,
        le=100,
        description="mode rate: percentage of slow calls in the window that opens it "
        "(with slow_call_duration set).",
    )

    @model_validator(mode="after")
    def _minimum_fits_window(self) -> BreakerConfig:
        if self.window_type == "count" and self.minimum_calls > self.window_size:
            raise FieldProblem(
                "minimum_calls",
                f"a count window holds at most window_size ({self.window_size}) calls, so "
                f"minimum_calls ({self.minimum_calls}) would never be reached",
                self.minimum_calls,
            )
        return self


class CacheConfig(Section):
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


class FallbackConfig(Section):
    """When and from where replies are served while the upstream cannot answer."""

    serve_on: tuple[Literal["breaker_open", "retries_exhausted", "shed"], ...] = Field(
        ("breaker_open", "retries_exhausted", "shed"),
        description="When a fallback reply is served: while the breaker rejects calls "
        "(breaker_open), when every attempt failed (retries_exhausted), when a call is shed "
        "over upstream.max_in_flight (shed).",
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


class StateConfig(Section):
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


class MetricsConfig(Section):
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


class ControlConfig(Section):
    """The control listener: runtime changes by hand (POST only)."""

    listen: Address | None = Field(
        "127.0.0.1:9465",
        description="Address of the control endpoints (POST /log-level, /breakers/NAME/open "
        "and /close, /readiness/fail and /restore); null turns them off. Anyone who can "
        "reach it can trip breakers and fail readiness: keep it on loopback.",
    )


class ReadinessConfig(Section):
    """What ``/readyz`` answers."""

    require_upstream: bool = Field(
        False,
        description="true: /readyz answers 503 while a breaker is open and a call rejected by "
        "it could get no fallback (no method with a static reply, and the fallback cache "
        "empty or breaker_open not in fallback.serve_on).",
    )


class LimitsConfig(Section):
    """What one client may cost the process."""

    max_buffered_bytes: Size = Field(
        48 << 20,
        ge=1 << 20,
        description="Bytes held on behalf of all clients together: messages received but not "
        "yet finished or run. Past it the connections holding the oldest unfinished messages "
        "are closed (PROTOCOL_ERROR where a seqid is readable), and one whose finished calls "
        "wait has its reading paused. 48 MiB: three messages of the default max_frame_size, "
        "a fifth of a 256 MiB container.",
    )
    validate_framed_calls: bool = Field(
        True,
        description="Walk each framed or THeader call's arguments before sending it upstream "
        "(about 1.5 µs a call): a malformed one is answered PROTOCOL_ERROR and never reaches "
        "the upstream. false: checked only after it failed there.",
    )


class AccessLogConfig(Section):
    """One log line per call, sampled."""

    sample_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of calls logged on the sidecar.access logger, one line each (method, "
        "seqid, outcome, attempts, upstream, duration, fallback source; never payload bytes): "
        "0 turns it off, 1 logs every call.",
    )


class LogConfig(Section):
    """Log level and format."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = Field(
        "info", description="Least severe level logged."
    )
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        "text", description="text: one readable line per event; json: one JSON object per line."
    )
    access: AccessLogConfig = Field(AccessLogConfig(), description="The access log.")


class HealthCheckConfig(Section):
    """Active health checks: the sidecar calls each upstream address itself (null: off)."""

    method: str = Field(
        description="The method each probe calls, as sent on the wire (`ping`, or "
        "`Service:ping` for a multiplexed upstream). A probe passes on a REPLY that is a "
        "success (a value or void); a declared exception, a TApplicationException, a "
        "timeout or a connection failure fails it."
    )
    arguments: dict[str, Any] | None = Field(
        None,
        description="The probe's arguments by name, in YAML, checked and encoded with the "
        "IDL's types like a static reply; needs `idl`. null: no arguments.",
    )
    interval: PositiveDuration = Field(
        5.0, description="Time from the start of one probe of an address to the next."
    )
    timeout: PositiveDuration = Field(
        1.0, description="Time allowed for a probe's reply, connecting included; at most interval."
    )
    unhealthy_threshold: int = Field(
        3, ge=1, description="Failed probes in a row that take an address out of rotation."
    )
    healthy_threshold: int = Field(
        2,
        ge=1,
        description="Passing probes in a row that bring an address back into rotation, "
        "whether probes or passive ejection took it out.",
    )

    @field_validator("method")
    @classmethod
    def _method_name(cls, value: str) -> str:
        if not _WIRE_METHOD.match(value):
            raise ValueError("expected a method name such as ping or Service:ping")
        return value

    @model_validator(mode="after")
    def _timeout_fits_interval(self) -> HealthCheckConfig:
        if self.timeout > self.interval:
            raise FieldProblem(
                "timeout",
                f"a probe must end before the next one starts: at most interval "
                f"({self.interval:g}s)",
                self.timeout,
            )
        return self
