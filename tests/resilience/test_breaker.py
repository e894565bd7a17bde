"""The breaker adapter over pybreaker: admission, probes, recording, transitions, shared storage.

The breaker takes a clock: every test here runs on a `FakeClock` and moves
time by hand, so the reset timeout is checked to the microsecond, with no
waiting and nothing reached inside pybreaker.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import pybreaker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    STATE_VALUES,
    Admission,
    Breaker,
    LocalStorage,
)

LONG = 3600.0  # a reset timeout no test lets pass by accident


class FakeClock:
    """Unix seconds that move only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Transitions:
    """Records on_transition calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.adopted: list[bool] = []

    def __call__(self, name: str, old: str, new: str, adopted: bool) -> None:
        self.calls.append((name, old, new))
        self.adopted.append(adopted)


def make(
    *,
    fail_max: int = 3,
    reset_timeout: float = LONG,
    success_threshold: int = 1,
    half_open_max_calls: int = 1,
    storage: pybreaker.CircuitBreakerStorage | None = None,
    on_transition: Transitions | None = None,
    name: str = "up",
    clock: FakeClock | None = None,
) -> Breaker:
    return Breaker(
        name,
        fail_max=fail_max,
        reset_timeout=reset_timeout,
        success_threshold=success_threshold,
        half_open_max_calls=half_open_max_calls,
        storage=storage,
        on_transition=on_transition,
        clock=clock or FakeClock(),
    )


def fail_once(breaker: Breaker) -> None:
    admission = breaker.admit()
    assert admission is Admission.CLOSED
    breaker.record(admission, failed=True)


def admit_probe(breaker: Breaker) -> Admission:
    admission = breaker.admit()
    assert admission is Admission.PROBE
    return admission


def open_breaker(breaker: Breaker) -> None:
    for _ in range(breaker.fail_max):
        fail_once(breaker)
    assert breaker.state == STATE_OPEN


def to_half_open(breaker: Breaker) -> Admission:
    """Let the open period end now (on the breaker's clock); returns the first probe."""
    probe_in = breaker.probe_in()
    assert probe_in is not None
    clock = breaker._clock
    assert isinstance(clock, FakeClock)
    clock.advance(probe_in)
    admission = breaker.admit()
    assert admission is Admission.PROBE
    assert breaker.state == STATE_HALF_OPEN
    return admission


# Closed and opening


@pytest.mark.parametrize("fail_max", [1, 2, 5])
def test_opens_after_fail_max_consecutive_failures(fail_max: int) -> None:
    breaker = make(fail_max=fail_max)
    for i in range(fail_max - 1):
        fail_once(breaker)
        assert breaker.state == STATE_CLOSED
        assert breaker.fail_counter == i + 1
    fail_once(breaker)
    assert breaker.state == STATE_OPEN
    assert breaker.opened_at is not None


def test_while_open_admit_returns_none_and_counts() -> None:
    breaker = make(fail_max=1)
    fail_once(breaker)
    for i in range(20):
        assert breaker.admit() is None
        assert breaker.rejected == i + 1
    assert breaker.state == STATE_OPEN


def test_a_success_resets_the_failure_count() -> None:
    breaker = make(fail_max=3)
    for _ in range(10):
        fail_once(breaker)
        fail_once(breaker)
        assert breaker.fail_counter == 2
        admission = breaker.admit()
        assert admission is Admission.CLOSED
        breaker.record(admission, failed=False)
        assert breaker.fail_counter == 0
    assert breaker.state == STATE_CLOSED


def test_closed_admissions_are_unlimited() -> None:
    breaker = make(half_open_max_calls=1)
    admissions = [breaker.admit() for _ in range(100)]
    assert admissions == [Admission.CLOSED] * 100
    assert breaker.probes_in_flight == 0


# Half-open


def test_reset_timeout_on_the_clock_passed_in() -> None:
    clock = FakeClock()
    breaker = make(fail_max=1, reset_timeout=30.0, clock=clock)
    fail_once(breaker)
    opened_at = breaker.opened_at
    assert opened_at is not None
    assert opened_at.timestamp() == pytest.approx(clock.now, abs=1e-6)
    clock.advance(30.0 - 1e-3)
    assert breaker.probe_in() == pytest.approx(1e-3, abs=1e-6)
    assert breaker.admit() is None
    assert breaker.state == STATE_OPEN
    clock.advance(1e-3)
    assert breaker.probe_in() == 0.0
    assert breaker.admit() is Admission.PROBE
    assert breaker.state == STATE_HALF_OPEN
    assert breaker.probes_in_flight == 1


def test_a_failed_probe_opens_again_for_a_whole_reset_timeout() -> None:
    clock = FakeClock()
    breaker = make(fail_max=1, reset_timeout=10.0, clock=clock)
    fail_once(breaker)
    probe = to_half_open(breaker)
    clock.advance(4.0)
    breaker.record(probe, failed=True)
    assert breaker.state == STATE_OPEN
    assert breaker.probe_in() == pytest.approx(10.0)
    clock.advance(9.5)
    assert breaker.admit() is None
    clock.advance(0.5)
    assert breaker.admit() is Admission.PROBE


@pytest.mark.parametrize("max_calls", [1, 2, 5])
def test_exactly_half_open_max_calls_probes_at_once(max_calls: int) -> None:
    breaker = make(fail_max=1, half_open_max_calls=max_calls)
    fail_once(breaker)
    first = to_half_open(breaker)
    admissions = [first] + [breaker.admit() for _ in range(max_calls + 5)]
    assert admissions == [Admission.PROBE] * max_calls + [None] * 5 + [None]
    assert breaker.probes_in_flight == max_calls


def test_a_finished_probe_frees_its_slot() -> None:
    breaker = make(fail_max=1, success_threshold=3, half_open_max_calls=2)
    open_breaker(breaker)
    p1 = to_half_open(breaker)
    admit_probe(breaker)
    assert breaker.admit() is None
    breaker.record(p1, failed=False)
    assert breaker.state == STATE_HALF_OPEN
    admit_probe(breaker)
    assert breaker.admit() is None


@pytest.mark.parametrize("threshold", [1, 2, 4])
def test_closes_after_success_threshold_successful_probes(threshold: int) -> None:
    transitions = Transitions()
    breaker = make(fail_max=2, success_threshold=threshold, on_transition=transitions)
    open_breaker(breaker)
    probe = to_half_open(breaker)
    for i in range(threshold):
        assert breaker.state == STATE_HALF_OPEN
        breaker.record(probe, failed=False)
        if i < threshold - 1:
            assert breaker.success_counter == i + 1
            probe = admit_probe(breaker)
    assert breaker.state == STATE_CLOSED
    assert breaker.fail_counter == 0
    assert breaker.probes_in_flight == 0
    assert breaker.admit() is Admission.CLOSED
    assert [t[1:] for t in transitions.calls] == [
        (STATE_CLOSED, STATE_OPEN),
        (STATE_OPEN, STATE_HALF_OPEN),
        (STATE_HALF_OPEN, STATE_CLOSED),
    ]


def test_reopens_on_a_failed_probe() -> None:
    transitions = Transitions()
    breaker = make(fail_max=3, success_threshold=2, on_transition=transitions)
    open_breaker(breaker)
    first_opened = breaker.opened_at
    probe = to_half_open(breaker)
    breaker.record(probe, failed=False)
    probe = admit_probe(breaker)
    breaker.record(probe, failed=True)  # one failed probe is enough, whatever fail_max
    assert breaker.state == STATE_OPEN
    assert breaker.probes_in_flight == 0
    assert breaker.admit() is None
    assert first_opened is not None
    assert breaker.opened_at is not None
    assert breaker.opened_at >= first_opened
    assert [t[1:] for t in transitions.calls] == [
        (STATE_CLOSED, STATE_OPEN),
        (STATE_OPEN, STATE_HALF_OPEN),
        (STATE_HALF_OPEN, STATE_OPEN),
    ]
    # ... and a later probe can still close it.
    probe = to_half_open(breaker)
    breaker.record(probe, failed=False)
    probe = admit_probe(breaker)
    breaker.record(probe, failed=False)
    assert breaker.state == STATE_CLOSED


def test_cancelled_probe_frees_the_slot_and_records_nothing() -> None:
    transitions = Transitions()
    breaker = make(fail_max=2, half_open_max_calls=1, on_transition=transitions)
    open_breaker(breaker)
    probe = to_half_open(breaker)
    fails, successes, seen = breaker.fail_counter, breaker.success_counter, len(transitions.calls)
    assert breaker.admit() is None
    breaker.cancel(probe)
    assert breaker.probes_in_flight == 0
    assert breaker.state == STATE_HALF_OPEN
    assert (breaker.fail_counter, breaker.success_counter) == (fails, successes)
    assert len(transitions.calls) == seen
    assert breaker.admit() is Admission.PROBE


def test_cancelled_closed_call_records_nothing() -> None:
    breaker = make(fail_max=3)
    fail_once(breaker)
    fail_once(breaker)
    admission = breaker.admit()
    assert admission is Admission.CLOSED
    breaker.cancel(admission)
    assert breaker.fail_counter == 2
    assert breaker.state == STATE_CLOSED
    fail_once(breaker)
    assert breaker.state == STATE_OPEN


def test_late_results_of_closed_admissions_after_opening_change_nothing() -> None:
    breaker = make(fail_max=2)
    in_flight = [breaker.admit() for _ in range(5)]
    open_breaker(breaker)
    opened_at = breaker.opened_at
    for admission in in_flight:
        assert admission is Admission.CLOSED
        breaker.record(admission, failed=False)
        breaker.record(admission, failed=True)
    assert breaker.state == STATE_OPEN
    assert breaker.opened_at == opened_at


# Transitions


def test_transitions_reported_in_order_with_the_name() -> None:
    transitions = Transitions()
    breaker = make(fail_max=1, name="shop:9091", on_transition=transitions)
    fail_once(breaker)
    probe = to_half_open(breaker)
    breaker.record(probe, failed=True)
    probe = to_half_open(breaker)
    breaker.record(probe, failed=False)
    breaker.force_open()
    breaker.force_close()
    assert transitions.calls == [
        ("shop:9091", STATE_CLOSED, STATE_OPEN),
        ("shop:9091", STATE_OPEN, STATE_HALF_OPEN),
        ("shop:9091", STATE_HALF_OPEN, STATE_OPEN),
        ("shop:9091", STATE_OPEN, STATE_HALF_OPEN),
        ("shop:9091", STATE_HALF_OPEN, STATE_CLOSED),
        ("shop:9091", STATE_CLOSED, STATE_OPEN),
        ("shop:9091", STATE_OPEN, STATE_CLOSED),
    ]
    assert {old for _, old, _ in transitions.calls} <= set(STATE_VALUES)


def test_no_transition_reported_without_a_change() -> None:
    transitions = Transitions()
    breaker = make(fail_max=5, on_transition=transitions)
    for _ in range(4):
        fail_once(breaker)
    admission = breaker.admit()
    assert admission is Admission.CLOSED
    breaker.record(admission, failed=False)
    assert transitions.calls == []


# configure()


def test_configure_changes_fail_max_keeping_state() -> None:
    breaker = make(fail_max=5)
    fail_once(breaker)
    fail_once(breaker)
    breaker.configure(fail_max=3, reset_timeout=LONG, success_threshold=1, half_open_max_calls=1)
    assert breaker.state == STATE_CLOSED
    assert breaker.fail_counter == 2
    fail_once(breaker)
    assert breaker.state == STATE_OPEN


def test_configure_keeps_open_state_and_applies_new_probe_settings() -> None:
    breaker = make(fail_max=1, success_threshold=1, half_open_max_calls=1)
    fail_once(breaker)
    breaker.configure(fail_max=1, reset_timeout=LONG, success_threshold=2, half_open_max_calls=3)
    assert breaker.state == STATE_OPEN
    assert breaker.admit() is None
    breaker.configure(fail_max=1, reset_timeout=0.0, success_threshold=2, half_open_max_calls=3)
    probes = [breaker.admit() for _ in range(4)]
    assert probes == [Admission.PROBE] * 3 + [None]
    assert probes[0] is not None
    breaker.record(probes[0], failed=False)
    assert breaker.state == STATE_HALF_OPEN  # success_threshold is now 2
    assert probes[1] is not None
    breaker.record(probes[1], failed=False)
    assert breaker.state == STATE_CLOSED


# The "success while closed with no failures is not replayed" shortcut


@given(
    events=st.lists(
        st.sampled_from(["ok", "fail", "cancel", "expire+ok", "expire+fail"]), max_size=60
    ),
    fail_max=st.integers(min_value=1, max_value=4),
    success_threshold=st.integers(min_value=1, max_value=3),
)
@settings(max_examples=150, deadline=None)
def test_recording_matches_plain_pybreaker(
    events: list[str], fail_max: int, success_threshold: int
) -> None:
    # The same results driven one at a time through a plain pybreaker.CircuitBreaker
    # (every call replayed, no shortcut, no adapter) leave the same observable state
    # and report the same transitions. "expire" ends the open period first.
    ours_t, plain_t = Transitions(), Transitions()
    breaker = make(fail_max=fail_max, success_threshold=success_threshold, on_transition=ours_t)
    plain = pybreaker.CircuitBreaker(
        fail_max=fail_max, reset_timeout=LONG, success_threshold=success_threshold, name="up"
    )

    class Listener(pybreaker.CircuitBreakerListener):
        def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
            old_name = old.name if old is not None else STATE_CLOSED
            if old_name != new.name:
                plain_t("up", old_name, new.name, False)

    plain.add_listener(Listener())

    def boom() -> None:
        raise RuntimeError("failed attempt")

    def set_timeout(timeout: float) -> None:
        plain.reset_timeout = timeout
        breaker.configure(
            fail_max=fail_max,
            reset_timeout=timeout,
            success_threshold=success_threshold,
            half_open_max_calls=1,
        )

    for event in events:
        expire, _, result = event.rpartition("+")
        if expire:
            set_timeout(0.0)
        admission = breaker.admit()
        # Plain pybreaker moves to half-open inside call() once the open period is over.
        assert (admission is None) == (plain.current_state == STATE_OPEN and not expire)
        if admission is not None:
            if result == "cancel":
                breaker.cancel(admission)
            else:
                breaker.record(admission, failed=result == "fail")
                with contextlib.suppress(RuntimeError, pybreaker.CircuitBreakerError):
                    plain.call(boom if result == "fail" else (lambda: None))
        if expire:
            set_timeout(LONG)
        assert breaker.state == plain.current_state
        assert breaker.fail_counter == plain.fail_counter
        assert breaker.success_counter == plain.success_counter
        assert breaker.probes_in_flight == 0
    assert ours_t.calls == plain_t.calls


def _drive(cb: pybreaker.CircuitBreaker, step: str) -> None:
    if step == "ok":
        with contextlib.suppress(pybreaker.CircuitBreakerError):
            cb.call(lambda: None)
    elif step == "fail":
        with contextlib.suppress(ValueError, pybreaker.CircuitBreakerError):
            cb.call(_raise_value_error)
    else:
        getattr(cb, step)()  # open, half_open, close


def _raise_value_error() -> None:
    raise ValueError


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["ok", "fail", "open", "half_open", "close"]), max_size=30))
def test_local_storage_keeps_what_pybreakers_memory_storage_keeps(steps: list[str]) -> None:
    """The default storage (plain attributes) against pybreaker's own, step by step."""
    ours = pybreaker.CircuitBreaker(fail_max=3, reset_timeout=LONG, state_storage=LocalStorage())
    theirs = pybreaker.CircuitBreaker(
        fail_max=3, reset_timeout=LONG, state_storage=pybreaker.CircuitMemoryStorage(STATE_CLOSED)
    )
    for step in steps:
        _drive(ours, step)
        _drive(theirs, step)
        assert ours.current_state == theirs.current_state
        assert ours.fail_counter == theirs.fail_counter
        assert ours.success_counter == theirs.success_counter
        assert (ours._state_storage.opened_at is None) == (theirs._state_storage.opened_at is None)
    assert isinstance(make(fail_max=3)._storage, LocalStorage)


def test_shortcut_leaves_counters_and_storage_alone() -> None:
    resets: list[str] = []

    class Storage(pybreaker.CircuitMemoryStorage):
        def reset_counter(self) -> None:
            resets.append("reset")
            super().reset_counter()

    breaker = make(fail_max=2, storage=Storage(STATE_CLOSED))
    for _ in range(5):
        admission = breaker.admit()
        assert admission is Admission.CLOSED
        breaker.record(admission, failed=False)
    assert breaker.fail_counter == 0
    assert breaker.state == STATE_CLOSED
    assert resets == []  # not replayed
    fail_once(breaker)
    admission = breaker.admit()
    assert admission is Admission.CLOSED
    breaker.record(admission, failed=False)  # with a failure counted it is replayed
    assert resets == ["reset"]
    assert breaker.fail_counter == 0


# Shared storage (fleet mode)


def test_breakers_sharing_a_storage_obey_each_other() -> None:
    storage = pybreaker.CircuitMemoryStorage(STATE_CLOSED)
    seen_a, seen_b = Transitions(), Transitions()
    a = make(fail_max=3, storage=storage, on_transition=seen_a, name="a")
    b = make(fail_max=3, storage=storage, on_transition=seen_b, name="b")
    # Failures seen by either count toward the same total.
    fail_once(a)
    fail_once(b)
    assert a.fail_counter == b.fail_counter == 2
    fail_once(a)
    assert a.state == STATE_OPEN
    assert b.state == STATE_OPEN
    assert b.admit() is None
    assert b.opened_at == a.opened_at
    assert seen_a.calls == [("a", STATE_CLOSED, STATE_OPEN)]
    assert seen_b.calls == [("b", STATE_CLOSED, STATE_OPEN)]
    # Closing through one closes the other.
    a.force_close()
    assert b.state == STATE_CLOSED
    assert b.admit() is Admission.CLOSED


def test_a_probe_through_one_breaker_closes_the_shared_circuit() -> None:
    storage = pybreaker.CircuitMemoryStorage(STATE_CLOSED)
    a = make(fail_max=1, storage=storage, name="a")
    b = make(fail_max=1, storage=storage, name="b")
    fail_once(a)
    assert b.admit() is None
    probe = to_half_open(b)
    assert a.state == STATE_HALF_OPEN
    b.record(probe, failed=False)
    assert a.state == STATE_CLOSED
    assert a.admit() is Admission.CLOSED


def test_shared_storage_with_a_short_reset_timeout() -> None:
    storage = pybreaker.CircuitMemoryStorage(STATE_CLOSED)
    clock = FakeClock()
    a = make(fail_max=2, reset_timeout=0.1, storage=storage, name="a", clock=clock)
    b = make(fail_max=2, reset_timeout=0.1, storage=storage, name="b", clock=clock)
    open_breaker(a)
    opened_at = a.opened_at
    assert opened_at is not None
    clock.advance(0.09)
    assert b.admit() is None
    clock.advance(0.01)
    probe = b.admit()
    assert probe is Admission.PROBE
    b.record(probe, failed=True)
    assert a.state == STATE_OPEN
    assert a.opened_at is not None
    assert a.opened_at.timestamp() == pytest.approx(opened_at.timestamp() + 0.1)


def test_random_interleavings_keep_probe_slots_consistent() -> None:
    rng = random.Random(11)
    breaker = make(fail_max=2, success_threshold=2, half_open_max_calls=3)
    held: list[Admission] = []
    for _ in range(2_000):
        action = rng.random()
        if action < 0.45:
            admission = breaker.admit()
            if admission is not None:
                held.append(admission)
        elif action < 0.9 and held:
            admission = held.pop(rng.randrange(len(held)))
            breaker.record(admission, failed=rng.random() < 0.5)
        elif held:
            breaker.cancel(held.pop(rng.randrange(len(held))))
        if breaker.state == STATE_OPEN and rng.random() < 0.2:
            breaker.configure(
                fail_max=2, reset_timeout=0.0, success_threshold=2, half_open_max_calls=3
            )
        else:
            breaker.configure(
                fail_max=2, reset_timeout=LONG, success_threshold=2, half_open_max_calls=3
            )
        probes = sum(1 for a in held if a is Admission.PROBE)
        assert breaker.probes_in_flight == probes
        assert 0 <= probes <= 3


def test_a_change_made_on_pybreaker_itself_is_obeyed_at_the_next_call() -> None:
    """A closed breaker with nothing counted answers `admit` without reading pybreaker's
    storage; a change made on pybreaker directly, not through the breaker, must still
    count from the next call on (pybreaker's listener tells the breaker)."""
    breaker = make(fail_max=3)
    breaker.record(breaker.admit() or Admission.PROBE, failed=False)  # quiet: closed, none counted
    breaker._cb.open()
    assert breaker.admit() is None
    breaker._cb.close()
    assert breaker.admit() is Admission.CLOSED
    breaker._cb.half_open()
    assert breaker.admit() is Admission.PROBE  # half-open: one probe, not a closed call
    assert breaker.admit() is None


def test_a_quiet_breaker_counts_a_failure_and_then_reads_the_storage_again() -> None:
    """After one failure the breaker is no longer quiet: a success replays through
    pybreaker and resets the count, so fail_max failures in a row are needed again."""
    breaker = make(fail_max=2)
    fail_once(breaker)
    assert breaker.fail_counter == 1
    breaker.record(breaker.admit() or Admission.PROBE, failed=False)
    assert breaker.fail_counter == 0
    fail_once(breaker)
    assert breaker.state == STATE_CLOSED
    fail_once(breaker)
    assert breaker.state == STATE_OPEN


_STEPS = st.lists(
    st.sampled_from(
        [
            "ok",
            "fail",
            "late_ok",
            "late_fail",
            "wait",
            "force_open",
            "force_close",
            "raw_open",
            "raw_close",
            "raw_half_open",
            "probe_pass",
            "probe_fail",
        ]
    ),
    max_size=40,
)


def _step(breaker: Breaker, step: str, held: list[Admission], clock: FakeClock) -> object:
    """One step on one breaker; returns what a caller would see of it."""
    if step in ("ok", "fail"):
        admission = breaker.admit()
        if admission is not None:
            breaker.record(admission, failed=step == "fail")
        return admission
    if step in ("late_ok", "late_fail"):  # admitted earlier, finishing now
        admission = breaker.admit()
        if admission is not None:
            held.append(admission)
        if held:
            breaker.record(held.pop(0), failed=step == "late_fail")
        return admission
    if step == "wait":
        clock.advance(LONG / 2)
    elif step.startswith("raw_"):
        getattr(breaker._cb, step[4:])()
    elif step.startswith("probe_"):
        breaker.probe_result(step == "probe_pass", upstream_down=True)
    else:
        getattr(breaker, step)()
    return None


@settings(max_examples=200, deadline=None)
@given(_STEPS)
def test_a_breaker_on_its_own_storage_acts_as_one_that_reads_its_storage_each_call(
    steps: list[str],
) -> None:
    """The quiet shortcut changes nothing a caller sees: step by step, the breaker on its
    own storage and one on a storage it must read on every call (pybreaker's memory
    storage counts as shared) admit the same calls and say the same state and counts."""
    clock_a, clock_b = FakeClock(), FakeClock()
    ours = make(fail_max=3, clock=clock_a)
    reads = make(fail_max=3, clock=clock_b, storage=pybreaker.CircuitMemoryStorage(STATE_CLOSED))
    assert ours._shared is False
    assert reads._shared is True
    held_a: list[Admission] = []
    held_b: list[Admission] = []
    for step in steps:
        seen = _step(ours, step, held_a, clock_a), _step(reads, step, held_b, clock_b)
        assert seen[0] == seen[1], step
        assert ours.state == reads.state
        assert ours.fail_counter == reads.fail_counter
        assert ours.probes_in_flight == reads.probes_in_flight
