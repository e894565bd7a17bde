"""The per-method sections: ``methods.<method>`` (retry, idempotency, fallback, exceptions,
hedging).

Unset keys inherit from the top-level sections; which entries apply to a wire
method name, and in which order, is `sidecar.config.methods`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from sidecar.config.base import FieldProblem, RetryableOutcome, Section
from sidecar.config.hedge import HedgeOverride
from sidecar.config.units import Duration, PositiveDuration


class RetryOverride(Section):
    """Per-method retry settings; unset keys inherit from ``retry``."""

    max_attempts: int | None = Field(None, ge=1, le=100, description="See retry.max_attempts.")
    initial_backoff: Duration | None = Field(None, description="See retry.initial_backoff.")
    multiplier: float | None = Field(None, ge=1.0, description="See retry.multiplier.")
    max_backoff: Duration | None = Field(None, description="See retry.max_backoff.")
    per_try_timeout: PositiveDuration | None = Field(None, description="See retry.per_try_timeout.")
    deadline: PositiveDuration | None = Field(None, description="See retry.deadline.")
    retry_on: tuple[RetryableOutcome, ...] | None = Field(None, description="See retry.retry_on.")


class StaticException(Section):
    """A declared exception of the method, served as a static fallback."""

    name: str = Field(description="The exception's name in the IDL (declared by the method).")
    value: dict[str, Any] = Field(
        default_factory=dict, description="Its fields by name, checked against the IDL."
    )


class MethodFallback(Section):
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


class MethodConfig(Section):
    """Per-method overrides; the key is a method name or ``Service:method``."""

    idempotent: bool | None = Field(
        None, description="Safe to repeat or not, overriding the retry.idempotent patterns."
    )
    oneway: bool | None = Field(
        None,
        description="true: a oneway method, which clients may send as CALL (the Go library "
        "does): forwarded without waiting for a reply, none is sent back. false: two-way. "
        "Also read from the IDL. When neither says, learned from the wire: a CALL left "
        "unanswered 50 ms with no call behind it gets a probe call "
        "(thrift_sidecar_oneway_probe) behind it on its upstream connection.",
    )
    retry_on_exceptions: tuple[str, ...] | None = Field(
        None,
        description="Declared exceptions of this method, by their name in the IDL, that are "
        "retried like failed attempts (e.g. [Overloaded, TemporarilyUnavailable]) when the "
        "method is idempotent; needs `idl`. When retries run out, the client gets a fallback "
        "(fallback.serve_on retries_exhausted) or else the exception.",
    )
    retry: RetryOverride = Field(
        RetryOverride(), description="Retry settings for this method; unset keys inherit."
    )
    fallback: MethodFallback = Field(
        MethodFallback(), description="Fallback settings for this method."
    )
    hedge: HedgeOverride = Field(
        HedgeOverride(),
        description="Hedging for this method (idempotent methods only); unset keys inherit "
        "from hedge.",
    )
