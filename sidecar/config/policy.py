"""The ``retry``, ``breaker`` and ``state`` sections: what happens when a call fails.

How a failed call is tried again and the retry budget that caps retries, the
circuit breaker in front of the upstream, and the Redis state through which a
fleet of sidecars shares its breakers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sidecar.config.base import FailureOutcome, FieldProblem, RetryableOutcome, Section
from sidecar.config.units import Duration, PositiveDuration

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


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
