"""Active health checks: the sidecar calls each upstream address itself, on its own connection.

Every ``interval`` (counted from the start of the previous probe, so a slow
probe does not stretch the cadence) each address gets one probe: a CALL of
``health_check.method`` with the arguments encoded once from the config (an
empty struct when none), sent on a connection of the checker's own (a pool of
one per address, kept open between probes as Envoy's checker keeps its
connection; closed after any failure). The probe passes on a REPLY that is a
success (a value or void), as Envoy's Thrift health checker decides; a
declared exception, a TApplicationException (UNKNOWN_METHOD included: the
method is wrong, and the log says so), a timeout after ``timeout`` (connecting
included) or a connection failure fails it. Probes are not client calls: no
policy, retry, budget, breaker admission or request metric sees them; they
are counted in ``health_check_probes_total`` only.

Transport and protocol: the upstream's (``upstream.transport`` and
``upstream.protocol``); where those say ``same``, those of the clients' calls
already forwarded (the first client pool made), and framed binary before any
client call.

What the results do (`sidecar.resilience.health` counts them):

- ``unhealthy_threshold`` failures in a row take an address out of rotation,
  ``healthy_threshold`` passes in a row bring it back; while health checks
  are on, an address passive ejection took out comes back that way too, not
  on the ejection timer (`UpstreamSet.hold_ejections`);
- every result goes to every breaker of the upstream (`Breaker.probe_result`):
  a half-open breaker admits no client call, and passing probes close it once
  its reset timeout has passed.

`HealthChecker.start` begins one task per address; `close` cancels them (a
probe in flight is abandoned and its connection closed) and hands the
rotation and the breakers back to their timers and client probes. A reload
that changes the settings restarts the tasks: the first probe goes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.errors import ProtocolError, UpstreamError
from sidecar.metrics import SidecarMetrics
from sidecar.protocol.appexc import parse_application_exception
from sidecar.protocol.compact import parse_compact_header
from sidecar.protocol.envelope import MessageType, Protocol, encode_header, parse_header
from sidecar.protocol.fields import first_field_id
from sidecar.protocol.framing import Message, Transport
from sidecar.protocol.transcode import transcode_message
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.upstream import ReplyHandler, UpstreamPool
from sidecar.resilience.breakers import BreakerSet
from sidecar.resilience.health import HealthTracker, Verdict
from sidecar.resilience.outcome import Outcome, classify_error, classify_reply

log = logging.getLogger("sidecar.health")

PASS = "pass"

# Makes the checker's own pool (of one connection) for an address, transport and protocol.
ProbePoolFactory = Callable[[str, Transport, Protocol], UpstreamPool]


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """``health_check``, resolved.

    Attributes:
        method: the name sent on the wire.
        arguments: the argument struct in the binary protocol (``b"\\x00"``: none).
        interval: seconds from the start of one probe of an address to the next.
        timeout: seconds allowed for a probe, connecting included.
        healthy_threshold: passes in a row that bring an address back.
        unhealthy_threshold: failures in a row that take it out.
        transport: the upstream's transport; None = as the clients' calls go.
        protocol: the upstream's protocol; None = as the clients' calls go.
    """

    method: str
    arguments: bytes
    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int
    transport: Transport | None = None
    protocol: Protocol | None = None


class _ProbeReply(ReplyHandler):
    """`ReplyHandler` of one probe: its result (label, detail) lands in a future."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[tuple[str, str]]) -> None:
        self.future = future

    def _set(self, label: str, detail: str) -> None:
        if not self.future.done():
            self.future.set_result((label, detail))

    def on_reply(self, reply: Message) -> None:
        header = reply.header
        body = reply.body()
        outcome = classify_reply(header.type, body, header.protocol)
        if outcome is Outcome.OK:
            self._set(PASS, "")
            return
        detail = outcome.value
        with contextlib.suppress(ProtocolError):
            if header.type is MessageType.EXCEPTION:
                exc_type, text = parse_application_exception(body, header.protocol)
                detail = f"TApplicationException type {exc_type}: {text}"
            elif outcome is Outcome.DECLARED_EXCEPTION:
                field = first_field_id(body, header.protocol)
                detail = f"declared exception (result field {field})"
        self._set(outcome.value, detail)

    def on_error(self, error: UpstreamError) -> None:
        self._set(classify_error(error).value, str(error))

    def on_no_reply(self) -> None:  # one call at a time on this connection: cannot happen
        self._set(Outcome.PROTOCOL_ERROR.value, "the probe's reply was passed over")


class HealthChecker:
    """Probes every address of one upstream and applies what the probes say.

    Args:
        settings: what to call, how often, the thresholds.
        upstreams: the addresses; their rotation is changed here.
        breakers: the upstream's breakers; health checks close them.
        make_pool: the checker's own pool (one connection) per address and kind.
        metrics: where probes and verdicts are counted.
        loop: the event loop.
    """

    def __init__(
        self,
        settings: HealthSettings,
        *,
        upstreams: UpstreamSet,
        breakers: BreakerSet,
        make_pool: ProbePoolFactory,
        metrics: SidecarMetrics,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._settings = settings
        self._upstreams = upstreams
        self._breakers = breakers
        self._make_pool = make_pool
        self._metrics = metrics
        self._loop = loop
        self.tracker = HealthTracker(
            upstreams.addresses,
            healthy_threshold=settings.healthy_threshold,
            unhealthy_threshold=settings.unhealthy_threshold,
        )
        self._pools: dict[str, UpstreamPool] = {}
        self._payloads: dict[Protocol, bytes] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._last_probe: dict[str, float] = {}

    @property
    def settings(self) -> HealthSettings:
        return self._settings

    # lifetime

    def start(self) -> None:
        """Take over the rotation's way back and the breakers' half-open state; probe."""
        self._upstreams.hold_ejections(True)
        self._breakers.set_health_checked(True)
        self._metrics.init_health_checks(self._upstreams.addresses)
        self._start_tasks()

    def configure(self, settings: HealthSettings) -> None:
        """New settings (a reload): counts are kept, probing starts again at once."""
        if settings == self._settings:
            return
        self._settings = settings
        self.tracker.healthy_threshold = settings.healthy_threshold
        self.tracker.unhealthy_threshold = settings.unhealthy_threshold
        self._payloads.clear()
        self._cancel_tasks()
        self._start_tasks()

    def close(self) -> list[asyncio.Task[None]]:
        """Stop probing; ejections are timed again and half-open breakers let client
        probes through. Returns the cancelled tasks (await them to see them end)."""
        tasks = self._cancel_tasks()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._upstreams.hold_ejections(False)
        self._breakers.set_health_checked(False)
        self._metrics.drop_health_checks(self._upstreams.addresses)
        return tasks

    def _start_tasks(self) -> None:
        for address in self._upstreams.addresses:
            self._tasks[address] = self._loop.create_task(
                self._run(address), name=f"health check {address}"
            )

    def _cancel_tasks(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        return tasks

    # probing

    async def _run(self, address: str) -> None:
        """Probe ``address`` every interval until cancelled."""
        loop = self._loop
        while True:
            started = loop.time()
            self._last_probe[address] = started
            try:
                label, detail = await self._probe(address)
                self._apply(address, label, detail)
            except Exception:  # a bug: logged, and probing goes on at the next interval
                log.exception("health check of %s failed", address)
            await asyncio.sleep(max(0.0, started + self._settings.interval - loop.time()))

    async def _probe(self, address: str) -> tuple[str, str]:
        """One probe of ``address``: (``pass`` or the failure's outcome, a detail for logs)."""
        settings = self._settings
        loop = self._loop
        transport, protocol = self._kind()
        pool = self._pool(address, transport, protocol)
        expires = loop.time() + settings.timeout
        try:
            conn = await pool.acquire(settings.timeout)
        except UpstreamError as exc:
            return classify_error(exc).value, str(exc)
        if conn.closed:
            return Outcome.CONNECTION_CLOSED.value, f"upstream {address} closed the connection"
        reply = _ProbeReply(loop.create_future())
        conn.send(self._message(protocol), reply, expires, settings.timeout)
        try:
            return await reply.future
        except asyncio.CancelledError:
            conn.abandon(reply)
            raise

    def _kind(self) -> tuple[Transport, Protocol]:
        """The transport and protocol of the probes (see the module docstring)."""
        transport, protocol = self._settings.transport, self._settings.protocol
        if transport is None or protocol is None:
            pools = self._upstreams.pools()
            if pools:
                transport = transport or pools[0].transport_kind
                protocol = protocol or pools[0].protocol
        return transport or Transport.FRAMED, protocol or Protocol.BINARY

    def _pool(self, address: str, transport: Transport, protocol: Protocol) -> UpstreamPool:
        pool = self._pools.get(address)
        if pool is None or pool.transport_kind is not transport or pool.protocol is not protocol:
            if pool is not None:
                pool.close()
            pool = self._pools[address] = self._make_pool(address, transport, protocol)
        return pool

    def _message(self, protocol: Protocol) -> Message:
        """A fresh probe message (its seqid is patched when sent)."""
        payload = self._payloads.get(protocol)
        if payload is None:
            binary = encode_header(self._settings.method, MessageType.CALL, 0)
            binary += self._settings.arguments
            if protocol is Protocol.COMPACT:
                payload = transcode_message(binary, Protocol.BINARY, Protocol.COMPACT)
            else:
                payload = binary
            self._payloads[protocol] = payload
        parse = parse_compact_header if protocol is Protocol.COMPACT else parse_header
        header = parse(payload, 0)
        assert header is not None
        return Message(header, bytearray(payload), 0)

    # what a result does

    def _apply(self, address: str, label: str, detail: str) -> None:
        """Count one result; move the address and the breakers as it says."""
        passed = label == PASS
        self._metrics.health_check_probes.labels(address, label).inc()
        upstreams = self._upstreams
        verdict = self.tracker.record(address, passed, label, upstreams.out_of_rotation(address))
        record = self.tracker.get(address)
        self._metrics.upstream_healthy.labels(address).set(1 if record.healthy else 0)
        if verdict is Verdict.TAKE_OUT:
            upstreams.take_out(address)
            log.warning(
                "upstream address %s failed %d health checks in a row (last: %s); out of "
                "rotation until %d pass in a row",
                address,
                record.failures,
                detail or label,
                self.tracker.healthy_threshold,
                extra={"upstream": address, "result": label},
            )
        elif verdict is Verdict.BRING_BACK:
            upstreams.readmit(address)
        elif not passed:
            log.debug(
                "health check of %s failed: %s",
                address,
                detail or label,
                extra={"upstream": address, "result": label},
            )
        upstream_down = not self.tracker.any_passing()
        for breaker in self._breakers.all():
            breaker.probe_result(passed, upstream_down)

    def describe(self) -> dict[str, Any]:
        """The ``/state`` section: settings and each address's probe record."""
        settings = self._settings
        now = self._loop.time()
        addresses = []
        for address in self.tracker.addresses():
            record = self.tracker.get(address)
            last = self._last_probe.get(address)
            addresses.append(
                {
                    "address": address,
                    "healthy": record.healthy,
                    "in_rotation": not self._upstreams.out_of_rotation(address),
                    "passes_in_a_row": record.passes,
                    "failures_in_a_row": record.failures,
                    "last_result": record.last_result,
                    "last_probe_seconds_ago": None if last is None else round(now - last, 3),
                }
            )
        return {
            "enabled": True,
            "method": settings.method,
            "interval_seconds": settings.interval,
            "timeout_seconds": settings.timeout,
            "healthy_threshold": settings.healthy_threshold,
            "unhealthy_threshold": settings.unhealthy_threshold,
            "addresses": addresses,
        }
