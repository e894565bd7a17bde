"""Retry policy: after an attempt, decide whether to retry and how long to wait.

The policy is plain data and one pure function, `RetryPolicy.decide`, which
returns `Retry(wait)` or `GiveUp(reason)`; the pipeline does the awaiting (the
split tenacity makes between ``iter()`` and its drivers). Rules of this file,
checked in this order:

1. only outcomes listed in ``retry_on`` are retried (ok, declared and
   application exceptions never are: they are answers);
2. no attempt beyond ``max_attempts`` (the first one included);
3. safe to repeat: a call that provably never left the sidecar (nothing was
   sent) always is, whatever the method, ``oneway`` included; a call that was
   sent only when its method is idempotent and it is not ``oneway``;
4. no wait starts that cannot end before the deadline;
5. the retry budget has a token.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.resilience.backoff import Backoff, UniformSource
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.outcome import Outcome


@dataclass(frozen=True, slots=True)
class Retry:
    """Wait ``wait`` seconds, then attempt again."""

    wait: float


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Return the last outcome to the client. ``reason`` is a bounded metrics label."""

    reason: str


# GiveUp reasons, also the values of the retries metric's "reason" label.
NOT_RETRYABLE = "not_retryable"
UNSAFE = "unsafe"
ATTEMPTS = "attempts_exhausted"
DEADLINE = "deadline"
BUDGET = "budget_exhausted"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry settings for one method; times in seconds."""

    max_attempts: int
    backoff: Backoff
    per_try_timeout: float
    deadline: float
    retry_on: frozenset[Outcome]
    idempotent: bool

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
        budget: RetryBudget | None,
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
            budget: the upstream's retry budget; a token is taken only when
                every other rule allows the retry.
        """
        if outcome not in self.retry_on:
            return GiveUp(NOT_RETRYABLE)
        if attempt >= self.max_attempts:
            return GiveUp(ATTEMPTS)
        if sent and (oneway or not self.idempotent):
            return GiveUp(UNSAFE)
        wait = self.backoff.wait(attempt, rng)
        if now + wait >= deadline_at:
            return GiveUp(DEADLINE)
        if budget is not None and not budget.try_withdraw(now):
            return GiveUp(BUDGET)
        return Retry(wait)
