"""Building the sidecar's parts from a config: stores, breakers, the call context, the listener.

Functions only, no state of their own: `sidecar.app.lifecycle` calls them at
start-up and `sidecar.app.reload` calls `call_context` again with a new
config. What reaches the upstream (pools, TLS to it, health checks) is built
in `sidecar.app.upstreams`, and what limits the calls sent to it (retry
budget, hedging, concurrency limit) in `sidecar.app.limits`. Nothing here
opens a socket; `make_store` may open the SQLite file.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from sidecar.admin import AdminServer, ControlServer
from sidecar.app.limits import ALONE, hedging, limiter
from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.fallback.service import Fallbacks
from sidecar.fallback.shared import SharedStore
from sidecar.fallback.static import ArgumentTypes, ExceptionIds, StaticReply
from sidecar.fallback.store import FallbackStore, MemoryStore
from sidecar.fleet import Fleet
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.framing import Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.context import CallContext
from sidecar.proxy.health import HealthChecker
from sidecar.proxy.hedge import Hedging
from sidecar.proxy.oneway import OnewayMethods
from sidecar.proxy.policy import PolicyTable
from sidecar.proxy.server import Server, ServerSettings
from sidecar.proxy.timeouts import Timeouts
from sidecar.proxy.tls import ClientTls, UpstreamTls, server_context
from sidecar.resilience.breaker import Breaker, TransitionCallback
from sidecar.resilience.breakers import BreakerSet
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.limits import ConcurrencyLimit
from sidecar.resilience.outcome import Outcome
from sidecar.resilience.window import RateSettings
from sidecar.workers.breaker_table import BreakerTable, SlotStorage
from sidecar.workers.label_table import LabelTable


@dataclass(slots=True)
class Parts:
    """What a started sidecar runs on; made by `sidecar.app.lifecycle.Sidecar.start`."""

    fleet: Fleet | None
    store: FallbackStore
    timeouts: Timeouts
    breakers: BreakerSet
    server: Server
    oneway: OnewayMethods
    admin: AdminServer | None = None
    control: ControlServer | None = None
    housekeeping: asyncio.Task[None] | None = None
    client_tls: ClientTls | None = None
    upstream_tls: UpstreamTls | None = None
    health: HealthChecker | None = None
    breaker_table: BreakerTable | None = None
    label_table: LabelTable | None = None


def upstream_name(config: SidecarConfig) -> str:
    """The name of the upstream in metrics and messages: its address(es)."""
    return ",".join(config.upstream.addresses)


def upstream_shown(config: SidecarConfig) -> str | None:
    """What error replies to clients call the upstream; None: its address."""
    u = config.upstream
    if u.addresses_in_replies:
        return None
    return "the upstream" if u.name is None else f"upstream {u.name}"


def services_by_method(names: list[str]) -> dict[str, str]:
    """Bare method name -> its service, for methods that exactly one ``Service:method`` names."""
    found: dict[str, set[str]] = {}
    for name in names:
        service, sep, method = name.rpartition(":")
        if sep:
            found.setdefault(method, set()).add(service)
    return {method: services.pop() for method, services in found.items() if len(services) == 1}


def make_store(config: SidecarConfig, fleet: Fleet | None) -> FallbackStore:
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
        from sidecar.fallback.sqlite import SqliteStore

        return SqliteStore(
            cache.path, ttl=cache.ttl, max_entries=cache.max_entries, max_bytes=cache.max_bytes
        )
    raise ConfigError(f"fallback.cache.backend: {cache.backend!r} is not available in this build")


def worker_store(config: SidecarConfig, socket: Path) -> SharedStore:
    """A worker's fallback store: the supervisor's, reached through ``socket``."""
    cache = config.fallback.cache
    return SharedStore(socket, ttl=cache.ttl, backend_name=cache.backend)


def rate_settings(config: SidecarConfig) -> RateSettings | None:
    """The rate window's settings for ``breaker.mode: rate``; None for ``consecutive``."""
    b = config.breaker
    if b.mode != "rate":
        return None
    return RateSettings(
        window_type=b.window_type,
        window_size=b.window_size,
        minimum_calls=b.minimum_calls,
        failure_rate_threshold=b.failure_rate_threshold,
        slow_call_duration=b.slow_call_duration,
        slow_call_rate_threshold=b.slow_call_rate_threshold,
    )


def breakers(
    config: SidecarConfig,
    metrics: SidecarMetrics,
    fleet: Fleet | None,
    on_transition: TransitionCallback,
    table: BreakerTable | None = None,
) -> BreakerSet:
    """The upstream's breakers (one, or one per method label), shared through the
    fleet, or with this sidecar's other workers through their ``table``."""
    b = config.breaker
    rate = rate_settings(config)

    def make(name: str) -> Breaker:
        shared = fleet.breaker_storage(name, b.reset_timeout) if fleet else None
        slot = table.storage(name) if table is not None and shared is None else None
        storage = shared if shared is not None else slot
        breaker = Breaker(
            name,
            fail_max=b.fail_max,
            reset_timeout=b.reset_timeout,
            success_threshold=b.success_threshold,
            half_open_max_calls=b.half_open_max_calls,
            storage=storage,
            on_transition=on_transition,
            clock=time.time,
            rate=rate,
        )
        if shared is not None:  # a state adopted from the fleet fires the listener at once
            shared.observe(lambda: breaker.state)
        if isinstance(slot, SlotStorage):  # another worker's change: adopted, resets muted
            slot.observe(lambda: breaker.state)
        metrics.breaker_state.labels(name).set(0)
        metrics.breaker_last_opened.labels(name).set(0)
        return breaker

    return BreakerSet(make, upstream_name(config), b.scope == "method")


def fallbacks(config: SidecarConfig, store: FallbackStore) -> Fallbacks:
    """What to remember and serve, over ``store``."""
    return Fallbacks(
        store,
        serve_on=frozenset(config.fallback.serve_on),
        cache_declared_exceptions=config.fallback.cache_declared_exceptions,
    )


def call_context(
    config: SidecarConfig,
    *,
    loop: asyncio.AbstractEventLoop,
    upstream_set: UpstreamSet,
    breaker_set: BreakerSet,
    retry_budget: RetryBudget,
    store: FallbackStore,
    metrics: SidecarMetrics,
    labels: MethodLabels,
    static_replies: dict[str, StaticReply],
    service_of: dict[str, str],
    oneway_methods: frozenset[str],
    learned_oneway: OnewayMethods,
    rng: random.Random | None = None,
    exception_ids: ExceptionIds | None = None,
    argument_types: dict[str, ArgumentTypes] | None = None,
    concurrency: ConcurrencyLimit | None = None,
    hedge_state: Hedging | None = None,
    worker: tuple[int, int] = ALONE,
) -> CallContext:
    """The context calls start with, for this config and these long-lived parts
    (``hedge_state``: the running one on a reload; a new one at start-up)."""
    u = config.upstream
    return CallContext(
        loop=loop,
        clock=loop.time,
        upstreams=upstream_set,
        upstream_transport=None if u.transport == "same" else Transport(u.transport),
        upstream_protocol=None if u.protocol == "same" else Protocol(u.protocol),
        upstream_name=upstream_name(config),
        upstream_shown=upstream_shown(config),
        policies=PolicyTable(
            config,
            labels,
            static_replies,
            metrics.calls,
            service_of,
            oneway_methods,
            exception_ids,
            argument_types,
        ),
        breakers=breaker_set,
        budget=retry_budget,
        fallbacks=fallbacks(config, store),
        metrics=metrics,
        trip_on=frozenset(Outcome(v) for v in config.breaker.trip_on),
        rng=rng or random.Random(),
        max_message_size=config.max_frame_size,
        max_depth=config.max_depth,
        timeout_header=u.theader_timeout_header,
        oneway=learned_oneway,
        hedging=hedging(config, hedge_state),
        access_sample_rate=config.log.access.sample_rate,
        validate_framed=config.limits.validate_framed_calls,
        limiter=concurrency or limiter(config, worker),
    )


def server_settings(config: SidecarConfig) -> ServerSettings:
    """The client-side limits of the Thrift listener."""
    return ServerSettings(
        transport=config.transport,
        max_frame_size=config.max_frame_size,
        max_depth=config.max_depth,
        max_connections=config.max_connections,
        idle_timeout=config.idle_timeout,
        max_buffered_bytes=config.limits.max_buffered_bytes,
    )


def client_tls(
    config: SidecarConfig, metrics: SidecarMetrics, loop: asyncio.AbstractEventLoop
) -> ClientTls | None:
    """TLS on the listener (``tls``), or None for plaintext."""
    context = server_context(config)
    if context is None:
        return None
    return ClientTls(context, metrics, loop, max_handshakes=min(config.max_connections, 1024))
