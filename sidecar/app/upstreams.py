"""The parts that reach the upstream, built from a config: pools, addresses, TLS, health checks.

`upstreams` is the upstream's address set, with passive ejection, over
connection pools that `pool_maker` opens on first use; `upstream_tls` is TLS
to it; `health_settings` and `health_checker` the active health check, which
probes each address over a pool of its own. Functions only, like
`sidecar.app.build`, which builds the rest; nothing here opens a socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.config import SidecarConfig, split_address
from sidecar.metrics import SidecarMetrics
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.framing import Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.health import HealthChecker, HealthSettings
from sidecar.proxy.timeouts import Timeouts
from sidecar.proxy.tls import UpstreamTls, upstream_context
from sidecar.proxy.upstream import UpstreamPool
from sidecar.resilience.breakers import BreakerSet
from sidecar.resilience.ejection import EjectionTracker


def pool_maker(
    config: SidecarConfig,
    timeouts: Timeouts,
    loop: asyncio.AbstractEventLoop,
    tls: UpstreamTls | None,
    size: int,
    on_stray: Callable[[str], None] | None = None,
) -> Callable[[str, Transport, Protocol], UpstreamPool]:
    """What opens a pool of ``size`` connections to one address, transport and protocol."""
    u = config.upstream

    def pool(address: str, transport: Transport, protocol: Protocol) -> UpstreamPool:
        host, port = split_address(address)
        return UpstreamPool(
            address,
            host,
            port,
            transport,
            size=size,
            connect_timeout=u.connect_timeout,
            max_message_size=config.max_frame_size,
            timeouts=timeouts,
            loop=loop,
            protocol=protocol,
            tls=tls,
            on_stray=on_stray,
        )

    return pool


def upstreams(
    config: SidecarConfig,
    timeouts: Timeouts,
    loop: asyncio.AbstractEventLoop,
    tls: UpstreamTls | None = None,
    metrics: SidecarMetrics | None = None,
) -> UpstreamSet:
    """The upstream's addresses, with passive ejection; pools are opened on first use."""
    u = config.upstream
    on_stray = None
    if metrics is not None:
        strays = metrics.upstream_stray_replies

        def on_stray(address: str) -> None:
            strays.labels(address).inc()

    pool = pool_maker(config, timeouts, loop, tls, u.pool_size, on_stray)
    tracker = EjectionTracker(
        list(u.addresses),
        consecutive_failures=u.ejection.consecutive_failures,
        base_time=u.ejection.base_time,
        max_time=u.ejection.max_time,
        max_percent=u.ejection.max_percent,
    )
    return UpstreamSet(u.addresses, pool, tracker, loop.time)


def health_settings(config: SidecarConfig, arguments: bytes) -> HealthSettings | None:
    """``health_check`` resolved (``arguments``: the probe's encoded argument struct);
    None while health checks are off."""
    check = config.health_check
    if check is None:
        return None
    u = config.upstream
    return HealthSettings(
        method=check.method,
        arguments=arguments,
        interval=check.interval,
        timeout=check.timeout,
        healthy_threshold=check.healthy_threshold,
        unhealthy_threshold=check.unhealthy_threshold,
        transport=None if u.transport == "same" else Transport(u.transport),
        protocol=None if u.protocol == "same" else Protocol(u.protocol),
    )


def health_checker(
    settings: HealthSettings,
    config: SidecarConfig,
    *,
    upstream_set: UpstreamSet,
    breaker_set: BreakerSet,
    timeouts: Timeouts,
    loop: asyncio.AbstractEventLoop,
    metrics: SidecarMetrics,
    tls: UpstreamTls | None = None,
) -> HealthChecker:
    """The health checker of the upstream, with a pool of one connection per address."""
    probe_pool = pool_maker(config, timeouts, loop, tls, 1)
    return HealthChecker(
        settings,
        upstreams=upstream_set,
        breakers=breaker_set,
        make_pool=probe_pool,
        metrics=metrics,
        loop=loop,
    )


def upstream_tls(config: SidecarConfig, metrics: SidecarMetrics) -> UpstreamTls | None:
    """TLS to the upstream (``upstream.tls``), or None for plaintext."""
    context = upstream_context(config)
    if context is None or config.upstream.tls is None:
        return None
    return UpstreamTls(context, config.upstream.tls, metrics)
