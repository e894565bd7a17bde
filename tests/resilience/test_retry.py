"""RetryPolicy.decide: every rule of its docstring, in its order, with a fake clock value."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.backoff import Backoff
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.outcome import Outcome
from sidecar.resilience.retry import (
    ATTEMPTS,
    BUDGET,
    CIRCUIT_OPEN,
    DEADLINE,
    NOT_RETRYABLE,
    PROBE,
    UNSAFE,
    GiveUp,
    Retry,
    RetryPolicy,
)

NOW = 1_000.0  # a fake monotonic clock value; nothing here reads a real clock
BACKOFF = Backoff(initial=0.1, multiplier=2.0, maximum=1.0)
IO_OUTCOMES = frozenset(
    {Outcome.CONNECT_ERROR, Outcome.CONNECTION_CLOSED, Outcome.TIMEOUT, Outcome.PROTOCOL_ERROR}
)
ANSWERS = (Outcome.OK, Outcome.DECLARED_EXCEPTION, Outcome.APP_EXCEPTION)


def make_policy(
    *,
    max_attempts: int = 3,
    retry_on: frozenset[Outcome] = IO_OUTCOMES,
    idempotent: bool = True,
    backoff: Backoff = BACKOFF,
) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=max_attempts,
        backoff=backoff,
        per_try_timeout=1.0,
        deadline=5.0,
        retry_on=retry_on,
        idempotent=idempotent,
    )


def full_budget() -> RetryBudget:
    return RetryBudget(ratio=0.2, min_retries_per_second=100.0, window=10.0)


def empty_budget() -> RetryBudget:
    return RetryBudget(ratio=0.2, min_retries_per_second=0.0, window=10.0)


def decide(
    policy: RetryPolicy,
    *,
    attempt: int = 1,
    outcome: Outcome = Outcome.CONNECTION_CLOSED,
    sent: bool = True,
    oneway: bool = False,
    now: float = NOW,
    deadline_at: float = NOW + 100.0,
    seed: int = 1,
    budget: RetryBudget | None = None,
    probe: bool = False,
    circuit_open: bool = False,
) -> Retry | GiveUp:
    """Decide as a call does: the balance goes in, a Retry takes its token."""
    decision = policy.decide(
        attempt=attempt,
        outcome=outcome,
        sent=sent,
        oneway=oneway,
        now=now,
        deadline_at=deadline_at,
        rng=random.Random(seed),
        tokens=budget.balance(now) if budget is not None else 1e9,
        probe=probe,
        circuit_open=circuit_open,
    )
    if budget is not None and isinstance(decision, Retry):
        budget.withdraw(now)
    return decision


# Rule 1: only outcomes in retry_on are retried.


@pytest.mark.parametrize("outcome", list(Outcome))
def test_only_listed_outcomes_are_retried(outcome: Outcome) -> None:
    policy = make_policy()
    decision = decide(policy, outcome=outcome, sent=False)
    if outcome in IO_OUTCOMES:
        assert isinstance(decision, Retry)
    else:
        assert decision == GiveUp(NOT_RETRYABLE)


@pytest.mark.parametrize("outcome", ANSWERS)
def test_answers_are_not_retried_with_every_failure_listed(outcome: Outcome) -> None:
    # The config refuses answers in retry_on (test_outcome.py), so this is the widest policy.
    policy = make_policy(retry_on=frozenset(Outcome) - set(ANSWERS))
    assert decide(policy, outcome=outcome, sent=False) == GiveUp(NOT_RETRYABLE)


def test_internal_error_only_when_listed() -> None:
    assert decide(make_policy(), outcome=Outcome.INTERNAL_ERROR) == GiveUp(NOT_RETRYABLE)
    listed = make_policy(retry_on=IO_OUTCOMES | {Outcome.INTERNAL_ERROR})
    assert isinstance(decide(listed, outcome=Outcome.INTERNAL_ERROR), Retry)
    # ... and still only if safe to repeat: an internal error means the call was sent.
    unsafe = make_policy(retry_on=IO_OUTCOMES | {Outcome.INTERNAL_ERROR}, idempotent=False)
    assert decide(unsafe, outcome=Outcome.INTERNAL_ERROR) == GiveUp(UNSAFE)


def test_not_retryable_comes_before_every_other_rule() -> None:
    policy = make_policy(max_attempts=1, idempotent=False)
    decision = decide(
        policy,
        attempt=5,
        outcome=Outcome.INTERNAL_ERROR,
        sent=True,
        oneway=True,
        deadline_at=NOW - 1,
        budget=empty_budget(),
    )
    assert decision == GiveUp(NOT_RETRYABLE)


# Rule 2: max_attempts, the first attempt included.


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 7])
def test_no_attempt_beyond_max_attempts(max_attempts: int) -> None:
    policy = make_policy(max_attempts=max_attempts)
    retried = [
        n for n in range(1, max_attempts + 3) if isinstance(decide(policy, attempt=n), Retry)
    ]
    assert retried == list(range(1, max_attempts))
    assert decide(policy, attempt=max_attempts) == GiveUp(ATTEMPTS)
    assert decide(policy, attempt=max_attempts + 1) == GiveUp(ATTEMPTS)


def test_attempts_come_before_safety() -> None:
    policy = make_policy(max_attempts=2, idempotent=False)
    assert decide(policy, attempt=2, sent=True, deadline_at=NOW - 1) == GiveUp(ATTEMPTS)


# Rule 3: safe to repeat.


@pytest.mark.parametrize(
    ("sent", "idempotent", "oneway", "retried"),
    [
        (False, True, False, True),
        (False, False, False, True),  # never left the sidecar: any method
        (False, True, True, True),  # oneway too
        (False, False, True, True),
        (True, True, False, True),  # sent: only idempotent two-way calls
        (True, False, False, False),
        (True, True, True, False),  # a sent oneway call may have been executed
        (True, False, True, False),
    ],
)
@pytest.mark.parametrize("outcome", sorted(IO_OUTCOMES))
def test_safe_to_repeat(
    sent: bool, idempotent: bool, oneway: bool, retried: bool, outcome: Outcome
) -> None:
    policy = make_policy(idempotent=idempotent)
    decision = decide(policy, outcome=outcome, sent=sent, oneway=oneway)
    if retried:
        assert isinstance(decision, Retry)
    else:
        assert decision == GiveUp(UNSAFE)


def test_safety_comes_before_the_deadline() -> None:
    policy = make_policy(idempotent=False)
    assert decide(policy, sent=True, deadline_at=NOW) == GiveUp(UNSAFE)


# Rule 4: no wait starts that cannot end before the deadline.


@pytest.mark.parametrize("attempt", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2, 99])
def test_wait_is_the_backoff_of_this_attempt(attempt: int, seed: int) -> None:
    policy = make_policy(max_attempts=10)
    expected = BACKOFF.wait(attempt, random.Random(seed))
    assert decide(policy, attempt=attempt, seed=seed) == Retry(expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_deadline_boundary(seed: int) -> None:
    policy = make_policy()
    wait = random.Random(seed).uniform(0.0, BACKOFF.cap(1))
    # A wait that ends exactly at the deadline cannot end before it.
    assert decide(policy, seed=seed, deadline_at=NOW + wait) == GiveUp(DEADLINE)
    assert decide(policy, seed=seed, deadline_at=NOW + wait / 2) == GiveUp(DEADLINE)
    after = NOW + wait + 1e-9
    assert decide(policy, seed=seed, deadline_at=after) == Retry(wait)


def test_a_deadline_already_past_gives_up() -> None:
    policy = make_policy()
    assert decide(policy, deadline_at=NOW - 0.001) == GiveUp(DEADLINE)
    zero_wait = make_policy(backoff=Backoff(initial=0.0, multiplier=2.0, maximum=0.0))
    assert decide(zero_wait, deadline_at=NOW) == GiveUp(DEADLINE)
    assert decide(zero_wait, deadline_at=NOW + 1e-6) == Retry(0.0)


def test_deadline_uses_the_clock_value_passed_in() -> None:
    policy = make_policy()
    wait = random.Random(5).uniform(0.0, BACKOFF.cap(1))
    deadline_at = 50.0
    assert decide(policy, seed=5, now=deadline_at - wait - 0.01, deadline_at=deadline_at) == Retry(
        wait
    )
    assert decide(policy, seed=5, now=deadline_at - wait, deadline_at=deadline_at) == GiveUp(
        DEADLINE
    )


# Rule 5: the budget, consulted only when every other rule allows.


def test_budget_refusal_gives_up() -> None:
    budget = empty_budget()
    assert decide(make_policy(), budget=budget) == GiveUp(BUDGET)
    assert decide(make_policy(), budget=budget, sent=False) == GiveUp(BUDGET)


def test_a_retry_takes_one_token() -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.3, window=10.0)  # 3 tokens
    decisions = [decide(make_policy(), budget=budget) for _ in range(5)]
    assert [isinstance(d, Retry) for d in decisions] == [True, True, True, False, False]
    assert budget.balance(NOW) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("reason", "kwargs"),
    [
        (NOT_RETRYABLE, {"outcome": Outcome.OK}),
        (NOT_RETRYABLE, {"outcome": Outcome.INTERNAL_ERROR}),
        (ATTEMPTS, {"attempt": 3}),
        (UNSAFE, {"oneway": True}),
        (DEADLINE, {"deadline_at": NOW}),
    ],
)
def test_a_retry_refused_for_another_reason_takes_no_token(
    reason: str, kwargs: dict[str, object]
) -> None:
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)  # 1 token
    before = budget.balance(NOW)
    assert decide(make_policy(), budget=budget, **kwargs) == GiveUp(reason)  # type: ignore[arg-type]
    assert budget.balance(NOW) == before
    # The one token is still there for a retry that is allowed.
    assert isinstance(decide(make_policy(), budget=budget), Retry)
    assert decide(make_policy(), budget=budget) == GiveUp(BUDGET)


def test_no_budget_means_no_budget_rule() -> None:
    policy = make_policy(max_attempts=100)
    assert all(isinstance(decide(policy, attempt=n, budget=None), Retry) for n in range(1, 99))


# The whole rule list as a model, over every combination.


def expected_decision(
    policy: RetryPolicy,
    *,
    attempt: int,
    outcome: Outcome,
    sent: bool,
    oneway: bool,
    wait: float,
    deadline_at: float,
    tokens: bool,
) -> str | None:
    """The docstring's rules, in order; None means Retry."""
    if outcome not in policy.retry_on:
        return NOT_RETRYABLE
    if attempt >= policy.max_attempts:
        return ATTEMPTS
    if sent and (oneway or not policy.idempotent):
        return UNSAFE
    if NOW + wait >= deadline_at:
        return DEADLINE
    if not tokens:
        return BUDGET
    return None


@given(
    outcome=st.sampled_from(list(Outcome)),
    attempt=st.integers(min_value=1, max_value=6),
    max_attempts=st.integers(min_value=1, max_value=5),
    sent=st.booleans(),
    oneway=st.booleans(),
    idempotent=st.booleans(),
    internal=st.booleans(),
    deadline_in=st.sampled_from([-1.0, 0.0, 0.05, 0.15, 10.0]),
    tokens=st.booleans(),
    seed=st.integers(min_value=0, max_value=1000),
)
@settings(max_examples=400, deadline=None)
def test_rules_in_docstring_order(
    outcome: Outcome,
    attempt: int,
    max_attempts: int,
    sent: bool,
    oneway: bool,
    idempotent: bool,
    internal: bool,
    deadline_in: float,
    tokens: bool,
    seed: int,
) -> None:
    retry_on = IO_OUTCOMES | ({Outcome.INTERNAL_ERROR} if internal else set())
    policy = make_policy(
        max_attempts=max_attempts, retry_on=frozenset(retry_on), idempotent=idempotent
    )
    budget = RetryBudget(0.2, 0.1, 10.0) if tokens else empty_budget()  # 1 token or none
    before = budget.balance(NOW)
    wait = BACKOFF.wait(attempt, random.Random(seed))
    deadline_at = NOW + deadline_in
    decision = decide(
        policy,
        attempt=attempt,
        outcome=outcome,
        sent=sent,
        oneway=oneway,
        deadline_at=deadline_at,
        seed=seed,
        budget=budget,
    )
    reason = expected_decision(
        policy,
        attempt=attempt,
        outcome=outcome,
        sent=sent,
        oneway=oneway,
        wait=wait,
        deadline_at=deadline_at,
        tokens=tokens,
    )
    if reason is None:
        assert decision == Retry(wait)
        assert budget.balance(NOW) == pytest.approx(before - 1)
    else:
        assert decision == GiveUp(reason)
        assert budget.balance(NOW) == before


def test_every_combination_of_the_boolean_rules() -> None:
    # Exhaustive over the flags (the hypothesis test above samples the same space).
    seen: set[str | None] = set()
    for sent, oneway, idempotent, tokens in itertools.product([False, True], repeat=4):
        policy = make_policy(idempotent=idempotent)
        budget = full_budget() if tokens else empty_budget()
        decision = decide(policy, sent=sent, oneway=oneway, budget=budget)
        wait = BACKOFF.wait(1, random.Random(1))
        reason = expected_decision(
            policy,
            attempt=1,
            outcome=Outcome.CONNECTION_CLOSED,
            sent=sent,
            oneway=oneway,
            wait=wait,
            deadline_at=NOW + 100.0,
            tokens=tokens,
        )
        seen.add(reason)
        assert decision == (Retry(wait) if reason is None else GiveUp(reason))
    assert seen == {None, UNSAFE, BUDGET}


# Rules 1 and 2: a probe is one attempt; no retry into a circuit that opened.


@pytest.mark.parametrize("sent", [True, False])
def test_a_half_open_probe_is_never_retried(sent: bool) -> None:
    policy = make_policy(max_attempts=5)
    assert decide(policy, probe=True, sent=sent, outcome=Outcome.CONNECT_ERROR) == GiveUp(PROBE)
    assert isinstance(decide(policy, sent=sent, outcome=Outcome.CONNECT_ERROR), Retry)


def test_no_retry_into_a_circuit_that_opened_meanwhile() -> None:
    policy = make_policy(max_attempts=5)
    assert decide(policy, circuit_open=True, sent=False) == GiveUp(CIRCUIT_OPEN)
    # The probe rule comes first.
    assert decide(policy, circuit_open=True, probe=True) == GiveUp(PROBE)


def test_deciding_spends_nothing_by_itself() -> None:
    """The decision is a pure function: the caller takes the token."""
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10.0)  # 1 token
    policy = make_policy()
    for _ in range(3):
        decision = policy.decide(
            attempt=1,
            outcome=Outcome.CONNECTION_CLOSED,
            sent=False,
            oneway=False,
            now=NOW,
            deadline_at=NOW + 100.0,
            rng=random.Random(1),
            tokens=budget.balance(NOW),
        )
        assert isinstance(decision, Retry)
    assert budget.balance(NOW) == pytest.approx(1.0)
    assert policy.decide(
        attempt=1,
        outcome=Outcome.CONNECTION_CLOSED,
        sent=False,
        oneway=False,
        now=NOW,
        deadline_at=NOW + 100.0,
        rng=random.Random(1),
        tokens=0.999,
    ) == GiveUp(BUDGET)
