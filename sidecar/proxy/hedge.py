"""Hedged calls: the extra attempts of a call, the losers, and the shared hedging state.

A call of a hedged method (`HedgePlan`, resolved per method by
`sidecar.proxy.policy`) arms a loop timer when it sends an attempt; if no
answer has come when it fires, its `Hedger` (`sidecar.proxy.hedger`) sends
the same message again as a `HedgeAttempt` on another connection (another
address when there is one), if the hedge budget has a token. The first
answer wins; every other attempt still in flight becomes a loser:

- its connection is kept, not closed: the loser's reply is read when it comes
  and dropped (`LateAttempt`), and only then does the connection go back to
  the pool (`UpstreamConnection.hand_over`), so a stray reply can never be
  taken for another call's; its per-try timeout still applies and closes the
  connection as for any attempt;
- its result is still recorded where attempts are recorded: the address's
  ejection tracker, ``upstream_attempts_total``, and, for an answer, the
  method's answer times (the window a ``pNN`` delay reads).

`Hedging` is what outlives a reload: the hedge budget (a `RetryBudget` with the
hedge settings: each call of a hedged method deposits ``ratio``, each hedge
withdraws one) and the per-method `LatencyWindow` of answer times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from sidecar.config.hedge import HedgeDelay
from sidecar.errors import UpstreamError, UpstreamProtocolError
from sidecar.protocol.fields import first_field_id
from sidecar.protocol.framing import Message
from sidecar.proxy.upstream import ReplyHandler
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.latency import LatencyWindow
from sidecar.resilience.outcome import Outcome, classify_error, classify_reply

# Bound once: a name imported from an interpreted module is looked up by name
# on every use in the compiled build, a Final one read from a C static.
perf_counter: Final = time.perf_counter

if TYPE_CHECKING:
    from sidecar.metrics import MethodStats
    from sidecar.proxy.balancer import UpstreamSet
    from sidecar.proxy.upstream import UpstreamConnection, UpstreamPool

_ANSWERS: Final = frozenset({Outcome.OK, Outcome.DECLARED_EXCEPTION, Outcome.APP_EXCEPTION})
_DECLARED: Final = Outcome.DECLARED_EXCEPTION

# The event loop's timers run in whole milliseconds on uvloop (libuv): a delay
# is rounded to the nearest millisecond and counted from the loop's clock as
# cached when the iteration began, so a timer may fire up to about a
# millisecond before its delay has passed since the send. Measured here with a
# p95 delay of well under a millisecond, that sent a hedge for about one call
# in ten instead of one in twenty. The call checks the delay against
# `perf_counter` when its timer fires and, if it is early, waits again, for at
# least this long (so a hedge goes at most about this much late).
TIMER_STEP: Final = 0.001

# Most methods with a window of answer times: method labels are capped by
# metrics.max_method_labels already; this bounds the table if that grows.
MAX_WINDOWS: Final = 10_000


@dataclass(frozen=True, slots=True)
class HedgePlan:
    """How one method hedges: after ``delay``, up to ``max_extra`` extra attempts at once."""

    delay: HedgeDelay
    max_extra: int


class Hedging:
    """The hedge budget and the methods' answer times; kept across reloads.

    Args:
        budget: the hedge budget of the upstream.
        samples: answer times kept per method.
        min_samples: answer times needed before a percentile is used.
        initial_delay: the delay of a percentile plan until then.
    """

    def __init__(
        self, budget: RetryBudget, samples: int, min_samples: int, initial_delay: float
    ) -> None:
        self.budget = budget
        self.samples = samples
        self.min_samples = min_samples
        self.initial_delay = initial_delay
        self._windows: dict[str, LatencyWindow] = {}

    def reconfigured(
        self, budget: RetryBudget, samples: int, min_samples: int, initial_delay: float
    ) -> Hedging:
        """The state for a new config: the same windows unless their size changed."""
        new = Hedging(budget, samples, min_samples, initial_delay)
        if samples == self.samples and min_samples == self.min_samples:
            new._windows = self._windows
        return new

    def delay(self, plan: HedgePlan, label: str) -> float:
        """Seconds to wait for an answer before hedging a call of ``label``."""
        fixed = plan.delay.seconds
        if fixed is not None:
            return fixed
        assert plan.delay.percentile is not None
        window = self._windows.get(label)
        value = None if window is None else window.percentile(plan.delay.percentile)
        return self.initial_delay if value is None else value

    def record(self, plan: HedgePlan, label: str, seconds: float) -> None:
        """One answer time of ``label`` (kept only for a percentile plan)."""
        if plan.delay.percentile is None:
            return
        window = self._windows.get(label)
        if window is None:
            if len(self._windows) >= MAX_WINDOWS:
                return
            window = self._windows[label] = LatencyWindow(self.samples, self.min_samples)
        window.add(seconds)

    def window(self, label: str) -> LatencyWindow | None:
        """The answer times of ``label``, if any were kept."""
        return self._windows.get(label)

    def describe(self, now: float, plans: dict[str, HedgePlan]) -> dict[str, Any]:
        """The ``hedging`` part of ``/state``: budget tokens, and each plan's delay now."""
        return {
            "tokens": round(self.budget.balance(now), 3),
            "delays_seconds": {
                label: round(self.delay(plan, label), 6) for label, plan in sorted(plans.items())
            },
            "samples": {label: len(w) for label, w in sorted(self._windows.items())},
        }


def hedge_copy(message: Message) -> Message:
    """A copy of an outgoing call with bytes of its own.

    Each attempt's seqid is patched into the bytes it is written from; a
    transport may still hold the first attempt's bytes when the hedge is
    written, so the hedge must not patch them.
    """
    theader = message.theader
    if theader is not None:
        theader = dataclasses.replace(theader, headers=dict(theader.headers))
    return Message(message.header, bytearray(message.buf), message.start, theader)


class CallContext(Protocol):
    """What a loser's result is recorded in (`sidecar.proxy.context.CallContext`)."""

    @property
    def upstreams(self) -> UpstreamSet: ...

    @property
    def trip_on(self) -> frozenset[Outcome]: ...

    @property
    def hedging(self) -> Hedging: ...


class MethodPolicy(Protocol):
    """The loser's method (`sidecar.proxy.policy.MethodPolicy`)."""

    @property
    def label(self) -> str: ...

    @property
    def stats(self) -> MethodStats: ...

    @property
    def failure_exceptions(self) -> frozenset[int]: ...

    @property
    def hedge(self) -> HedgePlan | None: ...


class HedgeOwner(Protocol):
    """The call a hedge belongs to (`sidecar.proxy.call.Call`)."""

    def on_hedge_reply(self, hedge: HedgeAttempt, reply: Message) -> None: ...

    def on_hedge_error(self, hedge: HedgeAttempt, error: UpstreamError) -> None: ...


class LateAttempt(ReplyHandler):
    """`ReplyHandler` of an attempt that lost: its result is recorded, never delivered.

    Args:
        ctx: the loser's call context.
        policy: its method.
        address: the upstream address it went to.
        sent_at: `perf_counter` when it was sent.
    """

    __slots__ = ("address", "ctx", "policy", "sent_at")

    def __init__(
        self, ctx: CallContext, policy: MethodPolicy, address: str, sent_at: float
    ) -> None:
        self.ctx = ctx
        self.policy = policy
        self.address = address
        self.sent_at = sent_at

    def on_reply(self, reply: Message) -> None:
        """The loser's reply: recorded and dropped (the connection is back in the pool)."""
        header = reply.header
        outcome = classify_reply(header.type, reply.body(), header.protocol)
        policy = self.policy
        failed = outcome in self.ctx.trip_on
        if outcome is _DECLARED and policy.failure_exceptions:
            failed = first_field_id(reply.body(), header.protocol) in policy.failure_exceptions
        if outcome in _ANSWERS and policy.hedge is not None:
            self.ctx.hedging.record(policy.hedge, policy.label, perf_counter() - self.sent_at)
        self._recorded(outcome, failed)

    def on_error(self, error: UpstreamError) -> None:
        """The loser failed (timed out, closed): recorded; its connection is closed."""
        outcome = classify_error(error)
        self._recorded(outcome, outcome in self.ctx.trip_on)

    def on_no_reply(self) -> None:
        """Not for a two-way method (only those hedge): nothing to record."""

    def _recorded(self, outcome: Outcome, failed: bool) -> None:
        self.ctx.upstreams.record(self.address, failed)
        self.policy.stats.attempt(self.address, outcome.value)


class HedgeAttempt(ReplyHandler):
    """One extra attempt of a call: its pool, connection or pending connect, its timeout.

    While its call waits it is the `ReplyHandler` of its connection and hands
    the result to the call; once it has lost (`lose`) it records the result
    as a `LateAttempt` does.
    """

    __slots__ = ("conn", "expires", "late", "owner", "pool", "sent_at", "started", "task")

    def __init__(
        self, owner: HedgeOwner, pool: UpstreamPool, started: float, expires: float
    ) -> None:
        self.owner: HedgeOwner | None = owner
        self.pool = pool
        self.started = started  # loop time
        self.expires = expires  # loop time
        self.sent_at = 0.0  # perf_counter when written
        self.conn: UpstreamConnection | None = None
        self.task: asyncio.Task[UpstreamConnection] | None = None
        self.late: LateAttempt | None = None

    @property
    def waiting(self) -> bool:
        """Sent or being connected, and not answered yet."""
        return self.conn is not None or self.task is not None

    def on_reply(self, reply: Message) -> None:
        self.conn = None
        if self.late is not None:
            self.late.on_reply(reply)
        elif self.owner is not None:
            self.owner.on_hedge_reply(self, reply)

    def on_error(self, error: UpstreamError) -> None:
        self.conn = None
        if self.late is not None:
            self.late.on_error(error)
        elif self.owner is not None:
            self.owner.on_hedge_error(self, error)

    def on_no_reply(self) -> None:
        """Cannot happen (nothing is sent behind a hedge); a failure if it does."""
        address = self.pool.address
        self.on_error(
            UpstreamProtocolError(
                f"upstream {address} answered a later call first", address=address, sent=True
            )
        )

    def lose(self, ctx: CallContext, policy: MethodPolicy) -> None:
        """Another attempt won: keep the connection until this one's reply is read and dropped."""
        self.owner = None
        if self.task is not None:  # not sent yet: never will be
            self.task.cancel()
            self.task = None
        if self.conn is not None:
            self.late = LateAttempt(ctx, policy, self.pool.address, self.sent_at)

    def abandon(self) -> None:
        """The call was cancelled: close the connection (a late reply dies with it)."""
        self.owner = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abandon(self)
