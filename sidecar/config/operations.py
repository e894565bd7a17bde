"""The sections about the process itself: its listeners, readiness, memory and logs.

``metrics`` (the admin endpoint), ``control`` (runtime changes by hand),
``readiness`` (what ``/readyz`` answers), ``limits`` (what one client may
cost) and ``log`` (level, format, the access log).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from sidecar.config.base import Section
from sidecar.config.units import Address, Size


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class MetricsConfig(Section):
    """The admin HTTP endpoint: metrics, health, state."""

    listen: Address | None = Field(
        "0.0.0.0:9464",
        description="Address of /metrics, /healthz, /readyz and /state; null turns it off.",
    )
    max_method_labels: int = Field(
        200,
        ge=1,
        description="Most distinct method label values; further names are counted as `other`. "
        "Names the upstream has not answered (invented ones) take half of them at most. "
        "With workers, for all of them together.",
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
        "yet finished or run, and replies a client has not taken. Past it the connections that "
        "held bytes without progress the longest (an unfinished message that stopped growing: "
        "PROTOCOL_ERROR where a seqid is readable; replies left unread: cut off) are closed, and "
        "one whose finished calls wait has its reading paused. 48 MiB: three messages of the "
        "default max_frame_size, a fifth of a 256 MiB container.",
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
