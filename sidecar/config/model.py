"""`SidecarConfig`: the whole configuration, its top-level keys and the rules across sections.

Unknown keys are errors (nearly always typos). Method keys are exact names
(``getItem`` or ``Service:method``); patterns belong in ``retry.idempotent``
and ``fallback.methods``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sidecar.config.base import FieldProblem, Section
from sidecar.config.fallback import FallbackConfig
from sidecar.config.hedge import HedgeConfig
from sidecar.config.methods import is_idempotent
from sidecar.config.names import flag_of, shortcut_variable
from sidecar.config.operations import (
    ControlConfig,
    LimitsConfig,
    LogConfig,
    MetricsConfig,
    ReadinessConfig,
)
from sidecar.config.overrides import MethodConfig
from sidecar.config.policy import BreakerConfig, RetryConfig, StateConfig
from sidecar.config.tls import ServerTlsConfig
from sidecar.config.units import Address, Duration, PositiveDuration, Size, split_address
from sidecar.config.upstream import HealthCheckConfig, UpstreamConfig

# Exact method names (``getItem``) or ``Service:method``; Thrift identifiers
# may contain dots, and multiplexed service names often do.
# Most worker processes: far above the cores of any pod this runs in.
MAX_WORKERS = 64
_METHOD_KEY = re.compile(r"^(?:[A-Za-z_][\w.]*:)?[A-Za-z_][\w.]*$")


class SidecarConfig(Section):
    """The whole configuration."""

    listen: Address = Field("0.0.0.0:9090", description="Where Thrift clients connect.")
    transport: Literal["auto", "framed", "buffered"] = Field(
        "auto",
        description="Client-side transport; auto detects it per connection (framed, buffered "
        "or THeader, with binary or compact protocol). framed or buffered: only that transport, "
        "binary protocol, no detection.",
    )
    max_frame_size: Size = Field(
        16 << 20,
        description="Largest message accepted from a client or an upstream (64B to 2GiB).",
    )
    limits: LimitsConfig = Field(
        LimitsConfig(), description="What one client may cost the process (memory)."
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
        description="The upstream's Thrift IDL (optional): checks method names, encodes "
        "static replies, and tells a failed call whose arguments have other types than "
        "it declares (the client's doing: not counted against the upstream). Relative to "
        "this file.",
    )
    tls: ServerTlsConfig | None = Field(
        None, description="TLS on the listener (listen); null means plaintext."
    )
    workers: int | Literal["auto"] = Field(
        1,
        description="Processes serving listen, each accepting its own connections "
        "(SO_REUSEPORT); they share breaker state, retry budget and fallback cache. auto: "
        "the CPUs this process may use (its affinity, and the cgroup CPU limit, rounded up). "
        "Admin and control stay one endpoint each.",
    )
    upstream: UpstreamConfig = Field(UpstreamConfig(), description="The upstream service.")
    retry: RetryConfig = Field(RetryConfig(), description="Retries.")
    breaker: BreakerConfig = Field(BreakerConfig(), description="The circuit breaker.")
    fallback: FallbackConfig = Field(FallbackConfig(), description="Fallback replies.")
    health_check: HealthCheckConfig | None = Field(
        None,
        description="Active health checks of every upstream address; null turns them off "
        "(addresses then come back on the ejection timer, and a half-open breaker lets "
        "client calls through as probes).",
    )
    hedge: HedgeConfig = Field(HedgeConfig(), description="Hedged calls (idempotent methods only).")
    methods: dict[str, MethodConfig] = Field(
        default_factory=dict,
        description="Per-method overrides, keyed by exact method name or Service:method.",
    )
    state: StateConfig = Field(StateConfig(), description="Fleet mode.")
    metrics: MetricsConfig = Field(MetricsConfig(), description="The admin HTTP endpoint.")
    control: ControlConfig = Field(ControlConfig(), description="The control listener.")
    readiness: ReadinessConfig = Field(ReadinessConfig(), description="What /readyz answers.")
    log: LogConfig = Field(LogConfig(), description="Logging.")

    @field_validator("max_frame_size")
    @classmethod
    def _frame_size_range(cls, value: int) -> int:
        if not 64 <= value <= (1 << 31) - 1:
            raise ValueError("must be between 64B and 2GiB - 1")
        return value

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"must be auto or between 1 and {MAX_WORKERS}")
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
        control = self.control.listen
        for key, other in (("listen", self.listen), ("metrics.listen", self.metrics.listen)):
            if control is not None and other is not None and _same_port(control, other):
                raise FieldProblem(
                    "control.listen",
                    f"the control endpoint cannot share the port of {key} ({other}); "
                    "pick another port, or null to turn the endpoint off",
                    control,
                )
        if self.fallback.cache.backend == "redis" and self.state.redis_url is None:
            raise FieldProblem(
                "fallback.cache.backend",
                f"backend redis needs state.redis_url (or {flag_of('redis-url')}, "
                f"{shortcut_variable('redis-url')})",
                "redis",
            )
        for name, method in self.methods.items():
            if method.hedge.turns_on and not is_idempotent(self, name):
                raise FieldProblem(
                    ("methods", name, "hedge"),
                    f"only idempotent methods may be hedged: a hedge sends {name} twice, and "
                    "both may run on the upstream (mark it methods."
                    f"{name}.idempotent: true if it is safe to repeat)",
                    method.hedge.model_dump(exclude_none=True),
                )
        return self


_WILDCARD_HOSTS = ("0.0.0.0", "::", "*")


def _same_port(a: str, b: str) -> bool:
    """Would binding both addresses clash? (Port 0 asks for a free port: never.)"""
    (host_a, port_a), (host_b, port_b) = split_address(a), split_address(b)
    if port_a != port_b or port_a == 0:
        return False
    return host_a == host_b or host_a in _WILDCARD_HOSTS or host_b in _WILDCARD_HOSTS


# cgroup v2's CPU limit of this process's group ("QUOTA PERIOD" or "max PERIOD").
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"


def cpu_quota(path: str = CGROUP_CPU_MAX) -> float | None:
    """The CPUs the cgroup's quota allows (a Kubernetes CPU limit), or None: no limit or no file."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def worker_count(workers: int | str, cpu_max: str = CGROUP_CPU_MAX) -> int:
    """``workers`` as a number. ``auto``: the CPUs this process may run on (its
    affinity), fewer under a cgroup CPU limit (rounded up: a limit of 1.5 CPUs
    is 2 workers), at least 1 and at most `MAX_WORKERS`."""
    if isinstance(workers, int):
        return workers
    cpus = len(os.sched_getaffinity(0))
    quota = cpu_quota(cpu_max)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, min(MAX_WORKERS, cpus))
