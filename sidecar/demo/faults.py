"""A fault-injecting TCP shim in front of a real Thrift upstream.

`FaultProxy` listens on a port of its own and forwards every call to the real
upstream, one upstream connection per client connection, unless its
`FaultPlan` says otherwise. It decodes only message boundaries (with
`sidecar.protocol.framing`, transport configured, the same on both sides) and
the envelope; payloads pass through as bytes.

What the plan can make it do:

- per accepted connection: ``ok``, or ``refuse``: accept and reset at once
  (SO_LINGER 0). The kernel has completed the handshake by then, so the
  client sees a reset connection, not a refused connect; for that (ECONNREFUSED,
  nothing sent) take the whole proxy down with `FaultProxy.set_down`, which
  closes the listener and resets every open connection.
- per call: ``ok`` (forward, relay the reply), ``reset_before`` (reset the
  client connection without forwarding: the upstream never executes the call),
  ``reset_after`` (forward, wait for the upstream's reply, then reset instead
  of relaying it: executed, reply lost), ``delay`` (wait, then forward and
  relay, even when the client has gone meanwhile: a slow upstream executes
  late calls too), ``internal_error`` (answer ``TApplicationException
  (INTERNAL_ERROR)`` with the call's seqid without forwarding), ``garbage``
  (answer random bytes without forwarding; they begin with ``0xFF`` so that
  no reader can take them for a frame length or an envelope and wait for
  more). The connection stays open after ``internal_error`` and ``garbage``:
  it is the client's job to stop using it.
- ``oneway`` calls are forwarded without waiting for anything; ``internal_error``
  drops them (there is nothing to answer).

Choosing: a plan holds deterministic schedules (a list of call steps, a list
of connection actions), consumed first, then per-action rates drawn from a
seeded ``random.Random``, so a run is reproducible. Plans may be changed
while the proxy runs, from any thread.

Counting: `FaultProxy.stats` (connections, refused, calls seen per action and
per method name, calls forwarded, late replies). How often the upstream
executed a call is the upstream's business (tests read the server's counters).

Limits: one call in flight per client connection (a pipelining client is
served in order, one call after the other); framed and buffered transports,
binary protocol only; not built for throughput.

`FaultProxyThread` (or `start_in_thread`) runs a proxy on its own event loop
in a background thread, for tests and tools that are not asyncio code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import threading
from collections.abc import Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from sidecar.config import split_address
from sidecar.errors import RemoteProtocolError
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    BufferedDecoder,
    FramedDecoder,
    Message,
    Transport,
    frame,
    make_decoder,
)

log = logging.getLogger("sidecar.demo.faults")

T = TypeVar("T")

_READ_BYTES = 256 * 1024
# SO_LINGER on, timeout 0: close() sends RST at once instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)
# Method names counted separately in the stats; later names are counted as "other".
_MAX_NAMES = 1000


class Action(StrEnum):
    """What the proxy does with one connection or one call."""

    OK = "ok"
    REFUSE = "refuse"
    RESET_BEFORE = "reset_before"
    RESET_AFTER = "reset_after"
    DELAY = "delay"
    INTERNAL_ERROR = "internal_error"
    GARBAGE = "garbage"


# Actions that apply per connection and per call.
CONNECTION_ACTIONS = frozenset({Action.OK, Action.REFUSE})
CALL_ACTIONS = frozenset(Action) - {Action.REFUSE}
# The order in which call rates are laid out on [0, 1): fixed, so a seed replays.
_CALL_ORDER = tuple(a for a in Action if a in CALL_ACTIONS and a is not Action.OK)

# A schedule step: an action, or ("delay", seconds) for a delay of its own length.
Step = Action | str | tuple[Action | str, float]


@dataclass(frozen=True, slots=True)
class Fault:
    """One call's fate: an action, and for ``delay`` how many seconds."""

    action: Action
    delay: float = 0.0


class FaultPlan:
    """Which action each connection and call gets; thread-safe, changeable at run time.

    Args:
        rates: probability per action, e.g. ``{"reset_after": 0.15}``. The
            ``refuse`` rate applies to each new connection; the others to each
            call, and together they must not exceed 1 (the rest is ``ok``).
        schedule: call steps consumed in order, one per call, before the rates
            apply: actions, or ``("delay", seconds)``.
        connect_schedule: connection actions (``ok``/``refuse``) consumed in
            order, one per accepted connection, before the ``refuse`` rate applies.
        delay: seconds a ``delay`` waits unless its step says otherwise.
        seed: seed of the random source of the rates and of the garbage bytes.
    """

    def __init__(
        self,
        rates: Mapping[Action | str, float] | None = None,
        *,
        schedule: Iterable[Step] = (),
        connect_schedule: Iterable[Action | str] = (),
        delay: float = 1.0,
        seed: int | None = 0,
    ) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rates: dict[Action, float] = {}
        self._refuse_rate = 0.0
        self._schedule: list[Fault] = []
        self._connect_schedule: list[Action] = []
        self._delay = 0.0
        self.set_delay(delay)
        self.set_rates(rates or {})
        self.extend_schedule(schedule)
        self.extend_connect_schedule(connect_schedule)

    # changing the plan

    def set_rates(self, rates: Mapping[Action | str, float] | None = None, **more: float) -> None:
        """Replace every rate (actions not named get 0).

        Raises:
            ValueError: a rate outside [0, 1], call rates that add up to more than 1.
        """
        merged: dict[Action, float] = {}
        for key, value in {**(rates or {}), **more}.items():
            action = Action(key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"rate of {action} must be between 0 and 1, not {value}")
            merged[action] = float(value)
        refuse = merged.pop(Action.REFUSE, 0.0)
        merged.pop(Action.OK, None)
        if sum(merged.values()) > 1.0 + 1e-9:
            raise ValueError(f"call rates add up to more than 1: {merged}")
        with self._lock:
            self._rates = merged
            self._refuse_rate = refuse

    def extend_schedule(self, steps: Iterable[Step]) -> None:
        """Append call steps to the schedule."""
        faults = [self._fault(step) for step in steps]
        with self._lock:
            self._schedule.extend(faults)

    def set_schedule(self, steps: Iterable[Step]) -> None:
        """Replace the call schedule."""
        faults = [self._fault(step) for step in steps]
        with self._lock:
            self._schedule = faults

    def extend_connect_schedule(self, actions: Iterable[Action | str]) -> None:
        """Append connection actions (``ok`` or ``refuse``)."""
        parsed = [Action(a) for a in actions]
        for action in parsed:
            if action not in CONNECTION_ACTIONS:
                raise ValueError(f"{action} is not a connection action (ok, refuse)")
        with self._lock:
            self._connect_schedule.extend(parsed)

    def set_delay(self, seconds: float) -> None:
        """Seconds a ``delay`` step without a length of its own waits."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        with self._lock:
            self._delay = float(seconds)

    def clear(self) -> None:
        """Every rate to 0 and both schedules emptied: everything is ``ok`` from now."""
        with self._lock:
            self._rates = {}
            self._refuse_rate = 0.0
            self._schedule = []
            self._connect_schedule = []

    @property
    def pending(self) -> int:
        """Call steps left in the schedule."""
        with self._lock:
            return len(self._schedule)

    # drawing

    def next_call(self) -> Fault:
        """The fault for the next call: the schedule's next step, else a draw."""
        with self._lock:
            if self._schedule:
                fault = self._schedule.pop(0)
                if fault.action is Action.DELAY and fault.delay < 0:
                    return Fault(Action.DELAY, self._delay)
                return fault
            if not self._rates:
                return Fault(Action.OK)
            draw = self._rng.random()
            for action in _CALL_ORDER:
                rate = self._rates.get(action, 0.0)
                if draw < rate:
                    return Fault(action, self._delay if action is Action.DELAY else 0.0)
                draw -= rate
            return Fault(Action.OK)

    def next_connection(self) -> Action:
        """The action for the next accepted connection."""
        with self._lock:
            if self._connect_schedule:
                return self._connect_schedule.pop(0)
            if self._refuse_rate and self._rng.random() < self._refuse_rate:
                return Action.REFUSE
            return Action.OK

    def garbage(self) -> bytes:
        """16 to 64 random bytes that begin with ``0xFF`` (see the module docstring)."""
        with self._lock:
            n = self._rng.randint(15, 63)
            return b"\xff" + self._rng.randbytes(n)

    @staticmethod
    def _fault(step: Step) -> Fault:
        if isinstance(step, tuple):
            action, seconds = Action(step[0]), float(step[1])
            if action is not Action.DELAY or seconds < 0:
                raise ValueError(f"only delay steps take a length, as (delay, seconds): {step}")
            return Fault(action, seconds)
        action = Action(step)
        if action not in CALL_ACTIONS:
            raise ValueError(f"{action} is not a call action (refuse is per connection)")
        # -1: "the plan's delay at the time the step is used".
        return Fault(action, -1.0 if action is Action.DELAY else 0.0)


@dataclass(frozen=True, slots=True)
class FaultStats:
    """A snapshot of what a proxy has seen and done.

    Attributes:
        connections: client connections accepted (refused ones included).
        refused: connections reset at once by a ``refuse`` action.
        calls: call messages received (CALL and ONEWAY).
        actions: calls per action taken.
        by_method: calls per envelope name.
        forwarded: calls written to the upstream.
        late_replies: replies from the upstream that came after the client had
            closed its side (written anyway if the socket was still open).
        upstream_failures: calls that could not be forwarded (upstream
            unreachable or gone); the client connection was reset.
    """

    connections: int = 0
    refused: int = 0
    calls: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    late_replies: int = 0
    upstream_failures: int = 0

    def action(self, action: Action | str) -> int:
        """Calls that got ``action``."""
        return self.actions.get(str(Action(action)), 0)


class _Counters:
    """What `FaultStats` snapshots; written on the proxy's loop, read from anywhere."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}
        self._actions: dict[str, int] = {}
        self._names: dict[str, int] = {}

    def add(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def call(self, name: str, action: Action) -> None:
        with self._lock:
            self._values["calls"] = self._values.get("calls", 0) + 1
            self._actions[action.value] = self._actions.get(action.value, 0) + 1
            if name not in self._names and len(self._names) >= _MAX_NAMES:
                name = "other"
            self._names[name] = self._names.get(name, 0) + 1

    def snapshot(self) -> FaultStats:
        with self._lock:
            v = self._values
            return FaultStats(
                connections=v.get("connections", 0),
                refused=v.get("refused", 0),
                calls=v.get("calls", 0),
                actions=dict(self._actions),
                by_method=dict(self._names),
                forwarded=v.get("forwarded", 0),
                late_replies=v.get("late_replies", 0),
                upstream_failures=v.get("upstream_failures", 0),
            )


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


class _UpstreamLink:
    """One connection to the real upstream, one call at a time."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, proxy: FaultProxy
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder: FramedDecoder | BufferedDecoder = make_decoder(
            proxy.transport, proxy.max_message_size
        )
        self._transport = proxy.transport

    async def exchange(self, message: Message, oneway: bool) -> Message | None:
        """Send one call; return its reply (None for oneway).

        Raises:
            ConnectionError: the upstream closed the connection.
            RemoteProtocolError: the upstream sent something unreadable.
        """
        self._writer.write(message.to_wire(self._transport))
        await self._writer.drain()
        if oneway:
            return None
        while True:
            data = await self._reader.read(_READ_BYTES)
            if not data:
                raise ConnectionError("the upstream closed the connection")
            replies = self._decoder.receive_data(data)
            if replies:
                return replies[0]

    def close(self) -> None:
        self._writer.transport.abort()


class _Session:
    """One client connection: read calls, apply the plan to each, in order."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._proxy = proxy
        self._reader = reader
        self._writer = writer
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._upstream: _UpstreamLink | None = None
        self._client_gone = False
        self._reset_done = False

    async def run(self) -> None:
        pump = asyncio.get_running_loop().create_task(self._pump())
        try:
            while True:
                message = await self._queue.get()
                if message is None or not await self._handle(message):
                    break
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            if self._upstream is not None:
                self._upstream.close()
            if not self._reset_done:
                self._writer.transport.abort()

    async def _pump(self) -> None:
        """Read the client's bytes into calls until EOF or a decoding error."""
        decoder = make_decoder(self._proxy.transport, self._proxy.max_message_size)
        try:
            while True:
                data = await self._reader.read(_READ_BYTES)
                if not data:
                    break
                for message in decoder.receive_data(data):
                    self._queue.put_nowait(message)
        except (ConnectionError, RemoteProtocolError) as exc:
            log.debug("fault proxy: client connection ends: %s", exc)
        finally:
            self._client_gone = True
            self._queue.put_nowait(None)

    async def _handle(self, message: Message) -> bool:
        """Apply the plan to one call; False ends the connection."""
        proxy = self._proxy
        header = message.header
        fault = proxy.plan.next_call()
        proxy._counters.call(header.name, fault.action)
        oneway = header.type == MessageType.ONEWAY
        action = fault.action
        if action is Action.OK:
            return await self._forward(message, oneway, relay=True)
        if action is Action.DELAY:
            await asyncio.sleep(fault.delay)
            return await self._forward(message, oneway, relay=True)
        if action is Action.RESET_BEFORE:
            self._reset()
            return False
        if action is Action.RESET_AFTER:
            if await self._forward(message, oneway, relay=False):
                self._reset()
            return False
        if action is Action.INTERNAL_ERROR:
            if not oneway:
                reply = encode_application_exception(
                    header.method,
                    header.seqid,
                    ApplicationExceptionType.INTERNAL_ERROR,
                    "fault injected: internal_error",
                    header.strict,
                )
                await self._write(frame(reply, proxy.transport))
            return True
        assert action is Action.GARBAGE
        await self._write(proxy.plan.garbage())
        return True

    async def _forward(self, message: Message, oneway: bool, *, relay: bool) -> bool:
        """Send the call upstream and, when ``relay``, its reply back; False on failure."""
        proxy = self._proxy
        try:
            if self._upstream is None:
                self._upstream = await proxy._connect_upstream()
            reply = await self._upstream.exchange(message, oneway)
        except (OSError, RemoteProtocolError, TimeoutError) as exc:
            log.info("fault proxy: upstream %s failed: %s", proxy.upstream, exc)
            proxy._counters.add("upstream_failures")
            self._reset()
            return False
        proxy._counters.add("forwarded")
        if reply is not None and relay:
            if self._client_gone:
                proxy._counters.add("late_replies")
            await self._write(reply.to_wire(proxy.transport))
        return True

    async def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._writer.transport.is_closing():
            return
        self._writer.write(data)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def _reset(self) -> None:
        self._reset_done = True
        _reset(self._writer)


class FaultProxy:
    """The shim; runs on the event loop that calls `start`.

    Args:
        upstream: ``host:port`` of the real upstream.
        transport: how messages are delimited (the same on both sides).
        plan: what to do; a plan that does nothing (all ``ok``) by default.
        host: where to listen.
        port: 0 for any free port.
        max_message_size: largest message read from either side.
        connect_timeout: seconds to wait for a connection to the upstream.
    """

    def __init__(
        self,
        upstream: str,
        transport: Transport | str = Transport.FRAMED,
        plan: FaultPlan | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 2.0,
    ) -> None:
        self.upstream = upstream
        self._upstream_host, self._upstream_port = split_address(upstream)
        self.transport = Transport(transport)
        self.plan = plan or FaultPlan()
        self.host = host
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self._port = port
        self._server: asyncio.Server | None = None
        self._sessions: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._handlers: set[asyncio.Task[Any]] = set()
        self._counters = _Counters()
        self._down = False
        self._started = False

    @property
    def port(self) -> int:
        """The port listened on (kept while down)."""
        if not self._started:
            raise RuntimeError("fault proxy not started")
        return self._port

    @property
    def address(self) -> str:
        """``"host:port"`` to give clients."""
        return f"{self.host}:{self.port}"

    @property
    def down(self) -> bool:
        """True while the listener is closed (connects are refused)."""
        return self._down

    @property
    def stats(self) -> FaultStats:
        """What the proxy has seen and done so far."""
        return self._counters.snapshot()

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self._sessions)

    async def start(self) -> FaultProxy:
        """Listen; returns self."""
        if self._started:
            raise RuntimeError("fault proxy already started")
        await self._listen()
        self._started = True
        return self

    async def stop(self) -> None:
        """Stop listening and reset every connection; safe to call twice."""
        await self._close_listener()
        await self.drop_connections()

    async def set_down(self, down: bool) -> None:
        """Go down (listener closed, open connections reset) or come back on the same port."""
        if down == self._down:
            return
        if down:
            self._down = True
            await self._close_listener()
            await self.drop_connections()
        else:
            await self._listen()
            self._down = False

    async def drop_connections(self) -> int:
        """Reset every open client connection (and its upstream link); returns how many."""
        sessions = list(self._sessions.items())
        handlers = list(self._handlers)
        for task, writer in sessions:
            _reset(writer)
            task.cancel()
        if sessions:
            await asyncio.wait([task for task, _ in sessions])
        if handlers:
            await asyncio.wait(handlers)
        return len(sessions)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, reuse_address=True, backlog=512
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _connect_upstream(self) -> _UpstreamLink:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(self._upstream_host, self._upstream_port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _UpstreamLink(reader, writer, self)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle one accepted connection.

        The session runs in a task of its own, which `drop_connections`
        cancels; this handler task is never cancelled by us (asyncio's stream
        server reads its result and logs a cancelled one as an error).
        """
        handler = asyncio.current_task()
        assert handler is not None
        self._counters.add("connections")
        if self._down:  # accepted just before the listener closed
            _reset(writer)
            return
        if self.plan.next_connection() is Action.REFUSE:
            self._counters.add("refused")
            _reset(writer)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = asyncio.get_running_loop().create_task(_Session(self, reader, writer).run())
        self._sessions[session] = writer
        self._handlers.add(handler)
        try:
            await asyncio.wait([session])
        finally:
            self._sessions.pop(session, None)
            self._handlers.discard(handler)
        if not session.cancelled() and session.exception() is not None:
            log.error("fault proxy: connection handler failed", exc_info=session.exception())
            _reset(writer)


class FaultProxyThread:
    """A `FaultProxy` on its own event loop in a daemon thread.

    Use as a context manager, or `start()` / `stop()`. Arguments: as `FaultProxy`.
    """

    def __init__(
        self,
        upstream: str,
        transport: Transport | str = Transport.FRAMED,
        plan: FaultPlan | None = None,
        **kwargs: Any,
    ) -> None:
        self.proxy = FaultProxy(upstream, transport, plan, **kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fault-proxy", daemon=True
        )

    @property
    def plan(self) -> FaultPlan:
        return self.proxy.plan

    @property
    def address(self) -> str:
        return self.proxy.address

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def stats(self) -> FaultStats:
        return self.proxy.stats

    def start(self) -> FaultProxyThread:
        """Start the loop thread and listen; returns self."""
        self._thread.start()
        self._run(self.proxy.start())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the proxy, then its loop and thread; safe to call twice."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self.proxy.stop(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()

    def set_down(self, down: bool) -> None:
        """See `FaultProxy.set_down`; returns once done."""
        self._run(self.proxy.set_down(down))

    def drop_connections(self) -> int:
        """See `FaultProxy.drop_connections`."""
        return self._run(self.proxy.drop_connections())

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> FaultProxyThread:
        if not self._thread.is_alive():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_in_thread(
    upstream: str,
    transport: Transport | str = Transport.FRAMED,
    plan: FaultPlan | None = None,
    **kwargs: Any,
) -> FaultProxyThread:
    """A started `FaultProxyThread` (stop it, or use it as a context manager)."""
    return FaultProxyThread(upstream, transport, plan, **kwargs).start()
