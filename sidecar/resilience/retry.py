"""Retry policy: after a failed attempt, decide whether to retry and how long to wait.

`RetryPolicy.decide` is one pure function of the facts about the failed
attempt: it returns `Retry(wait)` (wait, spend one budget token, attempt
again) or `GiveUp(reason)`; the caller does the waiting and the spending (the
split tenacity makes between ``iter()`` and its drivers). Rules of this file,
checked in this order:

1. a half-open probe is a single attempt;
2. no retry into a circuit that opened while the attempt was in flight;
3. only outcomes listed in ``retry_on`` are retried, and declared exceptions
   whose field id is in ``retry_exceptions`` (``retry_on_exceptions``, by
   name in the config); ok, application exceptions and other declared
   exceptions never are: they are answers;
4. no attempt beyond ``max_attempts`` (the first one included);
5. safe to repeat: a call that provably never left the sidecar (nothing was
   sent) always is, whatever the method, ``oneway`` included; a call that was
   sent only when its method is idempotent and it is not ``oneway``;
6. no wait starts that cannot end before the deadline;
7. the retry budget holds a whole token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sidecar.resilience.backoff import Backoff, UniformSource
from sidecar.resilience.outcome import Outcome


@dataclass(frozen=True, slots=True)
class Retry:
    """Take one token from the retry budget, wait ``wait`` seconds, attempt again."""

    wait: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Return the last outcome to the client. ``reason`` is a bounded metrics label."""

    reason: str


# GiveUp reasons, also the values of retries_given_up_total's "reason" label.
PROBE: Final = "probe"
CIRCUIT_OPEN: Final = "circuit_open"
NOT_RETRYABLE: Final = "not_retryable"
UNSAFE: Final = "unsafe"
ATTEMPTS: Final = "attempts_exhausted"
DEADLINE: Final = "deadline"
BUDGET: Final = "budget_exhausted"
GIVE_UP_REASONS: Final = (PROBE, CIRCUIT_OPEN, NOT_RETRYABLE, UNSAFE, ATTEMPTS, DEADLINE, BUDGET)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry settings for one method; times in seconds."""

    max_attempts: int
    backoff: Backoff
    per_try_timeout: float
    deadline: float
    retry_on: frozenset[Outcome]
    idempotent: bool
    retry_exceptions: frozenset[int] = frozenset()  # result field ids of declared exceptions

    def decide(
        self,
        *,
        attempt: int,
        outcome: Outcome,
        sent: bool,
        oneway: bool,
        now: float,
        deadline_at: float,
        rng: UniformSource,
        tokens: float,
        probe: bool = False,
        circuit_open: bool = False,
        exception_id: int | None = None,
    ) -> Retry | GiveUp:
        """Decide what follows attempt number ``attempt`` (1-based).

        Args:
            attempt: how many attempts have been made, this one included.
            outcome: what this attempt came to.
            sent: whether any byte of the call may have reached the upstream.
            oneway: whether the call is ``oneway``.
            now: the current time on the caller's monotonic clock.
            deadline_at: when the call's overall deadline expires, same clock.
            rng: random source for the jitter.
            tokens: the retry budget's balance now (`RetryBudget.balance`).
            probe: the call was let through as a half-open probe.
            circuit_open: the call's breaker is open now.
            exception_id: for a declared exception, the field id of the reply's
                result (its first field); None otherwise.

        Returns:
            `Retry`: the caller takes one budget token, waits, and attempts
            again; `GiveUp`: the caller answers with the last outcome.
        """
        if probe:
            return GiveUp(PROBE)
        if circuit_open:
            return GiveUp(CIRCUIT_OPEN)
        if outcome not in self.retry_on and not (
            outcome is Outcome.DECLARED_EXCEPTION and exception_id in self.retry_exceptions
        ):
            return GiveUp(NOT_RETRYABLE)
        if attempt >= self.max_attempts:
            return GiveUp(ATTEMPTS)
        if sent and (oneway or not self.idempotent):
            return GiveUp(UNSAFE)
        wait = self.backoff.wait(attempt, rng)
        if now + wait >= deadline_at:
            return GiveUp(DEADLINE)
        if tokens < 1.0:
            return GiveUp(BUDGET)
        return Retry(wait)
