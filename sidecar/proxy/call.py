"""One client call through the pipeline, as a small state machine driven by callbacks.

    start: policy for the method name; breaker admits the call?
        no  -> fallback or TApplicationException
    attempt: an address (not tried yet where possible), an idle connection
        (or a task that opens or waits for one), send with a per-try timeout
    on_reply / on_error: classify; record in the address's ejection tracker
        an answer (ok, declared or application exception)
            -> record success in the breaker, remember it, finish with it
        else retry? (not a half-open probe, circuit not opened meanwhile,
                     retry_on, attempts, safe to repeat, deadline, budget)
            yes -> timer (full jitter), attempt again
            no  -> record the failure in the breaker; a fallback, the
                   upstream's own error reply, or TApplicationException
                   (INTERNAL_ERROR) saying what happened
    finish: count, hand the bytes (None for oneway) to the connection

The common path, an idle upstream connection and an answer, runs entirely in
the event loop's I/O callbacks: the client's bytes arrive, the call goes out
on the upstream connection, the reply's bytes arrive, the answer is written,
with no task, future or extra loop iteration in between (a coroutine per call
costed about 4 µs more, measured with bench/). Tasks are used where waiting is
unavoidable and rare: opening a connection, waiting for a free one, and a
fallback lookup in a store that does I/O.

The breaker sees one outcome per call, the final one, not one per attempt:
a transient failure that a retry absorbed says nothing about the upstream's
health, and with several addresses one dead address (the ejection tracker's
business, per attempt) must not open the circuit for all of them. A dead
upstream still opens the circuit after ``fail_max`` failed calls. A half-open
probe is a single attempt, and a call stops retrying when the circuit opens
under it, so nothing reaches an upstream whose circuit is open except the
attempts already in flight.

Cancellation (the sidecar drains past its timeout): the upstream connection
in use is closed, a pending task or timer is cancelled, a half-open probe
slot is freed, and the breaker records nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from sidecar.errors import UpstreamClosed, UpstreamError
from sidecar.fallback.service import BREAKER_OPEN, RETRIES_EXHAUSTED, Served
from sidecar.policy import MethodPolicy
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import Message, Transport, frame
from sidecar.proxy.upstream import UpstreamConnection
from sidecar.resilience.breaker import STATE_OPEN, Admission
from sidecar.resilience.outcome import Outcome, classify_reply
from sidecar.resilience.retry import BUDGET, GiveUp, Retry

if TYPE_CHECKING:
    from sidecar.proxy.pipeline import Pipeline

log = logging.getLogger("sidecar.pipeline")

Wire = bytes | bytearray | memoryview
Done = Callable[[Wire | None], None]

_CALL = MessageType.CALL
_ONEWAY = MessageType.ONEWAY

# Outcomes that are answers from the upstream: returned as they are, never retried.
ANSWERS = frozenset({Outcome.OK, Outcome.DECLARED_EXCEPTION, Outcome.APP_EXCEPTION})

# Metric label of each outcome (a dict lookup is cheaper than Enum.value).
_LABELS = {outcome: outcome.value for outcome in Outcome}

# GiveUp reasons decided here rather than by the retry policy: a half-open
# probe is one attempt; a call does not retry into a circuit that opened meanwhile.
PROBE = "probe"
CIRCUIT_OPENED = "circuit_open"

# Label values of requests_total{outcome} besides the attempt outcomes.
CIRCUIT_OPEN = "circuit_open"
FALLBACK = "fallback"
BAD_REQUEST = "bad_request"
INTERNAL = "sidecar_error"


class Call:
    """One client message on its way through the pipeline."""

    __slots__ = (
        "_admission",
        "_attempt",
        "_breaker",
        "_client_transport",
        "_conn",
        "_deadline_at",
        "_done",
        "_expires",
        "_finished",
        "_message",
        "_oneway",
        "_p",
        "_policy",
        "_pool",
        "_started",
        "_task",
        "_timer",
        "_transport",
        "_tried",
    )

    def __init__(
        self, pipeline: Pipeline, message: Message, client_transport: Transport, done: Done
    ) -> None:
        self._p = pipeline
        self._message = message
        self._client_transport = client_transport
        self._done = done
        self._finished = False
        self._admission: Admission | None = None
        self._conn: UpstreamConnection | None = None
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._attempt = 0
        self._tried: list[str] = []
        self._started = pipeline.loop.time()
        self._policy: MethodPolicy = pipeline.policies.for_name(message.header.name)

    @property
    def finished(self) -> bool:
        return self._finished

    # entry points (each guarded: a bug answers this client, it does not hang it)

    def start(self) -> None:
        """Begin; ``done`` may be called before this returns."""
        try:
            self._start()
        except Exception:
            self._crashed()

    def on_reply(self, reply: Message) -> None:
        """`ReplyHandler`: the upstream answered."""
        self._conn = None
        try:
            outcome = classify_reply(reply.header.type, reply.body())
            self._after_attempt(outcome, reply, None, True)
        except Exception:
            self._crashed()

    def on_error(self, error: UpstreamError) -> None:
        """`ReplyHandler`: the attempt failed."""
        self._conn = None
        try:
            self._after_attempt(Outcome(error.outcome), None, error, error.sent)
        except Exception:
            self._crashed()

    def cancel(self) -> None:
        """Abandon the call: no answer, nothing recorded (see the module docstring)."""
        if self._finished:
            return
        self._finished = True
        if self._conn is not None:
            self._conn.abandon()
            self._conn = None
        if self._task is not None:
            self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        if self._admission is not None:
            self._breaker.cancel(self._admission)
            self._admission = None

    # the steps

    def _start(self) -> None:
        p = self._p
        message = self._message
        header = message.header
        policy = self._policy
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
        self._oneway = mtype is _ONEWAY
        self._deadline_at = self._started + policy.retry.deadline
        self._breaker = breaker = p.breakers.for_policy(policy)
        self._admission = breaker.admit()
        if self._admission is None:
            p.metrics.breaker_rejections.labels(breaker.name).inc()
            self._unanswered(
                BREAKER_OPEN, CIRCUIT_OPEN, f"circuit open for upstream {breaker.name}"
            )
            return
        p.budget.deposit(self._started)
        self._transport = p.upstream_transport or self._client_transport
        self._next_attempt()

    def _next_attempt(self) -> None:
        """Send the next attempt on an address of the upstream."""
        self._timer = None
        p = self._p
        pool = p.upstreams.pick(self._transport, self._tried)
        self._pool = pool
        self._tried.append(pool.address)
        self._attempt += 1
        now = p.loop.time()
        timeout = min(self._policy.retry.per_try_timeout, self._deadline_at - now)
        self._expires = now + timeout
        conn = pool.idle()
        if conn is not None:
            self._send(conn)
        else:
            task = p.loop.create_task(pool.acquire(timeout))
            self._task = task
            task.add_done_callback(self._acquired)

    def _acquired(self, task: asyncio.Task[UpstreamConnection]) -> None:
        """A connection was opened or freed for the attempt (or not)."""
        self._task = None
        if task.cancelled():
            return
        error = task.exception()
        if self._finished:  # cancelled meanwhile
            if error is None:
                self._pool.release(task.result(), True)
            return
        try:
            if error is None:
                self._send(task.result())
            elif isinstance(error, UpstreamError):
                self._after_attempt(Outcome(error.outcome), None, error, error.sent)
            else:
                raise error
        except Exception:
            self._crashed()

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
        timeout = self._policy.retry.per_try_timeout
        if self._oneway:
            conn.send(self._message, None, self._expires, timeout)
            self._pool.release(conn, True)
            self._after_attempt(Outcome.OK, None, None, True)
            return
        self._conn = conn
        conn.send(self._message, self, self._expires, timeout)

    def _after_attempt(
        self, outcome: Outcome, reply: Message | None, error: UpstreamError | None, sent: bool
    ) -> None:
        if self._finished:
            return
        p = self._p
        policy = self._policy
        address = self._pool.address
        failed = outcome in p.trip_on
        ejected_for = p.upstreams.record(address, failed)
        if ejected_for is not None:
            p.ejected(address, ejected_for, outcome)
        label = _LABELS[outcome]
        policy.stats.attempt(address, label)
        if outcome in ANSWERS:
            self._record(failed)
            if reply is None:
                self._finish(label, None)
                return
            p.fallbacks.remember(policy, self._message, reply, outcome)
            reply.set_seqid(self._message.header.seqid)
            self._finish(label, reply.to_wire(self._client_transport))
            return
        decision = self._decide(outcome, sent)
        if isinstance(decision, GiveUp):
            self._record(failed)
            self._give_up(outcome, reply, error)
            return
        p.metrics.retries.labels(policy.label, label).inc()
        log.debug(
            "retrying %s after %s (attempt %d, waiting %.3fs)",
            policy.display_name,
            label,
            self._attempt,
            decision.wait,
        )
        if decision.wait > 0:
            self._timer = p.loop.call_later(decision.wait, self._retry_now)
        else:
            self._next_attempt()

    def _retry_now(self) -> None:
        try:
            self._next_attempt()
        except Exception:
            self._crashed()

    def _decide(self, outcome: Outcome, sent: bool) -> Retry | GiveUp:
        """Retry or give up after a failed attempt (the retry policy, then the breaker)."""
        p = self._p
        if self._admission is Admission.PROBE:
            decision: Retry | GiveUp = GiveUp(PROBE)
        elif self._breaker.state == STATE_OPEN:
            decision = GiveUp(CIRCUIT_OPENED)
        else:
            decision = self._policy.retry.decide(
                attempt=self._attempt,
                outcome=outcome,
                sent=sent,
                oneway=self._oneway,
                now=p.loop.time(),
                deadline_at=self._deadline_at,
                rng=p.rng,
                budget=p.budget,
            )
        if isinstance(decision, GiveUp):
            p.metrics.retries_given_up.labels(self._policy.label, decision.reason).inc()
            if decision.reason == BUDGET:
                p.metrics.retry_budget_exhausted.labels(p.upstream_name).inc()
        return decision

    def _record(self, failed: bool) -> None:
        if self._admission is not None:
            self._breaker.record(self._admission, failed)
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
            if reply is not None:  # the upstream answered, with an error of its own: pass it on
                reply.set_seqid(self._message.header.seqid)
                self._finish(label, reply.to_wire(self._client_transport))
                return
            tries = f" ({self._attempt} attempts)" if self._attempt > 1 else ""
            reason = str(error) if error is not None else label
            if RETRIES_EXHAUSTED in self._p.fallbacks.serve_on:
                tries += f", no fallback for {self._policy.display_name}"
            self._finish(
                label, self._error(ApplicationExceptionType.INTERNAL_ERROR, f"{reason}{tries}")
            )

        self._fallback(RETRIES_EXHAUSTED, without_fallback)

    def _unanswered(self, reason: str, label: str, why: str) -> None:
        """No attempt could be made: serve a fallback, or say why not."""
        if self._message.header.type is _ONEWAY:
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

    def _fallback(self, reason: str, otherwise: Callable[[], None]) -> None:
        """Serve a fallback for ``reason`` if one exists, else run ``otherwise``."""
        fallbacks = self._p.fallbacks
        policy = self._policy
        if reason not in fallbacks.serve_on or (
            policy.static_reply is None and (fallbacks.store is None or not policy.cacheable)
        ):
            otherwise()
            return

        def found(task: asyncio.Task[Served | None]) -> None:
            self._task = None
            if task.cancelled() or self._finished:
                return
            try:
                served = task.result()
                if served is None:
                    otherwise()
                    return
                self._p.metrics.fallback_replies.labels(policy.label, served.source).inc()
                self._finish(FALLBACK, frame(served.message, self._client_transport))
            except Exception:
                self._crashed()

        task = self._p.loop.create_task(fallbacks.find(policy, self._message, reason))
        self._task = task
        task.add_done_callback(found)

    def _error(self, exc_type: ApplicationExceptionType, text: str) -> Wire:
        header = self._message.header
        method = header.name.rpartition(":")[2]
        message = encode_application_exception(method, header.seqid, exc_type, text, header.strict)
        return frame(message, self._client_transport)

    def _finish(self, label: str, wire: Wire | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._policy.stats.request(label, self._p.loop.time() - self._started)
        self._done(wire)

    def _crashed(self) -> None:
        """A bug in the sidecar: answer this call with INTERNAL_ERROR and log it."""
        log.exception("internal error handling %s", self._message.header.name)
        if self._finished:
            return
        if self._conn is not None:
            self._conn.abandon()
            self._conn = None
        if self._admission is not None:
            self._breaker.cancel(self._admission)
            self._admission = None
        wire = None
        if self._message.header.type is not _ONEWAY:
            wire = self._error(
                ApplicationExceptionType.INTERNAL_ERROR,
                "sidecar: internal error handling this call (see the sidecar's log)",
            )
        self._finish(INTERNAL, wire)
