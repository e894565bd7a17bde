"""The ``upstream`` and ``health_check`` sections: where calls go, and which addresses take them.

Addresses, transport and protocol, the connection pool, the limits of calls
in flight (fixed, or following the upstream's latency), passive ejection of
addresses that keep failing, and active health checks that probe each one.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sidecar.config.base import FieldProblem, Section
from sidecar.config.tls import UpstreamTlsConfig
from sidecar.config.units import Address, Duration, PositiveDuration

# A method name as sent on the wire: ``ping`` or ``Service:ping`` (Thrift
# identifiers may contain dots; multiplexed service names often do).
_WIRE_METHOD = re.compile(r"^(?:[A-Za-z_][\w.]*:)?[A-Za-z_][\w.]*$")


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
