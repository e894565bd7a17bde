"""Applying a new config to a running sidecar (SIGHUP), without closing a connection.

Retry, breaker, fallback and per-method settings, ``max_connections``,
``idle_timeout``, ``drain_timeout`` and ``log`` take effect for the calls that
start after the reload, on connections already open too: a new `CallContext`
is built and handed to the server, and calls in flight finish on the one they
started with. The keys in `RESTART_KEYS`, ``breaker.scope`` and
``fallback.cache`` keep their old values until a restart, and the reload
says so. A config that fails to load or to apply is rejected, logged and
counted; the running one stays.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

from sidecar.app import build
from sidecar.app.gauges import Gauges
from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.fallback.static import StaticReply
from sidecar.logs import configure_logging
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.proxy.context import CallContext

# Loads and checks the config file again: the config and the IDL's parts.
Reloader = Callable[[], tuple[SidecarConfig, dict[str, Any]]]


class Reloadable(Protocol):
    """What a reload reads and changes of a running sidecar (`sidecar.app.lifecycle.Sidecar`)."""

    config: SidecarConfig
    config_version: int
    static_replies: dict[str, StaticReply]
    labels: MethodLabels
    metrics: SidecarMetrics
    service_of: dict[str, str]
    parts: build.Parts | None
    pending_restart: tuple[str, ...]
    last_reload_error: str | None
    gauges: Gauges

    def use_context(self, context: CallContext) -> None: ...

    def reload(
        self, new: SidecarConfig, static_replies: dict[str, StaticReply] | None = None
    ) -> list[str]: ...


log = logging.getLogger("sidecar")

# Keys whose change needs a restart; a reload keeps the old value and says so.
RESTART_KEYS = (
    "listen",
    "transport",
    "max_frame_size",
    "max_depth",
    "upstream",
    "metrics",
    "state",
    "idl",
)


def kept_for_restart(old: SidecarConfig, new: SidecarConfig) -> tuple[SidecarConfig, list[str]]:
    """``new`` with the keys that need a restart set back to ``old``'s, and those keys."""
    ignored = [k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)]
    if ignored:
        new = new.model_copy(update={k: getattr(old, k) for k in ignored})
    if new.breaker.scope != old.breaker.scope:  # the breakers are made once per scope
        ignored.append("breaker.scope")
        kept = new.breaker.model_copy(update={"scope": old.breaker.scope})
        new = new.model_copy(update={"breaker": kept})
    if new.fallback.cache != old.fallback.cache:  # the store is built once
        ignored.append("fallback.cache")
        kept_fallback = new.fallback.model_copy(update={"cache": old.fallback.cache})
        new = new.model_copy(update={"fallback": kept_fallback})
    return new, ignored


def apply(
    sidecar: Reloadable, new: SidecarConfig, static_replies: dict[str, StaticReply] | None = None
) -> list[str]:
    """Apply ``new`` to a running sidecar.

    Returns:
        The keys whose change needs a restart (not applied).

    Raises:
        RuntimeError: the sidecar has not been started.
    """
    parts = sidecar.parts
    if parts is None:
        raise RuntimeError("the sidecar is not running yet")
    old = sidecar.config
    new, ignored = kept_for_restart(old, new)
    b = new.breaker
    for breaker in parts.breakers.all():
        breaker.configure(
            fail_max=b.fail_max,
            reset_timeout=b.reset_timeout,
            success_threshold=b.success_threshold,
            half_open_max_calls=b.half_open_max_calls,
        )
    current = parts.server.context
    budget = current.budget
    if new.retry.budget != old.retry.budget:
        budget = build.budget(new)
    if static_replies is not None:
        sidecar.static_replies = static_replies
    sidecar.labels.add_known(new.methods)
    context = build.call_context(
        new,
        loop=current.loop,
        upstream_set=current.upstreams,
        breaker_set=parts.breakers,
        retry_budget=budget,
        store=parts.store,
        metrics=sidecar.metrics,
        labels=sidecar.labels,
        static_replies=sidecar.static_replies,
        service_of=sidecar.service_of,
        rng=current.rng,
    )
    sidecar.config = new
    sidecar.use_context(context)
    settings = parts.server.settings
    parts.server.settings = dataclasses.replace(
        settings, max_connections=new.max_connections, idle_timeout=new.idle_timeout
    )
    sidecar.config_version += 1
    sidecar.pending_restart = tuple(ignored)
    sidecar.gauges.config_changed()  # new methods, new fallback sources
    sidecar.gauges.init_series(new, context)
    return ignored


def on_sighup(sidecar: Reloadable, reload_config: Reloader | None) -> None:
    """Load the config again and apply it; log and count the result either way."""
    if reload_config is None:
        log.warning("SIGHUP ignored: no config file to reload")
        return
    if sidecar.parts is None:
        log.warning("SIGHUP ignored: still starting")
        return
    running = sidecar.config
    try:
        new, parts = reload_config()
        ignored = sidecar.reload(new, static_replies=parts.get("static_replies"))
    except Exception as exc:  # a bad file, or a bug: either way the running config stays
        sidecar.metrics.config_reloads.labels("error").inc()
        sidecar.last_reload_error = str(exc)
        extra = {"config_version": sidecar.config_version, "result": "error"}
        if isinstance(exc, ConfigError):
            log.error(
                "config reload rejected, still running config version %d: %s",
                sidecar.config_version,
                exc,
                extra=extra,
            )
        else:
            log.exception(
                "config reload failed, still running config version %d",
                sidecar.config_version,
                extra=extra,
            )
        return
    sidecar.metrics.config_reloads.labels("ok").inc()
    sidecar.last_reload_error = None
    current = sidecar.config
    if current.log != running.log:
        configure_logging(current.log.level, current.log.format)
    changed = [k for k in type(current).model_fields if getattr(running, k) != getattr(current, k)]
    extra = {
        "config_version": sidecar.config_version,
        "result": "ok",
        "changed": changed,
        "restart_needed_for": ignored,
    }
    applied = f"changed {', '.join(changed)}" if changed else "no changes applied"
    if ignored:
        log.warning(
            "config reloaded (version %d): %s; changes to %s need a restart and were not applied",
            sidecar.config_version,
            applied,
            ", ".join(ignored),
            extra=extra,
        )
    else:
        log.info("config reloaded (version %d): %s", sidecar.config_version, applied, extra=extra)
