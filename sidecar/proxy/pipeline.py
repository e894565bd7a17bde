"""One call, end to end: admit, attempt, classify, record, retry or return.

For every client message `Pipeline.handle` returns the bytes to write back
(or None for ``oneway``):

    policy for the method name
    breaker admits the call?       no  -> fallback or TApplicationException
    loop:
        attempt on an address (per-try timeout, seqid rewritten)
        classify the outcome; record it in the address's ejection tracker
        answer (ok, declared or application exception)
            -> record success in the breaker, remember, return it
        retry? (not a half-open probe, circuit not opened meanwhile,
                retry_on, attempts, safe to repeat, deadline, budget)
            yes -> wait (full jitter), next attempt on another address
            no  -> record the failure in the breaker; the upstream's own
                   reply if it sent one, else fallback or
                   TApplicationException(INTERNAL_ERROR) saying what happened

The breaker sees one outcome per call, the final one, not one per attempt:
a transient failure that a retry absorbed says nothing about the upstream's
health, and with several addresses one dead address (the ejection tracker's
business, per attempt) must not open the circuit for all of them. A dead
upstream still opens the circuit after ``fail_max`` failed calls. A half-open
probe is a single attempt, and a call stops retrying when the circuit opens
under it, so nothing reaches an upstream whose circuit is open except the
attempts already in flight.

The decisions are made by the pure objects in `sidecar.resilience`; this
module does the awaiting and the counting.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from sidecar.errors import UpstreamError
from sidecar.fallback.service import BREAKER_OPEN, RETRIES_EXHAUSTED, Fallbacks
from sidecar.metrics import SidecarMetrics
from sidecar.policy import MethodPolicy, PolicyTable
from sidecar.protocol.appexc import ApplicationExceptionType, encode_application_exception
from sidecar.protocol.envelope import MessageType
from sidecar.protocol.framing import Message, Transport, frame
from sidecar.proxy.balancer import UpstreamSet
from sidecar.resilience.breaker import STATE_OPEN, Admission, Breaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.outcome import Outcome, classify_reply
from sidecar.resilience.retry import BUDGET, GiveUp, Retry

log = logging.getLogger("sidecar.pipeline")

Wire = bytes | bytearray | memoryview

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


class BreakerSet:
    """One breaker per upstream, or one per upstream and method label (``scope: method``)."""

    def __init__(self, make: Callable[[str], Breaker], upstream_name: str, per_method: bool):
        self._make = make
        self._upstream_name = upstream_name
        self._per_method = per_method
        self._breakers: dict[str, Breaker] = {}
        if not per_method:
            self._only: Breaker | None = self._get(upstream_name)
        else:
            self._only = None

    def _get(self, name: str) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = self._make(name)
        return breaker

    def for_policy(self, policy: MethodPolicy) -> Breaker:
        """The breaker that guards calls of this method (method labels are capped)."""
        if self._only is not None:
            return self._only
        return self._get(f"{self._upstream_name}/{policy.label}")

    def all(self) -> list[Breaker]:
        return list(self._breakers.values())


class Pipeline:
    """Drives one call through the resilience policy to the upstream and back."""

    def __init__(
        self,
        *,
        upstreams: UpstreamSet,
        upstream_transport: Transport | None,
        upstream_name: str,
        policies: PolicyTable,
        breakers: BreakerSet,
        budget: RetryBudget,
        fallbacks: Fallbacks,
        metrics: SidecarMetrics,
        trip_on: frozenset[Outcome],
        loop: asyncio.AbstractEventLoop,
        rng: random.Random | None = None,
    ) -> None:
        # Kept, not looked up: asyncio.get_running_loop() costs a getpid() system call.
        self.loop = loop
        self.upstreams = upstreams
        self.upstream_transport = upstream_transport
        self.upstream_name = upstream_name
        self.policies = policies
        self.breakers = breakers
        self.budget = budget
        self.fallbacks = fallbacks
        self.metrics = metrics
        self.trip_on = trip_on
        self._rng = rng or random.Random()

    def _loop_time(self) -> float:
        return self.loop.time()

    async def handle(self, call: Message, client_transport: Transport) -> Wire | None:
        """Answer one client message; None for oneway calls.

        The message's buffer is reused for the upstream (its seqid is
        patched); the client's seqid is taken from its header.
        """
        header = call.header
        policy = self.policies.for_name(header.name)
        stats = policy.stats
        loop = self.loop
        started = loop.time()
        if header.type != MessageType.CALL and header.type != MessageType.ONEWAY:
            stats.request(BAD_REQUEST, loop.time() - started)
            return self._error(
                call,
                policy,
                client_transport,
                ApplicationExceptionType.INVALID_MESSAGE_TYPE,
                f"the sidecar accepts only CALL and ONEWAY messages, got {header.type.name}",
            )
        outcome_label, wire = await self._call(call, policy, client_transport, started)
        stats.request(outcome_label, loop.time() - started)
        return wire

    async def _call(
        self,
        call: Message,
        policy: MethodPolicy,
        client_transport: Transport,
        started: float,
    ) -> tuple[str, Wire | None]:
        loop = self.loop
        oneway = call.header.type == MessageType.ONEWAY
        retry = policy.retry
        deadline_at = started + retry.deadline
        breaker = self.breakers.for_policy(policy)
        admission = breaker.admit()
        if admission is None:
            self.metrics.breaker_rejections.labels(breaker.name).inc()
            return await self._unanswered(
                call,
                policy,
                client_transport,
                BREAKER_OPEN,
                CIRCUIT_OPEN,
                f"circuit open for upstream {breaker.name}",
            )
        self.budget.deposit(started)
        transport = self.upstream_transport or client_transport
        tried: list[str] = []
        attempt = 0
        try:
            while True:
                pool = self.upstreams.pick(transport, tried)
                tried.append(pool.address)
                attempt += 1
                timeout = min(retry.per_try_timeout, deadline_at - loop.time())
                reply: Message | None = None
                error: UpstreamError | None = None
                try:
                    reply = await pool.exchange(call, oneway=oneway, timeout=timeout)
                except UpstreamError as exc:
                    error = exc
                    outcome = Outcome(exc.outcome)
                    sent = exc.sent
                else:
                    sent = True
                    outcome = (
                        Outcome.OK
                        if reply is None
                        else classify_reply(reply.header.type, reply.body())
                    )
                failed = outcome in self.trip_on
                if self.upstreams.record(pool.address, failed) is not None:
                    self._ejected(pool.address)
                label = _LABELS[outcome]
                policy.stats.attempt(pool.address, label)
                if outcome in ANSWERS:
                    breaker.record(admission, failed)
                    if reply is None:
                        return label, None
                    self.fallbacks.remember(policy, call, reply, outcome)
                    reply.set_seqid(call.header.seqid)
                    return label, reply.to_wire(client_transport)
                decision = self._next_step(
                    policy, breaker, admission, attempt, outcome, sent, oneway, deadline_at
                )
                if isinstance(decision, GiveUp):
                    breaker.record(admission, failed)
                    return await self._give_up(
                        call, policy, client_transport, outcome, reply, error, attempt
                    )
                self.metrics.retries.labels(policy.label, outcome.value).inc()
                log.debug(
                    "retrying %s after %s (attempt %d, waiting %.3fs)",
                    policy.display_name,
                    outcome.value,
                    attempt,
                    decision.wait,
                )
                if decision.wait > 0:
                    await asyncio.sleep(decision.wait)
        except BaseException:
            # Cancelled (client gone, shutdown) or a bug: the call counts as nothing.
            breaker.cancel(admission)
            raise

    def _next_step(
        self,
        policy: MethodPolicy,
        breaker: Breaker,
        admission: Admission,
        attempt: int,
        outcome: Outcome,
        sent: bool,
        oneway: bool,
        deadline_at: float,
    ) -> Retry | GiveUp:
        """Retry or give up after a failed attempt (the retry policy, then the breaker)."""
        if admission is Admission.PROBE:
            decision: Retry | GiveUp = GiveUp(PROBE)
        elif breaker.state == STATE_OPEN:
            decision = GiveUp(CIRCUIT_OPENED)
        else:
            decision = policy.retry.decide(
                attempt=attempt,
                outcome=outcome,
                sent=sent,
                oneway=oneway,
                now=self._loop_time(),
                deadline_at=deadline_at,
                rng=self._rng,
                budget=self.budget,
            )
        if isinstance(decision, GiveUp):
            self.metrics.retries_given_up.labels(policy.label, decision.reason).inc()
            if decision.reason == BUDGET:
                self.metrics.retry_budget_exhausted.labels(self.upstream_name).inc()
        return decision

    async def _give_up(
        self,
        call: Message,
        policy: MethodPolicy,
        client_transport: Transport,
        outcome: Outcome,
        reply: Message | None,
        error: UpstreamError | None,
        attempts: int,
    ) -> tuple[str, Wire | None]:
        """The last attempt failed for good: a fallback, the upstream's own reply, or an error."""
        if call.header.type == MessageType.ONEWAY:
            return outcome.value, None
        served = await self.fallbacks.find(policy, call, RETRIES_EXHAUSTED)
        if served is not None:
            self.metrics.fallback_replies.labels(policy.label, served.source).inc()
            return FALLBACK, frame(served.message, client_transport)
        if reply is not None:  # the upstream answered, with an error of its own: pass it on
            reply.set_seqid(call.header.seqid)
            return outcome.value, reply.to_wire(client_transport)
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        reason = str(error) if error is not None else outcome.value
        if RETRIES_EXHAUSTED in self.fallbacks.serve_on:
            tries += f", no fallback for {policy.display_name}"
        return outcome.value, self._error(
            call,
            policy,
            client_transport,
            ApplicationExceptionType.INTERNAL_ERROR,
            f"{reason}{tries}",
        )

    async def _unanswered(
        self,
        call: Message,
        policy: MethodPolicy,
        client_transport: Transport,
        reason: str,
        outcome_label: str,
        why: str,
    ) -> tuple[str, Wire | None]:
        """No attempt could be made: serve a fallback, or say why not."""
        if call.header.type == MessageType.ONEWAY:
            log.debug("dropping oneway %s: %s", policy.display_name, why)
            return outcome_label, None
        served = await self.fallbacks.find(policy, call, reason)
        if served is not None:
            self.metrics.fallback_replies.labels(policy.label, served.source).inc()
            return FALLBACK, frame(served.message, client_transport)
        return outcome_label, self._error(
            call,
            policy,
            client_transport,
            ApplicationExceptionType.INTERNAL_ERROR,
            f"{why}, no fallback for {policy.display_name}",
        )

    def _error(
        self,
        call: Message,
        policy: MethodPolicy,
        client_transport: Transport,
        exc_type: ApplicationExceptionType,
        text: str,
    ) -> Wire:
        header = call.header
        message = encode_application_exception(
            policy.method, header.seqid, exc_type, text, header.strict
        )
        return frame(message, client_transport)

    def _ejected(self, address: str) -> None:
        self.metrics.upstream_ejections.labels(address).inc()
        log.warning("upstream address %s ejected after repeated failures", address)
