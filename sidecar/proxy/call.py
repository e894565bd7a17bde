"""One client call through the sidecar, as a small state machine driven by callbacks.

    start: policy for the method name; a concurrency slot free?
        no  -> shed: fallback or TApplicationException (no breaker, budget, attempt)
        breaker admits the call?
        no  -> fallback or TApplicationException
    attempt: an address (not tried yet where possible), an idle connection
        (or a task that opens or waits for one), send with a per-try timeout
    after the attempt: classify; record in the address's ejection tracker
        an answer (ok, declared or application exception)
            -> record success in the breaker, finish with it, then remember it
        else `RetryPolicy.decide` (one pure function: probe, circuit opened
             meanwhile, retry_on, attempts, safe to repeat, deadline, budget)
            retry   -> take a budget token, timer (full jitter), attempt again
            give up -> record the failure in the breaker; a fallback, the
                       upstream's own error reply, or TApplicationException
                       (INTERNAL_ERROR) saying what happened
    finish: give back the slot, count, hand the bytes (None for oneway) to the connection

Hedging (idempotent two-way methods with a `HedgePlan`; docs/hedging.md) is
the job of the call's `Hedger` (`sidecar.proxy.hedger`), made at admission
for such a call only: when an attempt is sent (not a half-open probe), it
arms a timer for the hedge delay; if that fires with no answer yet and the
hedge budget has a token, a copy of the message goes out on another
connection as a `HedgeAttempt`, up to ``max_extra`` at once. The call keeps
its decisions: the first answer wins and is delivered once, and the hedger
hands the attempts still in flight over as losers (`sidecar.proxy.hedge`):
their replies are read and dropped before their connections go back to the
pool. A failed attempt while another is in flight only waits; when the last
one fails, the retry decision is made as for a single attempt. Every attempt
is recorded for ejection and ``upstream_attempts_total``; the breaker still
sees one outcome.

The common path, an idle upstream connection and an answer, runs entirely in
the event loop's I/O callbacks, with no task, future or extra loop iteration
(a coroutine per call cost about 4 µs more, measured with bench/). Tasks are
used where waiting is unavoidable and rare: opening a connection, waiting for
a free one, and a fallback lookup in a store that does I/O.

Entry points (`ENTRY_POINTS`): `start`, `on_reply`, `on_error`,
`on_no_reply`, the callbacks of a task or timer (`_acquired`, `_retry_due`,
`_fallback_found`), and a hedged call's (`hedge_due`, `hedge_connected`,
`on_hedge_reply`, `on_hedge_error`). Each runs its body inside ``try: ...
except Exception: self._crashed()`` (docs/architecture.md, "Guards"): a bug
anywhere below one of them answers this call with INTERNAL_ERROR and
touches nothing else. `cancel` only releases what the call holds.

The breaker sees one outcome per call, the final one (docs/architecture.md
explains why); a half-open probe is a single attempt. Cancellation (the
drain timeout passed): the upstream connection in use is closed, a pending
task or timer is cancelled, a half-open probe slot is freed, and the breaker
records nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Final

from mypy_extensions import mypyc_attr

from sidecar.errors import ProtocolError, UpstreamClosed, UpstreamError
from sidecar.fallback.service import BREAKER_OPEN, RETRIES_EXHAUSTED, SHED, Served
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.envelope import MessageType, shown_name
from sidecar.protocol.envelope import Protocol as WireProtocol
from sidecar.protocol.fields import TYPE_NAMES, first_field_id, mistyped_field
from sidecar.protocol.framing import Message, Transport, frame_reply
from sidecar.protocol.validate import check_body
from sidecar.proxy.context import CallContext
from sidecar.proxy.hedge import HedgeAttempt
from sidecar.proxy.hedger import Hedger
from sidecar.proxy.oneway_probe import OnewayProbe
from sidecar.proxy.policy import MethodPolicy
from sidecar.proxy.translate import (
    client_timeout,
    for_client,
    for_upstream,
    set_theader_headers,
)
from sidecar.proxy.upstream import ReplyHandler, UpstreamConnection
from sidecar.resilience.breaker import STATE_OPEN, Admission
from sidecar.resilience.limits import ConcurrencyLimit
from sidecar.resilience.outcome import Outcome, classify_error, classify_reply
from sidecar.resilience.retry import BUDGET, GiveUp, Retry

# Bound once: a name imported from an interpreted module is looked up by name
# on every use in the compiled build, a Final one read from a C static.
perf_counter: Final = time.perf_counter

log: Final = logging.getLogger("sidecar.pipeline")
access_log: Final = logging.getLogger("sidecar.access")

Wire = bytes | bytearray | memoryview
Done = Callable[[Wire | None], None]

_CALL: Final = MessageType.CALL
_ONEWAY: Final = MessageType.ONEWAY
_BINARY: Final = WireProtocol.BINARY
_THEADER: Final = Transport.THEADER

_DECLARED: Final = Outcome.DECLARED_EXCEPTION
_OK: Final = Outcome.OK
# Outcomes that are answers from the upstream: returned as they are, never retried.
ANSWERS: Final = frozenset({Outcome.OK, Outcome.DECLARED_EXCEPTION, Outcome.APP_EXCEPTION})

# Metric label of each outcome (a dict lookup is cheaper than Enum.value).
_LABELS: Final = {outcome: outcome.value for outcome in Outcome}

# Most steps spent checking a failed framed call's body (`check_body`): about
# 5 ms at worst (a step per byte); a body that needs more is not checked.
CHECK_STEPS: Final = 50_000
# What a failed call the client is to blame for is told (`_refuse_malformed`).
_NOT_COUNTED: Final = "it was not retried and does not count against the upstream"

# Values of requests_total{outcome} besides the attempt outcomes (`Outcome`).
CIRCUIT_OPEN: Final = "circuit_open"
FALLBACK: Final = "fallback"
BAD_REQUEST: Final = "bad_request"
SIDECAR_ERROR: Final = "sidecar_error"
REQUEST_OUTCOMES: Final = (
    *_LABELS.values(),
    CIRCUIT_OPEN,
    SHED,
    FALLBACK,
    BAD_REQUEST,
    SIDECAR_ERROR,
)
# Final outcomes whose latency, after one attempt, is a sample for an adaptive limit.
_SAMPLED: Final = frozenset(_LABELS[o] for o in (*ANSWERS, Outcome.TIMEOUT))

# The methods by which other objects and the loop enter a `Call`; each one's body
# runs inside ``try: ... except Exception: self._crashed()``
# (tests/proxy/test_guards.py checks the form).
ENTRY_POINTS: Final = (
    "start",
    "on_reply",
    "on_error",
    "on_no_reply",
    "_acquired",
    "_retry_due",
    "_fallback_found",
    "hedge_due",
    "hedge_connected",
    "on_hedge_reply",
    "on_hedge_error",
)


@mypyc_attr(allow_interpreted_subclasses=True)
class ProxiedCall(ReplyHandler):
    """What a client connection asks of a call: `Call`, or another kind a server's
    factory makes (the pass-through benchmark's, the tests' fakes). A call is what
    its upstream connection answers too (`ReplyHandler`), when it waits there itself.

    A base class, not a protocol: the compiled build calls a method of a class
    through the class's table of methods, where a protocol's method is called
    by name (a lookup, a bound call and its argument parsing: several hundred
    instructions a call, docs/compiled.md). Another kind of call subclasses it,
    interpreted too (``allow_interpreted_subclasses``: an interpreted subclass's
    methods are reached through a lookup by name, as before).

    Attributes:
        malformed: the call was refused as malformed (the connection counts them).
    """

    __slots__ = ("malformed",)

    def __init__(self) -> None:
        self.malformed = False

    def start(self) -> None:
        """Begin; the done callback may be called before this returns."""
        raise NotImplementedError

    def cancel(self) -> None:
        """The client is gone or the sidecar stops: end without an answer."""
        raise NotImplementedError

    def cut(self, reason: str) -> Wire | None:
        """End now with an error answer saying ``reason`` (the drain timeout passed)."""
        raise NotImplementedError

    def chain_target(self) -> UpstreamConnection | None:
        """The connection the client's next call may go on right behind this one."""
        return None

    def chain_after(self, conn: UpstreamConnection) -> None:
        """Send the first attempt on ``conn``, behind the call waiting there."""
        raise NotImplementedError

    def waits_to_send(self) -> bool:
        """A call that may yet become a chain target once it is sent."""
        return False

    def when_sent(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this call has been sent upstream."""
        raise NotImplementedError


class Call(ProxiedCall):
    """One client message on its way to the upstream and back."""

    __slots__ = (
        "_admission",
        "_attempt",
        "_breaker",
        "_chain",
        "_client_transport",
        "_conn",
        "_ctx",
        "_deadline_at",
        "_done",
        "_expires",
        "_finished",
        "_hedger",
        "_limiter",
        "_message",
        "_on_sent",
        "_oneway",
        "_outgoing",
        "_policy",
        "_pool",
        "_probe",
        "_protocol",
        "_served_by",
        "_shown",
        "_started",
        "_started_try",
        "_t0",
        "_task",
        "_timer",
        "_transport",
        "_tried",
    )

    def __init__(
        self, ctx: CallContext, message: Message, client_transport: Transport, done: Done
    ) -> None:
        """A call for one client message; `start` runs it.

        ``done`` gets the bytes to write back (None for oneway calls); it may
        be called during `start`. The message's buffer is reused for the
        upstream (its seqid is patched); the client's seqid is in its header.
        """
        self._ctx = ctx
        self._message = message
        self._client_transport = client_transport
        self._done = done
        self._finished = False
        self.malformed = False  # found malformed (`_request_shown_well_formed`)
        # Shown well formed? True for buffered calls (walked on the way in); for framed
        # ones set by `start` (limits.validate_framed_calls) or after a failure.
        self._shown: bool | None = True if message.start == 0 and message.theader is None else None
        self._oneway = False
        self._admission: Admission | None = None
        self._limiter: ConcurrencyLimit | None = None  # set while the call holds a slot
        self._conn: UpstreamConnection | None = None
        self._chain: UpstreamConnection | None = None
        self._served_by: str | None = None  # the fallback's source, when one answered
        self._on_sent: Callable[[], None] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._probe: OnewayProbe | None = None  # armed behind a CALL that may be oneway
        self._hedger: Hedger | None = None  # a hedged method's timer and extra attempts
        self._attempt = 0
        self._tried: list[str] = []
        self._started = ctx.clock()  # deadlines and timers: the loop's clock
        self._t0 = perf_counter()  # the latency metric: the loop's clock moves in 1 ms steps
        self._policy: MethodPolicy = ctx.policies.for_name(message.header.name)

    @property
    def finished(self) -> bool:
        return self._finished

    def chain_target(self) -> UpstreamConnection | None:
        """The connection a client's next call may be sent on right behind this one.

        Only while this is a CALL whose method has never been answered, waiting
        on that connection: if the next call's reply comes first, this one was
        oneway (`on_no_reply`). None otherwise (the usual case).
        """
        conn = self._conn
        if (
            conn is None
            or conn.closed
            or self._oneway
            or self._finished
            or self._message.header.type is not _CALL
            or self._ctx.oneway.is_two_way(self._policy.name)
            or not self._answered_in_turn()
        ):
            return None
        return conn

    def waits_to_send(self) -> bool:
        """A CALL of a method never answered, still waiting for a connection or a retry."""
        return (
            self._conn is None
            and not self._finished
            and not self._oneway
            and self._message.header.type is _CALL
            and not self._ctx.oneway.is_two_way(self._policy.name)
        )

    def when_sent(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once this call has been sent upstream (a chain target may exist)."""
        self._on_sent = callback

    def chain_after(self, conn: UpstreamConnection) -> None:
        """Send the first attempt on ``conn``, behind the call waiting there (before `start`)."""
        self._chain = conn

    # entry points

    def start(self) -> None:
        """Begin: admission, then the first attempt (or a fallback or an error)."""
        try:
            ctx = self._ctx
            header = self._message.header
            mtype = header.type
            if mtype is not _CALL and mtype is not _ONEWAY:
                self._finish(
                    BAD_REQUEST,
                    self._error(
                        ApplicationExceptionType.INVALID_MESSAGE_TYPE,
                        f"the sidecar accepts only CALL and ONEWAY messages, got {mtype.name}",
                    ),
                )
                return
            policy = self._policy
            self._oneway = mtype is _ONEWAY or policy.oneway or policy.name in ctx.oneway.learned
            if self._shown is None and ctx.validate_framed:
                try:
                    self._check_body()
                except ProtocolError as exc:
                    self._refuse_malformed(exc, "it was not sent upstream")
                    return
            deadline = policy.retry.deadline
            message = self._message
            if message.theader is not None:  # a THeader client may give its own timeout
                given = client_timeout(message, ctx.timeout_header)
                if given is not None and given < deadline:
                    deadline = given
            self._deadline_at = self._started + deadline
            # upstream_transport(), inline: THeader stays THeader; else as configured.
            client_transport = self._client_transport
            configured = ctx.upstream_transport
            self._transport = (
                client_transport
                if configured is None or client_transport is _THEADER
                else configured
            )
            protocol = self._protocol = ctx.upstream_protocol or header.protocol
            if protocol is header.protocol and (header.strict or protocol is not _BINARY):
                self._outgoing = message  # the common case: sent as it came
            else:
                try:
                    self._outgoing = for_upstream(
                        message, protocol, max_size=ctx.max_message_size, max_depth=ctx.max_depth
                    )
                except ProtocolError as exc:  # it cannot be sent in the upstream's protocol
                    self._finish(
                        BAD_REQUEST,
                        self._error(ApplicationExceptionType.PROTOCOL_ERROR, f"sidecar: {exc}"),
                    )
                    return
            limiter = ctx.limiter
            if not limiter.try_acquire(self._t0):
                self._shed(limiter)
                return
            self._limiter = limiter
            self._breaker = breaker = ctx.breakers.for_label(policy.label)
            self._admission = breaker.admit()
            if self._admission is None:
                ctx.metrics.breaker_rejections.labels(breaker.name).inc()
                shown = ctx.upstream_shown
                self._unanswered(
                    BREAKER_OPEN,
                    CIRCUIT_OPEN,
                    f"circuit open for {shown or 'upstream ' + breaker.name}",
                )
                return
            ctx.budget.deposit(self._started)
            if policy.hedge is not None and not self._oneway:
                self._hedger = Hedger(
                    self,
                    ctx,
                    policy,
                    policy.hedge,
                    self._outgoing,
                    self._transport,
                    protocol,
                    self._deadline_at,
                    self._tried,
                    self._admission is Admission.PROBE,
                    self._started,
                )
            self._next_attempt()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def on_reply(self, reply: Message) -> None:
        """`ReplyHandler`: the upstream answered."""
        try:
            self._conn = None
            if self._probe is not None:
                self._stop_probe()
            oneway = self._ctx.oneway
            name = self._policy.name
            if name not in oneway.two_way:
                oneway.answered(name)
            header = reply.header
            outcome = classify_reply(
                header.type, reply.buf, header.protocol, reply.start + header.body_offset
            )
            self._after_attempt(outcome, reply, None, True)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def on_error(self, error: UpstreamError) -> None:
        """`ReplyHandler`: the attempt failed."""
        try:
            self._conn = None
            if self._probe is not None:
                self._stop_probe()
            self._after_attempt(classify_error(error), None, error, error.sent)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def on_no_reply(self) -> None:
        """`ReplyHandler`: a call sent later on the connection was answered first: oneway."""
        try:
            self._conn = None
            if self._probe is not None:
                self._stop_probe()
            policy = self._policy
            self._ctx.oneway.unanswered(policy.name)
            self._oneway = True
            log.info(
                "learned that %s is oneway: a call sent after it on its upstream connection "
                "(the client's next call, or the sidecar's probe) was answered first; its "
                "calls are sent without waiting for a reply from now on",
                policy.display_name,
                extra={"method": shown_name(policy.name)},
            )
            self._after_attempt(Outcome.OK, None, None, True)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def cut(self, reason: str) -> Wire | None:
        """Abandon the call as `cancel` does; returns the error reply the client should get."""
        if self._finished:
            return None
        wire = (
            None if self._oneway else self._error(ApplicationExceptionType.INTERNAL_ERROR, reason)
        )
        self.cancel()
        return wire

    def cancel(self) -> None:
        """Abandon the call: no answer, nothing recorded (see the module docstring)."""
        if self._finished:
            return
        self._finished = True
        self._release()

    def _acquired(self, task: asyncio.Task[UpstreamConnection]) -> None:
        """A connection was opened or freed for the attempt (or not)."""
        try:
            self._task = None
            if task.cancelled():
                return
            error = task.exception()
            if self._finished:  # cancelled meanwhile
                if error is None:
                    self._pool.release(task.result(), True)
                return
            if error is None:
                self._send(task.result())
            elif isinstance(error, UpstreamError):
                self._after_attempt(classify_error(error), None, error, error.sent)
            else:
                raise error
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _retry_due(self) -> None:
        """The backoff timer fired."""
        try:
            self._next_attempt()
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    # entry points of a hedged call (sidecar.proxy.hedger)

    def hedge_due(self) -> None:
        """`HedgedCall`: the hedge timer fired."""
        try:
            if self._hedger is not None:
                self._hedger.due(self._conn is not None)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def hedge_connected(self, hedge: HedgeAttempt, task: asyncio.Task[UpstreamConnection]) -> None:
        """`HedgedCall`: a connection for a hedge was opened or freed (or not)."""
        try:
            if self._hedger is not None:
                self._hedger.connected(hedge, task)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def on_hedge_reply(self, hedge: HedgeAttempt, reply: Message) -> None:
        """`HedgeOwner`: an extra attempt was answered."""
        try:
            if self._hedger is not None:
                self._hedger.ended(hedge)
            outcome = classify_reply(reply.header.type, reply.body(), reply.header.protocol)
            self._after_attempt(outcome, reply, None, True, hedge)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def on_hedge_error(self, hedge: HedgeAttempt, error: UpstreamError) -> None:
        """`HedgeOwner`: an extra attempt failed (or could not be sent)."""
        try:
            if self._hedger is not None:
                self._hedger.ended(hedge)
            self._after_attempt(classify_error(error), None, error, error.sent, hedge)
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    # the steps

    def _next_attempt(self) -> None:
        """Send the next attempt on an address of the upstream."""
        self._timer = None
        ctx = self._ctx
        chain, self._chain = self._chain, None
        if (
            chain is not None
            and not chain.closed
            and chain.pool.transport_kind is self._transport
            and chain.pool.protocol is self._protocol
        ):
            pool = chain.pool
        else:
            chain = None
            pool = ctx.upstreams.pick(self._transport, self._tried, self._protocol)
        self._pool = pool
        self._tried.append(pool.address)
        self._attempt += 1
        # The first attempt goes in the turn the call started: the loop's clock then.
        now = self._started if self._attempt == 1 else ctx.clock()
        timeout = self._policy.retry.per_try_timeout
        if self._deadline_at - now < timeout:  # near the deadline: what is left of it
            timeout = self._deadline_at - now
        self._started_try = now
        self._expires = now + timeout
        conn = chain or pool.idle()
        if conn is not None:
            self._send(conn)
        else:
            task = ctx.loop.create_task(pool.acquire(timeout))
            self._task = task
            task.add_done_callback(self._acquired)

    def _send(self, conn: UpstreamConnection) -> None:
        if conn.closed:  # closed by the upstream after it was opened, before any byte went
            address = self._pool.address
            error = UpstreamClosed(
                f"upstream {address} closed the connection before the call was sent",
                address=address,
                sent=False,
            )
            self._after_attempt(Outcome.CONNECTION_CLOSED, None, error, False)
            return
        timeout = self._expires - self._started_try  # per_try_timeout, or less near the deadline
        outgoing = self._outgoing
        if outgoing.theader is not None:
            left = self._deadline_at - self._ctx.clock()
            # This copy's number: the call's attempts and the hedges written before it.
            hedger = self._hedger
            copy = self._attempt + (hedger.hedges_sent if hedger is not None else 0)
            set_theader_headers(outgoing, copy, int(left * 1000))
        if self._oneway:
            conn.send(outgoing, None, self._expires, timeout)
            self._pool.release(conn, True)
            self._after_attempt(Outcome.OK, None, None, True)
            return
        self._conn = conn
        conn.send(outgoing, self, self._expires, timeout)
        policy = self._policy
        if (
            policy.oneway_unknown
            and self._message.header.type is _CALL
            and policy.name not in self._ctx.oneway.two_way
            and self._well_formed()
            and self._answered_in_turn()
        ):
            self._probe = OnewayProbe(self._ctx.loop, conn, self, policy.service, timeout)
        if self._hedger is not None:
            self._hedger.sent(self._attempt, self._started_try)
        if self._on_sent is not None:
            on_sent, self._on_sent = self._on_sent, None
            on_sent()

    def _after_attempt(
        self,
        outcome: Outcome,
        reply: Message | None,
        error: UpstreamError | None,
        sent: bool,
        hedge: HedgeAttempt | None = None,
    ) -> None:
        """One attempt ended (``hedge``: an extra one): answer, wait for another, retry or not."""
        if self._finished:
            return
        ctx = self._ctx
        if self._policy.label_awaits_answer:  # a name not yet answered (labels.py)
            ctx.policies.answered(self._policy, outcome, reply)
        # OK first, by identity: the usual outcome, and never a failure (breaker.trip_on
        # names failure outcomes only); each `in` is a set lookup.
        ok = outcome is _OK
        failed = not ok and outcome in ctx.trip_on
        if failed and sent:
            shown = self._request_shown_well_formed()
            if shown is None:  # malformed: answered
                return
            if not shown:
                address = self._pool.address if hedge is None else hedge.pool.address
                hedger = self._hedger
                if self._conn is not None or (hedger is not None and hedger.in_flight):
                    # another attempt may yet answer
                    self._policy.stats.attempt(address, _LABELS[outcome])
                    return
                self._unshown(outcome, reply, error, address)
                return
        policy = self._policy
        exception_id = None
        if outcome is _DECLARED and policy.classifies_exceptions and reply is not None:
            # a declared exception the config names (by IDL name, resolved to field ids)
            exception_id = first_field_id(reply.body(), reply.header.protocol)
            failed = exception_id in policy.failure_exceptions
        address = self._pool.address if hedge is None else hedge.pool.address
        ejected_for = ctx.upstreams.record(address, failed)
        if ejected_for is not None:
            _log_ejection(ctx, address, ejected_for, outcome)
        label = _LABELS[outcome]
        policy.stats.attempt(address, label)
        if (ok or outcome in ANSWERS) and (
            exception_id is None or exception_id not in policy.retry.retry_exceptions
        ):
            if self._hedger is not None and reply is not None:
                self._hedger.answered(hedge)
                if hedge is not None:  # the winner's address, for the access log
                    self._pool = hedge.pool
            now = perf_counter()  # the breaker's duration and the call's, read once
            admission = self._admission
            if admission is not None:  # `_record`, inline: once on every call answered
                self._breaker.record(admission, failed, now - self._t0)
                self._admission = None
            if reply is None:
                self._finish(label, None, now)
                return
            if reply.header.protocol is not self._message.header.protocol:
                reply = self._for_client(reply)
                if reply is None:
                    return
            self._finish(label, self._to_client_wire(reply), now)
            # Remembered once the answer is written: the client does not wait for the
            # cache (the key's hash, the copy it may store).
            if policy.cacheable:  # remember() is asked for a cacheable method's only
                ctx.fallbacks.remember(policy.name, self._message, reply, outcome)
            return
        hedger = self._hedger
        if hedger is not None:
            if self._conn is not None or hedger.in_flight:
                return  # another attempt is still in flight: its answer may yet win
            hedger.stop_timer()
        decision = self._decide(outcome, sent, exception_id)
        if isinstance(decision, GiveUp):
            self._record(failed)
            self._give_up(outcome, reply, error)
            return
        ctx.metrics.retries.labels(policy.label, label).inc()
        log.debug(
            "retrying %s after %s (attempt %d, waiting %.3fs)",
            policy.display_name,
            label,
            self._attempt,
            decision.wait,
        )
        if decision.wait > 0:
            self._timer = ctx.loop.call_later(decision.wait, self._retry_due)
        else:
            self._next_attempt()

    def _request_shown_well_formed(self) -> bool | None:
        """After a failed attempt: was the client's framed call itself to blame?

        True: the call is well formed (buffered ones were walked on the way
        in, framed ones by `start` unless limits.validate_framed_calls is
        off, and then here, so that a good call pays nothing), and with an
        IDL its arguments have the types it declares: the failure is the
        upstream's. None: it is malformed or mistyped, and answered here with
        PROTOCOL_ERROR: not the upstream's failure (no breaker or ejection
        count), never retried. False: too costly to check (`CHECK_STEPS`):
        treated as `_unshown`.
        """
        try:
            shown = self._check_body()
        except ProtocolError as exc:
            self._refuse_malformed(exc, _NOT_COUNTED)
            return None
        declared = self._policy.arguments
        if shown and declared is not None:
            message = self._message
            found = mistyped_field(message.body(), message.header.protocol, declared.types)
            if found is not None:
                fid, sent = found
                want = declared.types[fid]
                self._refuse_malformed(
                    ProtocolError(
                        f"argument {fid} ({declared.names[fid]}) of "
                        f"{self._policy.display_name} has type {TYPE_NAMES.get(sent, sent)}, the "
                        f"IDL declares {TYPE_NAMES.get(want, want)}"
                    ),
                    _NOT_COUNTED,
                    "does not match the IDL",
                )
                return None
        return shown

    def _refuse_malformed(
        self, exc: ProtocolError, what: str, problem: str = "is malformed"
    ) -> None:
        """The client's call is malformed (or ``problem``): PROTOCOL_ERROR (nothing for
        oneway), counted on it."""
        self.malformed = True
        if self._admission is not None:
            self._breaker.cancel(self._admission)
            self._admission = None
        wire = None
        if not self._oneway:
            wire = self._error(
                ApplicationExceptionType.PROTOCOL_ERROR,
                f"sidecar: the call {problem} ({exc}); {what}",
            )
        self._finish(BAD_REQUEST, wire)

    def _unshown(
        self,
        outcome: Outcome,
        reply: Message | None,
        error: UpstreamError | None,
        address: str,
    ) -> None:
        """A failed call the sidecar could not show well formed: not retried, not counted.

        The isolation rule (README, Robustness): only a request shown well
        formed may count against the upstream. The client gets what a last
        failed attempt gets (a fallback, or the error).
        """
        if self._admission is not None:
            self._breaker.cancel(self._admission)
            self._admission = None
        self._policy.stats.attempt(address, _LABELS[outcome])
        self._give_up(outcome, reply, error)

    def _decide(self, outcome: Outcome, sent: bool, exception_id: int | None) -> Retry | GiveUp:
        """Retry or give up after a failed attempt; a retry takes its budget token here."""
        ctx = self._ctx
        now = ctx.clock()
        decision = self._policy.retry.decide(
            attempt=self._attempt,
            outcome=outcome,
            sent=sent,
            oneway=self._oneway,
            now=now,
            deadline_at=self._deadline_at,
            rng=ctx.rng,
            tokens=ctx.budget.balance(now),
            probe=self._admission is Admission.PROBE,
            circuit_open=self._breaker.state == STATE_OPEN,
            exception_id=exception_id,
        )
        if isinstance(decision, Retry):
            ctx.budget.withdraw(now)
        else:
            ctx.metrics.retries_given_up.labels(self._policy.label, decision.reason).inc()
            if decision.reason == BUDGET:
                ctx.metrics.retry_budget_exhausted.labels(ctx.upstream_name).inc()
        return decision

    def _record(self, failed: bool) -> None:
        if self._admission is not None:
            self._breaker.record(self._admission, failed, perf_counter() - self._t0)
            self._admission = None

    def _give_up(
        self, outcome: Outcome, reply: Message | None, error: UpstreamError | None
    ) -> None:
        """The last attempt failed for good: a fallback, the upstream's own reply, or an error."""
        label = _LABELS[outcome]
        if self._oneway:
            self._finish(label, None)
            return

        def without_fallback() -> None:
            answer = None if reply is None else self._for_client(reply)
            if answer is not None:  # the upstream answered, with an error of its own: pass it on
                self._finish(label, self._to_client_wire(answer))
                return
            if reply is not None:  # it could not be put in the client's protocol: answered
                return
            tries = f" ({self._attempt} attempts)" if self._attempt > 1 else ""
            reason = label if error is None else error.told_as(self._ctx.upstream_shown)
            if RETRIES_EXHAUSTED in self._ctx.fallbacks.serve_on:
                tries += f", no fallback for {self._policy.display_name}"
            self._finish(
                label, self._error(ApplicationExceptionType.INTERNAL_ERROR, f"{reason}{tries}")
            )

        self._fallback(RETRIES_EXHAUSTED, without_fallback)

    def _unanswered(self, reason: str, label: str, why: str) -> None:
        """No attempt could be made: serve a fallback, or say why not."""
        if self._oneway:
            log.debug("dropping oneway %s: %s", self._policy.display_name, why)
            self._finish(label, None)
            return

        def without_fallback() -> None:
            self._finish(
                label,
                self._error(
                    ApplicationExceptionType.INTERNAL_ERROR,
                    f"{why}, no fallback for {self._policy.display_name}",
                ),
            )

        self._fallback(reason, without_fallback)

    def _shed(self, limiter: ConcurrencyLimit) -> None:
        """Over the upstream's concurrency limit: a fallback or an error, at once."""
        ctx = self._ctx
        ctx.metrics.calls_shed.labels(ctx.upstream_name).inc()
        shown = ctx.upstream_shown or "upstream " + ctx.upstream_name
        kind = "upstream.max_in_flight" if limiter.adaptive is None else "adaptive limit"
        self._unanswered(
            SHED,
            SHED,
            f"call shed: {limiter.in_flight} calls were in flight at {shown} "
            f"({kind} {limiter.limit}{limiter.share_note})",
        )

    def _fallback(self, reason: str, otherwise: Callable[[], None]) -> None:
        """Serve a fallback for ``reason`` if one exists, else run ``otherwise``."""
        fallbacks = self._ctx.fallbacks
        policy = self._policy
        if reason not in fallbacks.serve_on or (
            policy.static_reply is None and (fallbacks.store is None or not policy.cacheable)
        ):
            otherwise()
            return
        task = self._ctx.loop.create_task(fallbacks.find(policy, self._message, reason))
        self._task = task
        task.add_done_callback(functools.partial(self._fallback_found, otherwise))

    def _fallback_found(
        self, otherwise: Callable[[], None], task: asyncio.Task[Served | None]
    ) -> None:
        """The store lookup ended: serve what it found, else run ``otherwise``."""
        try:
            self._task = None
            if task.cancelled() or self._finished:
                return
            served = task.result()
            if served is None:
                otherwise()
                return
            self._ctx.metrics.fallback_replies.labels(self._policy.label, served.source).inc()
            self._served_by = served.source
            self._finish(
                FALLBACK, frame_reply(served.message, self._message, self._client_transport)
            )
        except Exception:  # a bug: it stops here (`_crashed`)
            self._crashed()

    def _for_client(self, reply: Message) -> Message | None:
        """The reply in the client's protocol; None (the call answered) when it cannot be."""
        if reply.header.protocol is self._message.header.protocol:
            return reply
        ctx = self._ctx
        try:
            return for_client(
                reply, self._message, max_size=ctx.max_message_size, max_depth=ctx.max_depth
            )
        except ProtocolError as exc:
            self._finish(
                _LABELS[Outcome.PROTOCOL_ERROR],
                self._error(
                    ApplicationExceptionType.PROTOCOL_ERROR,
                    f"sidecar: the upstream's reply cannot be put in the client's protocol: {exc}",
                ),
            )
            return None

    def _to_client_wire(self, reply: Message) -> Wire:
        """The upstream's reply with the client's seqid, as the client's transport writes it.

        A THeader reply goes in the THeader form of the client's call (inside a
        frame length or not), not in the form the upstream wrote it in.
        """
        message = self._message
        theader = message.theader
        return reply.wire_with_seqid(
            message.header.seqid,
            self._client_transport,
            None if theader is None else theader.outer_framed,
        )

    def _error(self, exc_type: ApplicationExceptionType, text: str) -> Wire:
        header = self._message.header
        method = header.name.rpartition(":")[2]
        message = encode_application_exception(
            method, header.seqid, exc_type, text, header.strict, header.protocol
        )
        return frame_reply(message, self._message, self._client_transport)

    def _finish(self, label: str, wire: Wire | None, now: float = -1.0) -> None:
        """Answer the client (``wire``; None: nothing to write) and count the call;
        ``now``: `perf_counter` read a moment before, by the caller (else read here)."""
        if self._finished:
            return
        self._finished = True
        if self._hedger is not None:  # the attempts still in flight lost
            conn, self._conn = self._conn, None
            self._hedger.end(conn)
        if now < 0.0:
            now = perf_counter()
        seconds = now - self._t0
        limiter = self._limiter
        if limiter is not None:  # `_free_slot`, inline: once on every call
            self._limiter = None
            if label in _SAMPLED and self._attempt == 1:
                limiter.release(self._t0, now)
            else:
                limiter.release()
        self._policy.stats.request(label, seconds)
        rate = self._ctx.access_sample_rate
        if rate and (rate >= 1.0 or self._ctx.rng.random() < rate):
            self._log_access(label, seconds)
        self._done(wire)

    def _log_access(self, label: str, seconds: float) -> None:
        """One access log line: what the call was and came to; never payload bytes."""
        header = self._message.header
        upstream = self._pool.address if self._tried else "-"
        access_log.info(
            "%s seqid=%d outcome=%s attempts=%d upstream=%s duration_ms=%.3f fallback=%s",
            self._policy.display_name or "-",
            header.seqid,
            label,
            self._attempt,
            upstream,
            seconds * 1000,
            self._served_by or "-",
            extra={
                "method": shown_name(header.name),
                "seqid": header.seqid,
                "outcome": label,
                "attempts": self._attempt,
                "upstream": upstream,
                "duration_ms": round(seconds * 1000, 3),
                "fallback": self._served_by,
            },
        )

    def _free_slot(self, label: str | None = None, now: float = 0.0) -> None:
        """Give back the concurrency slot (at most once: the call forgets its limiter).

        An answer or a timeout after a single attempt is a latency sample for
        an adaptive limit; a retried call's latency includes backoff waits.
        """
        limiter, self._limiter = self._limiter, None
        if limiter is None:
            return
        if label in _SAMPLED and self._attempt == 1:
            limiter.release(self._t0, now)
        else:
            limiter.release()

    def _release(self) -> None:
        """Let go of what the call holds: connection, task, timer, probe slot, concurrency slot."""
        self._free_slot()
        if self._conn is not None:
            self._conn.abandon(self)
            self._conn = None
        if self._hedger is not None:
            self._hedger.abandon()
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._probe is not None:
            self._stop_probe()
        if self._admission is not None:
            self._breaker.cancel(self._admission)
            self._admission = None

    def _check_body(self) -> bool:
        """Is the call's body well formed (`check_body`, run once a call)? False: too
        costly to tell (`CHECK_STEPS`).

        Raises:
            ProtocolError: it is not.
        """
        shown = self._shown
        if shown is None:
            shown = self._shown = check_body(self._message, self._ctx.max_depth, CHECK_STEPS)
        return shown

    def _well_formed(self) -> bool:
        """Is the call known to be whole and well formed (checked here if it was not)?

        Only such a call gets a oneway probe behind it: an upstream that reads a
        call cut short on into the next frame would take the probe's bytes for the
        rest of it. A malformed one is left for `_request_shown_well_formed`.
        """
        try:
            return self._check_body()
        except ProtocolError:
            return False

    def _answered_in_turn(self) -> bool:
        """Will the upstream answer this call before the calls sent behind it?

        Not when a THeader client lets the server answer it out of order (its
        frame's `SUPPORT_OUT_OF_ORDER` flag, as fbthrift clients may set): a
        later call answered first would prove nothing, so none is sent behind
        it to learn whether it is oneway (neither the client's next call nor a
        probe).
        """
        theader = self._message.theader
        return theader is None or not theader.out_of_order

    def _stop_probe(self) -> None:
        """The attempt the oneway probe was armed for is over: no probe now."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()

    def _crashed(self) -> None:
        """A bug in the sidecar: answer this call with INTERNAL_ERROR and log it."""
        log.exception("internal error handling %s", shown_name(self._message.header.name))
        if self._finished:
            return
        self._release()
        wire = None
        if not self._oneway:
            wire = self._error(
                ApplicationExceptionType.INTERNAL_ERROR,
                "sidecar: internal error handling this call (see the sidecar's log)",
            )
        self._finish(SIDECAR_ERROR, wire)


def _log_ejection(ctx: CallContext, address: str, seconds: float, outcome: Outcome) -> None:
    """Count and log an address taken out of rotation."""
    ctx.metrics.upstream_ejections.labels(address).inc()
    held = math.isinf(seconds)  # health checks are on: out until they pass
    log.warning(
        "upstream address %s ejected %s after repeated failures (last: %s)",
        address,
        "until its health checks pass" if held else f"for {seconds:g}s",
        outcome.value,
        extra={"upstream": address, "ejected_seconds": None if held else seconds},
    )
