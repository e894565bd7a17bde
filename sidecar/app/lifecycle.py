"""One running sidecar: start, stop, and `serve` until a signal says otherwise.

`Sidecar` owns the parts and their lifetimes; it builds them with
`sidecar.app.build` in `start` (the constructor does no I/O), answers
``/state`` through `sidecar.app.state`, and applies reloads through
`sidecar.app.reload`. A start that fails half-way (the admin port is taken)
closes what it had opened, the Thrift listener included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from sidecar import __version__
from sidecar.admin import AdminServer, ControlServer, Readiness
from sidecar.app import build, limits, upstreams
from sidecar.app.build import Parts
from sidecar.app.gauges import Gauges, transition_listener
from sidecar.app.memory import return_large_blocks
from sidecar.app.reload import Reloader, Reloads, apply
from sidecar.app.state import state_document
from sidecar.app.worker import WorkerRole
from sidecar.config import SidecarConfig, require_upstream, split_address
from sidecar.fallback.static import EMPTY_ARGUMENTS, ArgumentTypes, ExceptionIds, StaticReply
from sidecar.fallback.store import FallbackStore
from sidecar.fleet import Fleet, make_fleet
from sidecar.metrics import MethodLabels, SidecarMetrics
from sidecar.metrics.labels import LocalGrants
from sidecar.proxy.context import CallContext
from sidecar.proxy.oneway import OnewayMethods
from sidecar.proxy.server import Server
from sidecar.proxy.timeouts import Timeouts
from sidecar.resilience.breakers import BreakerSet
from sidecar.workers.breaker_table import BreakerTable
from sidecar.workers.label_table import LabelTable

log = logging.getLogger("sidecar")

# Seconds between housekeeping rounds: idle connections, gauges.
HOUSEKEEPING_INTERVAL = 1.0


class Sidecar:
    """One sidecar: Thrift listener, calls, upstream pools, admin endpoint.

    Args:
        config: validated configuration (at least one upstream address).
        static_replies: static fallback replies by method name (from the IDL).
        known_methods: method names that always get their own metrics label.
        oneway_methods: the IDL's oneway methods (bare and ``Service:method``).
        exception_ids: the declared exceptions the config names, as field ids (from the IDL).
        health_arguments: the health check probe's argument struct, encoded (from the
            IDL); None: no arguments.
        argument_types: each method's declared argument types (from the IDL), by
            wire name.
        metrics: the metrics to count into (a fresh registry by default).
        worker: this process's role when it is one of ``workers: N``
            (`sidecar.app.supervisor` starts it); None for a sidecar of one process.

    Raises:
        ConfigError: no upstream address.
    """

    def __init__(
        self,
        config: SidecarConfig,
        *,
        static_replies: dict[str, StaticReply] | None = None,
        known_methods: list[str] | None = None,
        oneway_methods: list[str] | None = None,
        exception_ids: ExceptionIds | None = None,
        health_arguments: bytes | None = None,
        argument_types: dict[str, ArgumentTypes] | None = None,
        metrics: SidecarMetrics | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        require_upstream(config)
        self.worker = worker
        self.health_arguments = health_arguments or EMPTY_ARGUMENTS
        self.oneway_methods = frozenset(oneway_methods or ())
        self.exception_ids = exception_ids or ExceptionIds({}, {})
        self.argument_types = argument_types or {}
        self.config = config
        self.config_version = 1
        self.metrics = metrics or SidecarMetrics()
        self.static_replies = static_replies or {}
        known = sorted(set(config.methods) | set(known_methods or []))
        self.service_of = build.services_by_method(known)
        self.labels = MethodLabels(known, config.metrics.max_method_labels, self.service_of)
        self.upstream_name = build.upstream_name(config)
        self.gauges = Gauges(self.metrics, self.labels)
        self.ready = False
        self.started_at = time.time()
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.control_address: tuple[str, int] | None = None
        self.readiness = Readiness()  # failed on purpose through the control listener
        self.pending_restart: tuple[str, ...] = ()
        self.last_reload_error: str | None = None
        self.parts: Parts | None = None

    @property
    def worker_count(self) -> int:
        """Processes sharing this sidecar's port and state (1 without workers)."""
        return self.worker.count if self.worker is not None else 1

    @property
    def worker_slot(self) -> tuple[int, int]:
        """(this worker's index, how many workers); (0, 1) without workers."""
        return (self.worker.index, self.worker.count) if self.worker is not None else (0, 1)

    # the running parts

    def _running(self) -> Parts:
        if self.parts is None:
            raise RuntimeError("the sidecar is not running")
        return self.parts

    @property
    def context(self) -> CallContext:
        """The context new calls start with."""
        return self._running().server.context

    @property
    def server(self) -> Server:
        return self._running().server

    @property
    def breakers(self) -> BreakerSet:
        return self._running().breakers

    @property
    def store(self) -> FallbackStore:
        return self._running().store

    @property
    def fleet(self) -> Fleet | None:
        return self._running().fleet

    # lifecycle

    async def start(self) -> None:
        """Build the parts, then listen on the Thrift and admin ports.

        Raises:
            ConfigError: the fallback store cannot be used.
            OSError: a port cannot be bound; nothing is left listening.
        """
        loop = asyncio.get_running_loop()
        config = self.config
        fleet = make_fleet(config, self.metrics)  # None in local mode
        worker = self.worker
        table = None
        if worker is not None and worker.shared_breakers:
            table = BreakerTable.open(worker.breaker_table)
        label_table = None
        if worker is not None:  # one method, one label value in every worker
            label_table = LabelTable.open(worker.label_table)
            self.labels.use(label_table)
        if worker is not None and worker.shared_store:
            shared = build.worker_store(config, worker.store_socket)
            await shared.start()  # connects to the supervisor's store (never raises)
            store: FallbackStore = shared
        else:
            store = build.make_store(config, fleet)
        timeouts = Timeouts(loop)
        on_transition = transition_listener(self.metrics, lambda: self.config.breaker.reset_timeout)
        breakers = build.breakers(config, self.metrics, fleet, on_transition, table)
        client_tls = build.client_tls(config, self.metrics, loop)
        upstream_tls = upstreams.upstream_tls(config, self.metrics)
        oneway = OnewayMethods()
        context = build.call_context(
            config,
            loop=loop,
            upstream_set=upstreams.upstreams(config, timeouts, loop, upstream_tls, self.metrics),
            breaker_set=breakers,
            retry_budget=limits.budget(config, self.worker_count),
            store=store,
            metrics=self.metrics,
            labels=self.labels,
            static_replies=self.static_replies,
            service_of=self.service_of,
            oneway_methods=self.oneway_methods,
            exception_ids=self.exception_ids,
            argument_types=self.argument_types,
            learned_oneway=oneway,
            worker=self.worker_slot,
        )
        server = Server(context, build.server_settings(config), self.metrics, loop, tls=client_tls)
        self.parts = parts = Parts(
            fleet,
            store,
            timeouts,
            breakers,
            server,
            oneway,
            breaker_table=table,
            label_table=label_table,
            client_tls=client_tls,
            upstream_tls=upstream_tls,
        )
        try:
            if fleet is not None:  # the fleet's breaker state, read before the first call
                await fleet.start()
            self.listen_address = await _bound(
                "Thrift clients",
                "listen",
                config.listen,
                server.listen(
                    *split_address(config.listen),
                    upstream_fds=config.upstream.pool_size * len(config.upstream.addresses),
                    reuse_port=worker is not None,
                ),
            )
            if config.metrics.listen is not None:
                admin = AdminServer(
                    self.metrics.registry,
                    lambda: self.why_not_ready() is None,
                    lambda: state_document(self),
                    self.refresh_gauges,
                    why_not_ready=lambda: self.why_not_ready() or "",
                )
                self.admin_address = await _bound(
                    "the admin endpoint",
                    "metrics.listen",
                    config.metrics.listen,
                    admin.listen(*split_address(config.metrics.listen)),
                )
                parts.admin = admin
            if config.control.listen is not None:
                control = ControlServer(self.metrics, lambda: self.breakers.all(), self.readiness)
                parts.control = control
                self.control_address = await _bound(
                    "the control endpoint",
                    "control.listen",
                    config.control.listen,
                    control.listen(*split_address(config.control.listen)),
                )
        except BaseException:
            await self._close(parts)
            self.parts = None
            raise
        parts.housekeeping = loop.create_task(self._housekeep())
        health = upstreams.health_settings(config, self.health_arguments)
        if health is not None:
            parts.health = upstreams.health_checker(
                health,
                config,
                upstream_set=context.upstreams,
                breaker_set=breakers,
                timeouts=timeouts,
                loop=loop,
                metrics=self.metrics,
                tls=upstream_tls,
            )
            parts.health.start()
        self.gauges.init_series(config, context)
        self.ready = True
        if worker is not None:
            worker.report(self.admin_address, self.control_address)
        log.info(
            "thrift-sidecar %s listening on %s:%d (transport %s), upstream %s (transport %s)%s%s",
            __version__,
            *self.listen_address,
            config.transport,
            self.upstream_name,
            config.upstream.transport,
            f", admin on http://{self.admin_address[0]}:{self.admin_address[1]}"
            if self.admin_address
            else "",
            f", control on http://{self.control_address[0]}:{self.control_address[1]}"
            if self.control_address
            else "",
        )

    async def stop(self, drain_timeout: float | None = None) -> bool:
        """Stop accepting, drain calls in flight, close everything.

        Returns:
            True when every call in flight finished within the drain timeout.
        """
        self.ready = False
        parts = self.parts
        if parts is None:
            return True
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        log.info("draining: no new connections, waiting up to %gs for calls in flight", timeout)
        finished = await parts.server.drain(timeout)
        if not finished:
            log.warning("drain timeout passed; closed connections with calls still in flight")
        await self._close(parts)
        log.info("stopped")
        return finished

    async def _close(self, parts: Parts) -> None:
        """Close every part, whatever state the start left it in."""
        if parts.housekeeping is not None:
            parts.housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await parts.housekeeping
        if parts.health is not None:
            await asyncio.gather(*parts.health.close(), return_exceptions=True)
            parts.health = None
        await parts.server.close_listener()
        parts.server.context.upstreams.close()
        parts.timeouts.close()
        if parts.admin is not None:
            await parts.admin.close()
        if parts.control is not None:
            await parts.control.close()
        await parts.store.close()
        if parts.fleet is not None:
            await parts.fleet.stop()
        if parts.breaker_table is not None:
            parts.breaker_table.close()
        if parts.label_table is not None:
            self.labels.use(LocalGrants(self.labels.limit))
            parts.label_table.close()

    async def _housekeep(self) -> None:
        lag = self.metrics.event_loop_lag
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            lag.set(max(0.0, time.perf_counter() - asked - HOUSEKEEPING_INTERVAL))
            try:
                parts = self._running()
                parts.server.sweep()
                for pool in parts.server.context.upstreams.pools():
                    pool.close_idle(self.config.upstream.idle_timeout)
                self.refresh_gauges()
            except Exception:
                log.exception("housekeeping failed")

    def why_not_ready(self) -> str | None:
        """None when ``/readyz`` answers 200, else why not (`sidecar.admin.readiness`)."""
        parts = self.parts
        config = self.config
        return self.readiness.problem(
            serving=self.ready and parts is not None,
            require_upstream=config.readiness.require_upstream,
            breakers=parts.breakers.all() if parts is not None else (),
            serve_on=config.fallback.serve_on,
            static_methods=list(self.static_replies),
            cached_replies=parts.store.stats().entries if parts is not None else 0,
        )

    def use_context(self, context: CallContext) -> None:
        """Calls that start from now on use ``context`` (a reload)."""
        self._running().server.use_context(context)

    def refresh_gauges(self) -> None:
        """Update the gauges read off the parts (every second, and before each scrape)."""
        parts = self.parts
        if parts is not None:
            self.gauges.refresh(self.config, parts.server.context, parts.store, parts.fleet)

    def reload(
        self,
        new: SidecarConfig,
        static_replies: dict[str, StaticReply] | None = None,
        exception_ids: ExceptionIds | None = None,
        health_arguments: bytes | None = None,
        argument_types: dict[str, ArgumentTypes] | None = None,
    ) -> list[str]:
        """Apply a new config without closing any connection; see `sidecar.app.reload`.

        Returns:
            The keys whose change needs a restart (not applied).
        """
        return apply(self, new, static_replies, exception_ids, health_arguments, argument_types)


async def _bound(
    what: str, key: str, address: str, listening: Coroutine[Any, Any, tuple[str, int]]
) -> tuple[str, int]:
    """Await a listener; a failure says which listener, key and address it was."""
    try:
        return await listening
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(
            exc.errno, f"cannot listen for {what} on {address} ({key}): {reason}"
        ) from exc


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


async def serve(sidecar: Sidecar, reload_config: Reloader | None = None) -> bool:
    """Run until SIGTERM or SIGINT; reload on SIGHUP. Returns whether the drain was clean.

    - SIGTERM/SIGINT: `Sidecar.stop`: stop accepting (the listener closes, so
      new connections are refused; ``/readyz`` answers 503), close idle
      client connections, let calls in flight finish for up to
      ``drain_timeout``, then cut what is left. A second signal is logged and
      changes nothing.
    - SIGHUP: `sidecar.app.reload.Reloads`: the file is read off the loop, then
      applied; no connection is closed.

    Args:
        sidecar: the sidecar to run (not started yet).
        reload_config: loads and checks the config again, returning it and
            the IDL's parts (``static_replies``); raises ConfigError.
    """
    return_large_blocks()  # the process's: large message buffers go back when freed
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads = Reloads(sidecar, reload_config)

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
        reloads.request()

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
        await reloads.close()
        return await sidecar.stop()
