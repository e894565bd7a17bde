"""The running sidecar: builds every part from the config, starts, reloads and stops it.

`Sidecar` owns the parts and their lifetimes; the parts themselves know
nothing of the config file. `serve` runs one sidecar until SIGTERM or SIGINT,
reloading on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

from sidecar import __version__
from sidecar.config import SidecarConfig, split_address
from sidecar.errors import ConfigError
from sidecar.fallback.service import Fallbacks
from sidecar.fallback.sqlite import SqliteStore
from sidecar.fallback.store import FallbackStore, MemoryStore
from sidecar.fleet import Fleet, make_fleet
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.policy import PolicyTable, StaticReply
from sidecar.protocol.framing import Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.pipeline import BreakerSet, Pipeline
from sidecar.proxy.server import Server, ServerSettings
from sidecar.proxy.timeouts import Timeouts
from sidecar.proxy.upstream import UpstreamPool
from sidecar.resilience.breaker import STATE_OPEN, STATE_VALUES, Breaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.ejection import EjectionTracker
from sidecar.resilience.outcome import Outcome

log = logging.getLogger("sidecar")

# Seconds between housekeeping rounds: idle connections, gauges.
HOUSEKEEPING_INTERVAL = 1.0

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


def upstream_name(config: SidecarConfig) -> str:
    """The name of the upstream in metrics and messages: its address(es)."""
    return ",".join(config.upstream.addresses)


def services_by_method(names: list[str]) -> dict[str, str]:
    """Bare method name -> its service, for methods that exactly one ``Service:method`` names."""
    found: dict[str, set[str]] = {}
    for name in names:
        service, sep, method = name.rpartition(":")
        if sep:
            found.setdefault(method, set()).add(service)
    return {method: services.pop() for method, services in found.items() if len(services) == 1}


def make_store(config: SidecarConfig, fleet: Fleet | None = None) -> FallbackStore:
    """The fallback store the config asks for (``redis`` uses the fleet's connection).

    Raises:
        ConfigError: the backend is not available, or its file cannot be used.
    """
    cache = config.fallback.cache
    if cache.backend == "redis" and fleet is not None:
        from sidecar.fallback.redis import RedisStore

        return RedisStore(
            fleet.backend,
            namespace=upstream_name(config),
            ttl=cache.ttl,
            max_entries=cache.max_entries,
            max_bytes=cache.max_bytes,
        )
    if cache.backend == "memory":
        return MemoryStore(ttl=cache.ttl, max_entries=cache.max_entries, max_bytes=cache.max_bytes)
    if cache.backend == "sqlite" and cache.path is not None:
        return SqliteStore(
            cache.path, ttl=cache.ttl, max_entries=cache.max_entries, max_bytes=cache.max_bytes
        )
    raise ConfigError(f"fallback.cache.backend: {cache.backend!r} is not available in this build")


class Sidecar:
    """One sidecar: Thrift listener, pipeline, upstream pools, admin endpoint.

    Args:
        config: validated configuration.
        static_replies: static fallback replies by method name (from the IDL).
        known_methods: method names that always get their own metrics label.
    """

    def __init__(
        self,
        config: SidecarConfig,
        *,
        static_replies: dict[str, StaticReply] | None = None,
        known_methods: list[str] | None = None,
        metrics: SidecarMetrics | None = None,
    ) -> None:
        if not config.upstream.addresses:
            raise ConfigError(
                "upstream.addresses: at least one upstream address is needed "
                "(--upstream HOST:PORT, SIDECAR_UPSTREAM or upstream.addresses in the file)"
            )
        self.config = config
        self.config_version = 1
        self.metrics = metrics or SidecarMetrics()
        self.static_replies = static_replies or {}
        known = sorted(set(config.methods) | set(known_methods or []))
        self.labels = MethodLabels(known, config.metrics.max_method_labels)
        self.service_of = services_by_method(known)
        self.name = upstream_name(config)
        self.fleet = make_fleet(config, self.metrics)  # None in local mode
        self.store = make_store(config, self.fleet)
        self.ready = False
        self.started_at = time.time()
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._admin: Any = None
        self.server: Server | None = None
        self.pipeline: Pipeline | None = None
        self.upstreams: UpstreamSet | None = None
        self.breakers: BreakerSet | None = None
        self.budget: RetryBudget | None = None
        self.timeouts: Timeouts | None = None

    # building

    def _breaker(self, name: str) -> Breaker:
        b = self.config.breaker
        shared = self.fleet.breaker_storage(name, b.reset_timeout) if self.fleet else None
        breaker = Breaker(
            name,
            fail_max=b.fail_max,
            reset_timeout=b.reset_timeout,
            success_threshold=b.success_threshold,
            half_open_max_calls=b.half_open_max_calls,
            storage=shared,
            on_transition=self._on_transition,
        )
        if shared is not None:  # a state adopted from the fleet fires the listener at once
            shared.observe(lambda: breaker.state)
        self.metrics.breaker_state.labels(name).set(0)
        self.metrics.breaker_last_opened.labels(name).set(0)
        return breaker

    def _on_transition(self, name: str, old: str, new: str) -> None:
        """pybreaker's listener: count, set the gauges, and log one line per transition."""
        m = self.metrics
        m.init_breaker(name)
        m.breaker_transitions.labels(name, old, new).inc()
        m.breaker_state.labels(name).set(STATE_VALUES.get(new, 0))
        extra = {"breaker": name, "from_state": old, "to_state": new}
        breaker_log = logging.getLogger("sidecar.breaker")
        if new == STATE_OPEN:
            m.breaker_last_opened.labels(name).set(time.time())
            breaker_log.warning(
                "circuit breaker %s: %s -> %s; calls get a fallback or an error for %gs, "
                "then probes are let through",
                name,
                old,
                new,
                self.config.breaker.reset_timeout,
                extra=extra,
            )
        else:
            breaker_log.info("circuit breaker %s: %s -> %s", name, old, new, extra=extra)

    def _pool(self, address: str, transport: Transport) -> UpstreamPool:
        host, port = split_address(address)
        u = self.config.upstream
        return UpstreamPool(
            address,
            host,
            port,
            transport,
            size=u.pool_size,
            connect_timeout=u.connect_timeout,
            max_message_size=self.config.max_frame_size,
            timeouts=self._timeouts(),
            loop=self._timeouts().loop,
        )

    def _timeouts(self) -> Timeouts:
        assert self.timeouts is not None, "pools are made after start()"
        return self.timeouts

    def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        config = self.config
        self.timeouts = Timeouts(loop)
        u = config.upstream
        tracker = EjectionTracker(
            list(u.addresses),
            consecutive_failures=u.ejection.consecutive_failures,
            base_time=u.ejection.base_time,
            max_time=u.ejection.max_time,
            max_percent=u.ejection.max_percent,
        )
        self.upstreams = UpstreamSet(u.addresses, self._pool, tracker, loop.time)
        self.breakers = BreakerSet(self._breaker, self.name, config.breaker.scope == "method")
        b = config.retry.budget
        self.budget = RetryBudget(b.ratio, b.min_retries_per_second, b.window)
        self.pipeline = Pipeline(
            upstreams=self.upstreams,
            upstream_transport=None if u.transport == "same" else Transport(u.transport),
            upstream_name=self.name,
            policies=PolicyTable(
                config, self.labels, self.static_replies, self.metrics.calls, self.service_of
            ),
            breakers=self.breakers,
            budget=self.budget,
            fallbacks=self._fallbacks(config),
            metrics=self.metrics,
            trip_on=frozenset(Outcome(v) for v in config.breaker.trip_on),
            loop=loop,
            rng=random.Random(),
        )
        self.server = Server(
            self.pipeline,
            ServerSettings(
                transport=config.transport,
                max_frame_size=config.max_frame_size,
                max_depth=config.max_depth,
                max_connections=config.max_connections,
                idle_timeout=config.idle_timeout,
            ),
            self.metrics,
            loop,
        )

    def _fallbacks(self, config: SidecarConfig) -> Fallbacks:
        return Fallbacks(
            self.store,
            serve_on=frozenset(config.fallback.serve_on),
            cache_declared_exceptions=config.fallback.cache_declared_exceptions,
        )

    # lifecycle

    async def start(self) -> None:
        """Listen on the Thrift and admin ports."""
        from sidecar.admin import AdminServer

        loop = asyncio.get_running_loop()
        self._build(loop)
        if self.fleet is not None:  # the fleet's breaker state, read before the first call
            await self.fleet.start()
        assert self.server is not None
        host, port = split_address(self.config.listen)
        self.listen_address = await self.server.listen(host, port)
        if self.config.metrics.listen is not None:
            admin = AdminServer(
                self.metrics.registry, lambda: self.ready, self.state, self.refresh_gauges
            )
            mhost, mport = split_address(self.config.metrics.listen)
            self.admin_address = await admin.listen(mhost, mport)
            self._admin = admin
        self._housekeeping = loop.create_task(self._housekeep())
        self._init_series()
        self.ready = True
        log.info(
            "thrift-sidecar %s listening on %s:%d (transport %s), upstream %s (transport %s)%s",
            __version__,
            *self.listen_address,
            self.config.transport,
            self.name,
            self.config.upstream.transport,
            f", admin on http://{self.admin_address[0]}:{self.admin_address[1]}"
            if self.admin_address
            else "",
        )

    async def stop(self, drain_timeout: float | None = None) -> bool:
        """Stop accepting, drain in-flight calls, close everything.

        Returns:
            True when every in-flight call finished within the drain timeout.
        """
        self.ready = False
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        finished = True
        if self.server is not None:
            log.info("draining: no new connections, waiting up to %gs for calls in flight", timeout)
            finished = await self.server.drain(timeout)
            if not finished:
                log.warning("drain timeout passed; closed connections with calls still in flight")
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        if self.upstreams is not None:
            self.upstreams.close()
        if self.timeouts is not None:
            self.timeouts.close()
        if self._admin is not None:
            await self._admin.close()
        await self.store.close()
        if self.fleet is not None:
            await self.fleet.stop()
        log.info("stopped")
        return finished

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                if self.server is not None:
                    self.server.sweep()
                if self.upstreams is not None:
                    for pool in self.upstreams.pools():
                        pool.close_idle(self.config.upstream.idle_timeout)
                self.refresh_gauges()
            except Exception:
                log.exception("housekeeping failed")

    # Reload and figure bookkeeping (class defaults; set per instance by reload, serve
    # and refresh_gauges).
    pending_restart: tuple[str, ...] = ()
    last_reload_error: str | None = None
    _series_ready = False
    _ejected_before: frozenset[str] = frozenset()

    def reload(
        self, new: SidecarConfig, static_replies: dict[str, StaticReply] | None = None
    ) -> list[str]:
        """Apply a new config to the running sidecar, without closing any connection.

        Retry, breaker, fallback and per-method settings, ``max_connections``,
        ``idle_timeout``, ``drain_timeout`` and ``log`` take effect for the
        next calls, on connections already open too. The keys in
        `RESTART_KEYS`, ``breaker.scope`` and ``fallback.cache`` keep their
        old values until a restart.

        Returns:
            The keys whose change needs a restart (not applied).

        Raises:
            RuntimeError: the sidecar has not been started.
        """
        if self.pipeline is None or self.breakers is None:
            raise RuntimeError("the sidecar is not running yet")
        old = self.config
        ignored = [k for k in RESTART_KEYS if getattr(old, k) != getattr(new, k)]
        if ignored:
            new = new.model_copy(update={k: getattr(old, k) for k in ignored})
        if new.breaker.scope != old.breaker.scope:
            # The breakers are made once per upstream or per method.
            ignored.append("breaker.scope")
            kept_breaker = new.breaker.model_copy(update={"scope": old.breaker.scope})
            new = new.model_copy(update={"breaker": kept_breaker})
        if new.fallback.cache != old.fallback.cache:
            # The store is built once; its backend and bounds need a restart.
            ignored.append("fallback.cache")
            kept = new.fallback.model_copy(update={"cache": old.fallback.cache})
            new = new.model_copy(update={"fallback": kept})
        self.config = new
        b = new.breaker
        for breaker in self.breakers.all():
            breaker.configure(
                fail_max=b.fail_max,
                reset_timeout=b.reset_timeout,
                success_threshold=b.success_threshold,
                half_open_max_calls=b.half_open_max_calls,
            )
        if new.retry.budget != old.retry.budget:
            nb = new.retry.budget
            self.budget = RetryBudget(nb.ratio, nb.min_retries_per_second, nb.window)
            self.pipeline.budget = self.budget
        if static_replies is not None:
            self.static_replies = static_replies
        self.labels.add_known(new.methods)
        self.pipeline.policies = PolicyTable(
            new, self.labels, self.static_replies, self.metrics.calls, self.service_of
        )
        self.pipeline.fallbacks = self._fallbacks(new)
        self.pipeline.trip_on = frozenset(Outcome(v) for v in b.trip_on)
        if self.server is not None:
            s = self.server.settings
            self.server.settings = ServerSettings(
                transport=s.transport,
                max_frame_size=s.max_frame_size,
                max_depth=s.max_depth,
                max_connections=new.max_connections,
                idle_timeout=new.idle_timeout,
            )
        self.config_version += 1
        self.pending_restart = tuple(ignored)
        self._series_ready = False  # new methods, new fallback sources
        self._init_series()
        return ignored

    # figures

    def _init_series(self) -> None:
        """Create the series known at start-up at zero (see `sidecar.metrics`).

        The upstream and its addresses, every breaker (with ``breaker.scope:
        method``, one per configured or IDL method), and per configured or
        IDL method: ``ok`` requests and attempts, the latency histogram, and
        the fallback sources it can be served from. Idempotent.
        """
        if self.pipeline is None or self.breakers is None:
            return
        m = self.metrics
        addresses = list(self.config.upstream.addresses)
        m.init_upstream(self.name, addresses)
        serves_fallbacks = bool(self.config.fallback.serve_on)
        for name in self.labels.configured:
            policy = self.pipeline.policies.for_name(name)
            sources = []
            if serves_fallbacks and policy.cacheable:
                sources.append("cache")
            if serves_fallbacks and policy.static_reply is not None:
                sources.append("static")
            m.init_method(policy.label, addresses, sources)
            self.breakers.for_policy(policy)
        for breaker in self.breakers.all():
            m.init_breaker(breaker.name)
        self._series_ready = True

    def refresh_gauges(self) -> None:
        """Update the gauges that are read off the parts rather than counted.

        Called every second and before each scrape; the first call also
        creates the start-up series (`_init_series`). Logs an ejected upstream
        address coming back into rotation.
        """
        if not self._series_ready:
            self._init_series()
        m = self.metrics
        if self.budget is not None:
            m.retry_budget_tokens.labels(self.name).set(self.budget.balance(_loop_time()))
        if self.breakers is not None:
            for breaker in self.breakers.all():
                m.init_breaker(breaker.name)
                m.breaker_state.labels(breaker.name).set(STATE_VALUES.get(breaker.state, 0))
                m.breaker_failures.labels(breaker.name).set(breaker.fail_counter)
        if self.fleet is not None:  # the fleet's view beside the local one
            for name, shared in self.fleet.breakers.shared_views():
                m.breaker_shared_state.labels(name).set(STATE_VALUES.get(shared.state, 0))
                m.breaker_shared_failures.labels(name).set(shared.fail_counter)
        if self.upstreams is not None:
            ejected = frozenset(self.upstreams.ejected())
            for address in sorted(self._ejected_before - ejected):
                log.info(
                    "upstream address %s is back in rotation", address, extra={"upstream": address}
                )
            self._ejected_before = ejected
            per_address = {address: (0, 0) for address in self.upstreams.addresses}
            for address in self.upstreams.addresses:
                m.upstream_ejected.labels(address).set(1 if address in ejected else 0)
            for pool in self.upstreams.pools():
                busy, idle = per_address.get(pool.address, (0, 0))
                per_address[pool.address] = (
                    busy + pool.open_connections - pool.idle_connections,
                    idle + pool.idle_connections,
                )
            for address, (busy, idle) in per_address.items():
                m.upstream_connections.labels(address, "busy").set(busy)
                m.upstream_connections.labels(address, "idle").set(idle)
        stats = self.store.stats()
        m.fallback_cache_entries.set(stats.entries)
        m.fallback_cache_bytes.set(stats.bytes)

    def state(self) -> dict[str, Any]:
        """The ``/state`` document: what an operator asks a sick sidecar first.

        Keys: ``version``, ``config_version``, ``ready``, ``uptime_seconds``,
        ``listen``, ``upstream`` (addresses, ejected ones), ``breakers``
        (state, counters, settings, seconds until a probe), ``pools`` (per
        address and transport), ``retry_budget``, ``fallback_store`` and
        ``fallback_store_losses`` (writes dropped or failed, reads missed),
        ``shared_state`` (fleet mode: the Redis URL without password, whether
        it answers, the last error, each breaker's state as Redis holds it),
        ``config`` (reloads, the last error, changes waiting for a restart),
        ``method_labels`` and ``client_connections``.
        """
        now = _loop_time()
        wall = time.time()
        b = self.config.breaker
        transitions = _samples(self.metrics.breaker_transitions, "breaker_transitions_total")
        breakers = []
        for breaker in self.breakers.all() if self.breakers else []:
            opened = breaker.opened_at
            probe_in = None
            if breaker.state == STATE_OPEN and opened is not None:
                probe_in = round(max(0.0, opened.timestamp() + b.reset_timeout - wall), 3)
            breakers.append(
                {
                    "name": breaker.name,
                    "state": breaker.state,
                    "consecutive_failures": breaker.fail_counter,
                    "half_open_successes": breaker.success_counter,
                    "probes_in_flight": breaker.probes_in_flight,
                    "rejected_calls": breaker.rejected,
                    "last_opened": opened.isoformat() if opened else None,
                    "probe_in_seconds": probe_in,
                    "transitions": {
                        f"{old}->{new}": int(v)
                        for (name, old, new), v in sorted(transitions.items())
                        if name == breaker.name and v
                    },
                    "fail_max": b.fail_max,
                    "reset_timeout_seconds": b.reset_timeout,
                }
            )
        ejected = self.upstreams.ejected() if self.upstreams else []
        pools = [
            {
                "address": pool.address,
                "transport": pool.transport_kind.value,
                "open": pool.open_connections,
                "idle": pool.idle_connections,
                "busy": pool.open_connections - pool.idle_connections,
                "max": pool.size,
                "ejected": pool.address in ejected,
            }
            for pool in (self.upstreams.pools() if self.upstreams else [])
        ]
        stats = self.store.stats()
        budget = self.config.retry.budget
        exhausted = _samples(self.metrics.retry_budget_exhausted, "retry_budget_exhausted_total")
        reloads = _samples(self.metrics.config_reloads, "config_reloads_total")
        return {
            "version": __version__,
            "config_version": self.config_version,
            "ready": self.ready,
            "uptime_seconds": round(wall - self.started_at, 3),
            "listen": self.config.listen,
            "upstream": {
                "name": self.name,
                "addresses": list(self.config.upstream.addresses),
                "ejected": ejected,
            },
            "breakers": breakers,
            "pools": pools,
            "retry_budget": {
                "tokens": round(self.budget.balance(now), 3) if self.budget else None,
                "exhausted_total": int(exhausted.get((self.name,), 0)),
                "ratio": budget.ratio,
                "min_retries_per_second": budget.min_retries_per_second,
                "window_seconds": budget.window,
            },
            "fallback_store": {
                "backend": stats.backend,
                "entries": stats.entries,
                "bytes": stats.bytes,
                "healthy": stats.healthy,
            },
            "fallback_store_losses": {
                "dropped_writes": stats.dropped_writes,
                "failed_writes": stats.failed_writes,
                "missed_reads": stats.missed_reads,
            },
            "shared_state": self.fleet.describe() if self.fleet else {"enabled": False},
            "config": {
                "version": self.config_version,
                "reloads_ok": int(reloads.get(("ok",), 0)),
                "reloads_failed": int(reloads.get(("error",), 0)),
                "last_reload_error": self.last_reload_error,
                "restart_needed_for": list(self.pending_restart),
            },
            "method_labels": {"in_use": self.labels.in_use(), "max": self.labels.limit},
            "client_connections": len(self.server.connections) if self.server else 0,
        }


def _samples(metric: Any, sample_name: str) -> dict[tuple[str, ...], float]:
    """The values of one labelled metric by label values, read through its public ``collect``."""
    found: dict[tuple[str, ...], float] = {}
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(sample_name):
                found[tuple(sample.labels.values())] = sample.value
    return found


def _loop_time() -> float:
    """The event loop's clock, which the pipeline's budget and timeouts use."""
    return asyncio.get_running_loop().time()


@contextlib.contextmanager
def signal_handlers(
    loop: asyncio.AbstractEventLoop, handlers: dict[signal.Signals, Callable[[], None]]
) -> Iterator[None]:
    """Install loop signal handlers, and remove them on the way out."""
    installed = []
    try:
        for sig, handler in handlers.items():
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


Reloader = Callable[[], tuple[SidecarConfig, dict[str, Any]]]


async def serve(sidecar: Sidecar, reload_config: Reloader | None = None) -> bool:
    """Run until SIGTERM or SIGINT; reload on SIGHUP. Returns whether the drain was clean.

    - SIGTERM/SIGINT: `Sidecar.stop`: stop accepting (the listener closes, so
      new connections are refused; ``/readyz`` answers 503), close idle
      client connections, let calls in flight finish for up to
      ``drain_timeout``, then cut what is left. A second signal is logged and
      changes nothing.
    - SIGHUP: `reload_config`, then `Sidecar.reload`. A config that fails to
      load or to apply is rejected: logged, counted in
      ``config_reloads_total{result="error"}``, and the running one kept. A
      change of ``log`` is applied here. No connection is closed.

    Args:
        sidecar: the sidecar to run (not started yet).
        reload_config: loads and checks the config again, returning it and
            the IDL's parts (``static_replies``); raises ConfigError.
    """
    from sidecar.logs import configure_logging

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_stop(name: str) -> None:
        if stop.is_set():
            log.info("%s received: already draining", name, extra={"signal": name})
            return
        log.info("%s received: shutting down", name, extra={"signal": name})
        stop.set()

    def on_reload() -> None:
        if stop.is_set():
            log.warning("SIGHUP ignored: shutting down")
            return
        if reload_config is None:
            log.warning("SIGHUP ignored: no config file to reload")
            return
        if sidecar.pipeline is None:
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
        changed = [
            k for k in type(current).model_fields if getattr(running, k) != getattr(current, k)
        ]
        extra = {
            "config_version": sidecar.config_version,
            "result": "ok",
            "changed": changed,
            "restart_needed_for": ignored,
        }
        applied = f"changed {', '.join(changed)}" if changed else "no changes applied"
        if ignored:
            log.warning(
                "config reloaded (version %d): %s; changes to %s need a restart "
                "and were not applied",
                sidecar.config_version,
                applied,
                ", ".join(ignored),
                extra=extra,
            )
        else:
            log.info(
                "config reloaded (version %d): %s", sidecar.config_version, applied, extra=extra
            )

    handlers = {
        signal.SIGTERM: lambda: on_stop("SIGTERM"),
        signal.SIGINT: lambda: on_stop("SIGINT"),
        signal.SIGHUP: on_reload,
    }
    with signal_handlers(loop, handlers):
        # Handlers first: a SIGTERM right after "listening" must drain, not kill.
        await sidecar.start()
        sidecar.refresh_gauges()  # the start-up series exist before the first call
        await stop.wait()
        return await sidecar.stop()
