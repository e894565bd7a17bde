"""Applying a new config to a running sidecar (SIGHUP), without closing a connection.

Retry, breaker, fallback, health check and per-method settings, ``max_connections``,
``idle_timeout``, ``drain_timeout`` and ``log`` take effect for the calls that
start after the reload, on connections already open too: a new `CallContext`
is built and handed to the server, and calls in flight finish on the one they
started with. ``upstream.max_in_flight`` and ``upstream.adaptive_concurrency``
change the one limit that lives as long as the process, so the calls in
flight keep counting against the new value. The keys in `RESTART_KEYS` (but
those two),
``breaker.scope`` and ``fallback.cache`` keep their old values until a
restart, and the reload says so. A config that fails to load or to apply is rejected, logged and
counted; the running one stays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any, Protocol

from sidecar.app import build, limits, upstreams
from sidecar.app.gauges import Gauges
from sidecar.config import SidecarConfig, redact
from sidecar.errors import ConfigError
from sidecar.fallback.static import ArgumentTypes, ExceptionIds, StaticReply
from sidecar.logs import configure_logging
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.proxy.context import CallContext
from sidecar.proxy.tls import reload_certificates

# Loads and checks the config file again: the config and the IDL's parts.
Reloader = Callable[[], tuple[SidecarConfig, dict[str, Any]]]


class Reloadable(Protocol):
    """What a reload reads and changes of a running sidecar (`sidecar.app.lifecycle.Sidecar`)."""

    config: SidecarConfig
    config_version: int
    static_replies: dict[str, StaticReply]
    exception_ids: ExceptionIds
    argument_types: dict[str, ArgumentTypes]
    health_arguments: bytes
    labels: MethodLabels
    metrics: SidecarMetrics
    service_of: dict[str, str]
    oneway_methods: frozenset[str]
    parts: build.Parts | None
    pending_restart: tuple[str, ...]
    last_reload_error: str | None
    gauges: Gauges

    @property
    def worker_count(self) -> int:
        """Processes sharing the sidecar's port and retry budget."""

    @property
    def worker_slot(self) -> tuple[int, int]:
        """(this worker's index, how many workers)."""

    def use_context(self, context: CallContext) -> None: ...

    def reload(
        self,
        new: SidecarConfig,
        static_replies: dict[str, StaticReply] | None = None,
        exception_ids: ExceptionIds | None = None,
        health_arguments: bytes | None = None,
        argument_types: dict[str, ArgumentTypes] | None = None,
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
    "control",
    "state",
    "idl",
    "workers",
)
# Keys under ``upstream`` that a reload applies (the rest of ``upstream`` waits for a restart).
UPSTREAM_RELOADED = ("max_in_flight", "adaptive_concurrency")


def kept_for_restart(old: SidecarConfig, new: SidecarConfig) -> tuple[SidecarConfig, list[str]]:
    """``new`` with the keys that need a restart set back to ``old``'s, and those keys."""
    restart = {k: getattr(old, k) for k in RESTART_KEYS}
    # Of the upstream's keys, UPSTREAM_RELOADED apply on reload; the others need a restart.
    applied = {key: getattr(new.upstream, key) for key in UPSTREAM_RELOADED}
    restart["upstream"] = old.upstream.model_copy(update=applied)
    ignored = [k for k in RESTART_KEYS if restart[k] != getattr(new, k)]
    if ignored:
        new = new.model_copy(update={k: restart[k] for k in ignored})
    if new.breaker.scope != old.breaker.scope:  # the breakers are made once per scope
        ignored.append("breaker.scope")
        kept = new.breaker.model_copy(update={"scope": old.breaker.scope})
        new = new.model_copy(update={"breaker": kept})
    if (new.tls is None) != (old.tls is None):  # the listener is made with TLS or without
        ignored.append("tls")
        new = new.model_copy(update={"tls": old.tls})
    if new.fallback.cache != old.fallback.cache:  # the store is built once
        ignored.append("fallback.cache")
        kept_fallback = new.fallback.model_copy(update={"cache": old.fallback.cache})
        new = new.model_copy(update={"fallback": kept_fallback})
    return new, ignored


def apply(
    sidecar: Reloadable,
    new: SidecarConfig,
    static_replies: dict[str, StaticReply] | None = None,
    exception_ids: ExceptionIds | None = None,
    health_arguments: bytes | None = None,
    argument_types: dict[str, ArgumentTypes] | None = None,
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
    # Certificates and keys read again for new connections (ConfigError: rejected).
    reload_certificates(new, parts.client_tls, parts.upstream_tls)
    b = new.breaker
    for breaker in parts.breakers.all():
        breaker.configure(
            fail_max=b.fail_max,
            reset_timeout=b.reset_timeout,
            success_threshold=b.success_threshold,
            half_open_max_calls=b.half_open_max_calls,
            rate=build.rate_settings(new),
        )
    current = parts.server.context
    budget = current.budget
    if new.retry.budget != old.retry.budget:
        budget = limits.budget(new, sidecar.worker_count)
    limits.reconfigure_limiter(
        current.limiter, new, sidecar.worker_slot
    )  # calls in flight keep counting
    if static_replies is not None:
        sidecar.static_replies = static_replies
    if exception_ids is not None:
        sidecar.exception_ids = exception_ids
    if health_arguments is not None:
        sidecar.health_arguments = health_arguments
    if argument_types is not None:
        sidecar.argument_types = argument_types
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
        oneway_methods=sidecar.oneway_methods,
        learned_oneway=parts.oneway,
        rng=current.rng,
        exception_ids=sidecar.exception_ids,
        argument_types=sidecar.argument_types,
        concurrency=current.limiter,
        hedge_state=current.hedging,
    )
    sidecar.config = new
    sidecar.use_context(context)
    apply_health_check(sidecar, parts, new)
    settings = parts.server.settings
    parts.server.settings = dataclasses.replace(
        settings,
        max_connections=new.max_connections,
        idle_timeout=new.idle_timeout,
        max_buffered_bytes=new.limits.max_buffered_bytes,
    )
    sidecar.config_version += 1
    sidecar.pending_restart = tuple(ignored)
    sidecar.gauges.config_changed()  # new methods, new fallback sources
    sidecar.gauges.init_series(new, context)
    return ignored


def apply_health_check(sidecar: Reloadable, parts: build.Parts, new: SidecarConfig) -> None:
    """Turn health checks on or off, or give them new settings."""
    settings = upstreams.health_settings(new, sidecar.health_arguments)
    checker = parts.health
    if settings is None:
        if checker is not None:
            checker.close()  # its tasks end on their own, at their next await
            parts.health = None
        return
    if checker is not None:
        checker.configure(settings)
        return
    context = parts.server.context
    parts.health = upstreams.health_checker(
        settings,
        new,
        upstream_set=context.upstreams,
        breaker_set=parts.breakers,
        timeouts=parts.timeouts,
        loop=context.loop,
        metrics=sidecar.metrics,
        tls=parts.upstream_tls,
    )
    parts.health.start()


class Reloads:
    """SIGHUPs, one reload at a time: the file and the IDL are read off the event loop.

    Reading YAML and loading an IDL take milliseconds to seconds; done on the
    loop they would stall every call. `request` starts a reload task (or, when
    one is running, asks for one more after it), the config is loaded in a
    worker thread, and applied back on the loop.
    """

    def __init__(self, sidecar: Reloadable, reload_config: Reloader | None) -> None:
        self._sidecar = sidecar
        self._load = reload_config
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def request(self) -> None:
        """A SIGHUP arrived."""
        if self._load is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return
        if self._sidecar.parts is None:
            log.warning("SIGHUP ignored: still starting")
            return
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        assert self._load is not None
        while True:
            self._again = False
            try:
                loaded = await asyncio.to_thread(self._load)
            except Exception as exc:
                reload_failed(self._sidecar, exc)
            else:
                apply_loaded(self._sidecar, *loaded)
            if not self._again:
                return

    async def close(self) -> None:
        """Wait for a reload in progress (a shutdown does not cut one in half)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def reload_failed(sidecar: Reloadable, exc: BaseException) -> None:
    """Count and log a rejected reload; the running config stays. Secrets are redacted."""
    sidecar.metrics.config_reloads.labels("error").inc()
    text = redact(str(exc))
    sidecar.last_reload_error = text
    extra = {"config_version": sidecar.config_version, "result": "error"}
    if isinstance(exc, ConfigError):
        log.error(
            "config reload rejected, still running config version %d: %s",
            sidecar.config_version,
            text,
            extra=extra,
        )
    else:
        log.error(
            "config reload failed, still running config version %d: %s: %s",
            sidecar.config_version,
            type(exc).__name__,
            text,
            exc_info=exc,
            extra=extra,
        )


def apply_loaded(sidecar: Reloadable, new: SidecarConfig, parts: dict[str, Any]) -> None:
    """Apply a config loaded for a SIGHUP; log and count the result either way."""
    running = sidecar.config
    try:
        ignored = sidecar.reload(
            new,
            static_replies=parts.get("static_replies"),
            exception_ids=parts.get("exception_ids"),
            health_arguments=parts.get("health_arguments"),
            argument_types=parts.get("argument_types"),
        )
    except Exception as exc:  # a bug while applying: the running config stays
        reload_failed(sidecar, exc)
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
