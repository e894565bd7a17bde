"""The ``fallback`` section: when replies are served without the upstream, and where they are kept.

``serve_on`` says when (the breaker is open, every attempt failed, the call
was shed) and ``cache`` where cached replies live (this process, a SQLite
file or Redis) and for how long. Static replies are per method (`overrides`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sidecar.config.base import FieldProblem, Section
from sidecar.config.units import Duration, Size


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
