"""The breaker with health checks on: no client call is a probe; passing probes close it.

Fake clock throughout (`tests.resilience.test_breaker.FakeClock`): the reset
timeout is checked exactly, with no waiting.
"""

from __future__ import annotations

from sidecar.resilience.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    Admission,
    Breaker,
)
from sidecar.resilience.breakers import BreakerSet
from tests.resilience.test_breaker import FakeClock, Transitions, make

RESET = 30.0


def opened(
    clock: FakeClock, transitions: Transitions | None = None, success_threshold: int = 1
) -> Breaker:
    """An open breaker with health checks on, opened by client failures at ``clock``."""
    breaker = make(
        reset_timeout=RESET,
        clock=clock,
        on_transition=transitions,
        success_threshold=success_threshold,
    )
    breaker.health_checked = True
    for _ in range(breaker.fail_max):
        admission = breaker.admit()
        assert admission is Admission.CLOSED
        breaker.record(admission, True)
    assert breaker.state == STATE_OPEN
    return breaker


def test_no_client_call_is_admitted_after_the_reset_timeout() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(RESET + 1)
    for _ in range(10):
        assert breaker.admit() is None
    assert breaker.state == STATE_OPEN  # not even moved to half-open by a client call
    assert breaker.probes_in_flight == 0
    assert breaker.rejected == 10


def test_a_pass_before_the_reset_timeout_changes_nothing() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    clock.advance(RESET - 0.001)
    breaker.probe_result(True, upstream_down=False)
    assert breaker.state == STATE_OPEN


def test_the_first_pass_after_the_reset_timeout_closes_it() -> None:
    clock = FakeClock()
    transitions = Transitions()
    breaker = opened(clock, transitions)
    clock.advance(RESET)
    breaker.probe_result(False, upstream_down=True)  # a failure while open: nothing
    assert breaker.state == STATE_OPEN
    breaker.probe_result(True, upstream_down=False)
    assert breaker.state == STATE_CLOSED
    assert transitions.calls == [
        ("up", "closed", "open"),
        ("up", "open", "half-open"),
        ("up", "half-open", "closed"),
    ]
    assert breaker.admit() is Admission.CLOSED


def test_success_threshold_passes_close_it_and_a_failure_while_down_reopens() -> None:
    clock = FakeClock()
    breaker = opened(clock, success_threshold=2)
    clock.advance(RESET)
    breaker.probe_result(True, upstream_down=False)
    assert breaker.state == STATE_HALF_OPEN
    assert breaker.admit() is None  # half-open: still no client call
    # Another address's probe fails while this one passed last: the circuit stays half-open.
    breaker.probe_result(False, upstream_down=False)
    assert breaker.state == STATE_HALF_OPEN
    # Every address's last probe failed: open again, for a new reset timeout.
    breaker.probe_result(False, upstream_down=True)
    assert breaker.state == STATE_OPEN
    assert breaker.probe_in() == RESET
    breaker.probe_result(True, upstream_down=False)
    assert breaker.state == STATE_OPEN
    clock.advance(RESET)
    breaker.probe_result(True, upstream_down=False)
    breaker.probe_result(True, upstream_down=False)
    assert breaker.state == STATE_CLOSED


def test_a_closed_breaker_ignores_probes() -> None:
    breaker = make(clock=FakeClock())
    breaker.health_checked = True
    for _ in range(10):
        breaker.probe_result(False, upstream_down=True)
    assert breaker.state == STATE_CLOSED
    assert breaker.fail_counter == 0


def test_with_health_checks_off_a_client_call_is_the_probe_as_before() -> None:
    clock = FakeClock()
    breaker = opened(clock)
    breaker.health_checked = False
    clock.advance(RESET)
    assert breaker.admit() is Admission.PROBE
    assert breaker.state == STATE_HALF_OPEN


def test_the_breaker_set_passes_the_switch_to_breakers_made_later() -> None:
    clock = FakeClock()
    made = BreakerSet(lambda name: make(name=name, clock=clock), "up", per_method=True)
    first = made.for_label("getItem")
    made.set_health_checked(True)
    later = made.for_label("listItems")
    assert first.health_checked
    assert later.health_checked
    made.set_health_checked(False)
    assert not first.health_checked
    assert not later.health_checked
