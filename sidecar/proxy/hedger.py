"""The hedging of one call: its timer, its extra attempts, and the hand-over of the losers.

A `Call` of a hedged method (a two-way method with a `HedgePlan`,
docs/hedging.md) owns one `Hedger`, made once the call is admitted; any
other call has none, and each of its steps pays one ``is None`` check. The
call keeps the decisions that are the call's: what an answer or a failure
means, waiting for another attempt, retrying, giving up, the fallback. The
hedger keeps:

- the timer: armed when the call sends an attempt (`sent`), for the plan's
  delay; when it fires with the attempt still waiting (`due`), a hedge goes
  out, and the timer is armed again while the plan allows more at once;
- the hedge budget: the call's deposit, and one token per hedge;
- the extra attempts in flight (`HedgeAttempt`): an address not tried yet
  where there is one, an idle or a new connection, a copy of the outgoing
  message with a seqid of its own (`hedge_copy`);
- the end: once the call is answered, every attempt still in flight has
  lost and is handed over to be read and dropped (`end`,
  `sidecar.proxy.hedge`); once the call is cancelled, every hedge is
  abandoned (`abandon`).

Results come back through the call's guarded entry points: a hedge's reply
or error (`HedgeOwner`), the timer (`HedgedCall.hedge_due`) and a hedge's
connection task (`HedgedCall.hedge_connected`). A bug in a hedge step is
therefore caught like a bug in any other step of the call: the call answers
INTERNAL_ERROR and releases every attempt.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Final, Protocol

from sidecar.errors import UpstreamClosed, UpstreamError
from sidecar.protocol.envelope import Protocol as WireProtocol
from sidecar.protocol.framing import Message, Transport
from sidecar.proxy.context import CallContext
from sidecar.proxy.hedge import (
    TIMER_STEP,
    HedgeAttempt,
    HedgeOwner,
    HedgePlan,
    LateAttempt,
    hedge_copy,
)
from sidecar.proxy.policy import MethodPolicy
from sidecar.proxy.translate import set_theader_headers
from sidecar.proxy.upstream import UpstreamConnection

# Bound once: a name imported from an interpreted module is looked up by name
# on every use in the compiled build, a Final one read from a C static.
perf_counter: Final = time.perf_counter

log: Final = logging.getLogger("sidecar.pipeline")


class HedgedCall(HedgeOwner, Protocol):
    """What a hedger needs of its call (`sidecar.proxy.call.Call`)."""

    @property
    def finished(self) -> bool: ...

    def hedge_due(self) -> None:
        """The hedge timer fired: the call asks its hedger (`Hedger.due`)."""

    def hedge_connected(self, hedge: HedgeAttempt, task: asyncio.Task[UpstreamConnection]) -> None:
        """A connection for ``hedge`` was opened or freed (or not): `Hedger.connected`."""


class Hedger:
    """The hedges of one call: timer, budget, extra attempts in flight, losers.

    Args:
        call: the call hedged.
        ctx: its context (the hedge budget and answer times are ``ctx.hedging``).
        policy: its method.
        plan: the method's hedge plan.
        outgoing: the message the call sends upstream (each hedge sends a copy).
        transport: the upstream transport of the call's attempts.
        protocol: the upstream protocol of the call's attempts.
        deadline_at: loop time of the call's deadline.
        tried: the addresses the call has tried, shared with it (a hedge adds its own).
        probe: the call is a half-open probe: a single attempt, never hedged.
        now: loop time when the call started (its deposit in the hedge budget).
    """

    __slots__ = (
        "_attempt",
        "_call",
        "_ctx",
        "_deadline_at",
        "_due_at",
        "_hedges",
        "_outgoing",
        "_plan",
        "_policy",
        "_probe",
        "_protocol",
        "_sent_at",
        "_started_try",
        "_timer",
        "_transport",
        "_tried",
        "hedges_sent",
    )

    def __init__(
        self,
        call: HedgedCall,
        ctx: CallContext,
        policy: MethodPolicy,
        plan: HedgePlan,
        outgoing: Message,
        transport: Transport,
        protocol: WireProtocol,
        deadline_at: float,
        tried: list[str],
        probe: bool,
        now: float,
    ) -> None:
        self._call = call
        self._ctx = ctx
        self._policy = policy
        self._plan = plan
        self._outgoing = outgoing
        self._transport = transport
        self._protocol = protocol
        self._deadline_at = deadline_at
        self._tried = tried
        self._probe = probe
        self._timer: asyncio.TimerHandle | None = None
        self._due_at = 0.0  # perf_counter before which the armed hedge must not go
        self._hedges: list[HedgeAttempt] = []  # the extra attempts in flight
        self._sent_at = 0.0  # perf_counter when the call's own attempt was written
        self._attempt = 0  # the call's attempt number when it was sent
        # Hedges written so far. Each copy of the call tells a THeader upstream its
        # own number: the call's attempts and the hedges before it, counted together.
        self.hedges_sent = 0
        self._started_try = 0.0  # loop time when that attempt began
        ctx.hedging.budget.deposit(now)

    @property
    def in_flight(self) -> bool:
        """A hedge is sent or being connected, and not answered yet."""
        return bool(self._hedges)

    def sent(self, attempt: int, started_try: float) -> None:
        """The call's attempt number ``attempt`` (begun at loop time ``started_try``) was sent."""
        self._sent_at = perf_counter()
        self._attempt = attempt
        self._started_try = started_try
        self._arm()

    def _arm(self) -> None:
        """Hedge once the plan's delay has passed without an answer."""
        plan = self._plan
        if self._timer is not None or len(self._hedges) >= plan.max_extra:
            return
        if self._probe:  # a half-open probe is a single attempt
            return
        ctx = self._ctx
        policy = self._policy
        if not ctx.oneway.is_two_way(policy.name):  # never answered yet: maybe oneway
            return
        delay = ctx.hedging.delay(plan, policy.label)
        if ctx.loop.time() + delay < self._deadline_at:
            self._due_at = perf_counter() + delay
            self._timer = ctx.loop.call_later(delay, self._call.hedge_due)

    def stop_timer(self) -> None:
        """No hedge of the attempt in flight (it failed; the call decides what next)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def due(self, waiting: bool) -> None:
        """The timer fired: send the call again on another connection, budget allowing.

        ``waiting``: the call's own attempt is still in flight.
        """
        self._timer = None
        call = self._call
        if call.finished or not (waiting or self._hedges):
            return
        ctx = self._ctx
        early = self._due_at - perf_counter()
        if early > 0:  # the loop's timer ran early (see `TIMER_STEP`): not yet
            self._timer = ctx.loop.call_later(max(early, TIMER_STEP), call.hedge_due)
            return
        policy = self._policy
        now = ctx.loop.time()
        timeout = min(policy.retry.per_try_timeout, self._deadline_at - now)
        if timeout <= 0:
            return
        budget = ctx.hedging.budget
        if budget.balance(now) < 1.0:
            ctx.metrics.hedge_budget_exhausted.labels(policy.label).inc()
            return
        budget.withdraw(now)
        pool = ctx.upstreams.pick(self._transport, self._tried, self._protocol, rotate=False)
        self._tried.append(pool.address)
        hedge = HedgeAttempt(call, pool, now, now + timeout)
        self._hedges.append(hedge)
        ctx.metrics.hedges.labels(policy.label).inc()
        log.debug(
            "hedging %s on %s after %.3fs",
            policy.display_name,
            pool.address,
            now - self._started_try,
        )
        conn = pool.idle()
        if conn is not None:
            self._send(hedge, conn)
        else:
            task = ctx.loop.create_task(pool.acquire(timeout))
            hedge.task = task
            task.add_done_callback(functools.partial(call.hedge_connected, hedge))
        if not call.finished:
            self._arm()  # the next extra attempt, if the plan allows more at once

    def connected(self, hedge: HedgeAttempt, task: asyncio.Task[UpstreamConnection]) -> None:
        """A connection for ``hedge`` was opened or freed (or not)."""
        hedge.task = None
        if task.cancelled():
            self.ended(hedge)
            return
        error = task.exception()
        if self._call.finished or hedge.owner is None:  # lost or cancelled meanwhile
            if error is None:
                hedge.pool.release(task.result(), True)
            return
        if error is None:
            self._send(hedge, task.result())
        elif isinstance(error, UpstreamError):
            self._call.on_hedge_error(hedge, error)
        else:
            raise error

    def _send(self, hedge: HedgeAttempt, conn: UpstreamConnection) -> None:
        """Write a copy of the call on ``conn`` (the copy gets this connection's seqid)."""
        if conn.closed:
            address = hedge.pool.address
            error = UpstreamClosed(
                f"upstream {address} closed the connection before the call was sent",
                address=address,
                sent=False,
            )
            self._call.on_hedge_error(hedge, error)
            return
        hedge.conn = conn  # from here the hedge holds it (released by `abandon` after a bug)
        outgoing = hedge_copy(self._outgoing)
        self.hedges_sent += 1
        if outgoing.theader is not None:
            left = self._deadline_at - self._ctx.loop.time()
            set_theader_headers(outgoing, self._attempt + self.hedges_sent, int(left * 1000))
        hedge.sent_at = perf_counter()
        conn.send(outgoing, hedge, hedge.expires, hedge.expires - hedge.started)

    def ended(self, hedge: HedgeAttempt) -> None:
        """``hedge`` is no longer in flight (answered or failed)."""
        hedges = self._hedges
        if hedge in hedges:
            hedges.remove(hedge)

    def answered(self, winner: HedgeAttempt | None) -> None:
        """An attempt answered the call (``winner``: a hedge; None: the call's own)."""
        ctx = self._ctx
        policy = self._policy
        sent_at = self._sent_at if winner is None else winner.sent_at
        ctx.hedging.record(self._plan, policy.label, perf_counter() - sent_at)
        if winner is not None:
            ctx.metrics.hedges_won.labels(policy.label).inc()

    def end(self, conn: UpstreamConnection | None) -> None:
        """The call is answered: every attempt still in flight lost (`sidecar.proxy.hedge`).

        ``conn``: the connection of the call's own attempt if it is still in
        flight; its reply is read and dropped before the connection goes back.
        """
        self.stop_timer()
        ctx = self._ctx
        policy = self._policy
        if conn is not None:
            conn.hand_over(self._call, LateAttempt(ctx, policy, conn.pool.address, self._sent_at))
        hedges, self._hedges = self._hedges, []
        for hedge in hedges:
            hedge.lose(ctx, policy)

    def abandon(self) -> None:
        """The call was cancelled (or crashed): no timer, every hedge's connection closed."""
        self.stop_timer()
        hedges, self._hedges = self._hedges, []
        for hedge in hedges:
            hedge.abandon()
