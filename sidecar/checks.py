"""Warnings about a valid config that probably does not do what its author wants."""

from __future__ import annotations

from sidecar.config import SidecarConfig, matches_any


def config_warnings(config: SidecarConfig) -> list[str]:
    """Human-readable warnings; an empty list means nothing to say."""
    warnings: list[str] = []
    for name, method in config.methods.items():
        idempotent = (
            method.idempotent
            if method.idempotent is not None
            else matches_any(name, config.retry.idempotent)
        )
        if idempotent and method.idempotent and not matches_any(name, config.retry.idempotent):
            warnings.append(
                f"retrying after send is enabled for method {name} (methods.{name}.idempotent: "
                "true): a call whose reply is lost may run twice on the upstream"
            )
        if not idempotent and method.fallback.cache:
            warnings.append(
                f"methods.{name}.fallback.cache is set but {name} is not idempotent; "
                "replies of non-idempotent methods are never cached"
            )
    if config.upstream.addresses == ():
        warnings.append(
            "no upstream address: set upstream.addresses, --upstream or SIDECAR_UPSTREAM"
        )
    if "internal_error" in config.retry.retry_on:
        warnings.append(
            "retry.retry_on lists internal_error: idempotent calls that fail inside the "
            "upstream will be run again"
        )
    r = config.retry
    if r.per_try_timeout > r.deadline:
        warnings.append(
            f"retry.per_try_timeout ({r.per_try_timeout:g}s) is longer than retry.deadline "
            f"({r.deadline:g}s): the deadline cuts every attempt short"
        )
    if config.metrics.listen is None:
        warnings.append("metrics.listen is null: no /metrics, /healthz or /readyz endpoint")
    return warnings
