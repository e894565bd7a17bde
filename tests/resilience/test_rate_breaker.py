"""``breaker.mode: rate``: the window opens pybreaker; pybreaker keeps half-open and closing.

Every test runs on a `FakeClock`; durations are given to `Breaker.record` as
call.py gives them (seconds, the whole call).
"""

from __future__ import annotations

import pybreaker
import pytest

from sidecar.resilience.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    Admission,
    Breaker,
)
from sidecar.resilience.window import RateSettings
from tests.resilience.test_breaker import LONG, FakeClock, Transitions


def rate_breaker(
    clock: FakeClock,
    *,
    transitions: Transitions | None = None,
    storage: pybreaker.CircuitBreakerStorage | None = None,
    success_threshold: int = 1,
    reset_timeout: float = LONG,
    **rate: object,
) -> Breaker:
    return Breaker(
        "up",
        fail_max=5,
        reset_timeout=reset_timeout,
        success_threshold=success_threshold,
        storage=storage,
        on_transition=transitions,
        clock=clock,
        rate=RateSettings(**rate),  # type: ignore[arg-type]
    )


def call(breaker: Breaker, failed: bool, duration: float = 0.01) -> Admission | None:
    """One call: admitted (or not) and, when admitted, recorded."""
    admission = breaker.admit()
    if admission is not None:
        breaker.record(admission, failed, duration)
    return admission


def test_twenty_percent_failures_trip_a_rate_breaker_at_15_percent_not_a_consecutive_one() -> None:
    clock = FakeClock()
    consecutive = Breaker("c", fail_max=5, reset_timeout=LONG, clock=clock)
    transitions = Transitions()
    rate = rate_breaker(
        clock,
        transitions=transitions,
        window_size=50,
        minimum_calls=20,
        failure_rate_threshold=15,
    )
    opened_at_call = None
    for i in range(1, 1001):  # every fifth call fails: 20 %, spread evenly
        failed = i % 5 == 0
        assert call(consecutive, failed) is Admission.CLOSED
        clock.advance(0.01)
        if rate.state == STATE_CLOSED:
            call(rate, failed)
            if rate.state == STATE_OPEN and opened_at_call is None:
                opened_at_call = i
    assert consecutive.state == STATE_CLOSED  # never more than one failure in a row
    assert consecutive.fail_counter <= 1
    # 20 calls reach minimum_calls with 4 failures: 20 % >= 15 %.
    assert opened_at_call == 20
    assert rate.state == STATE_OPEN
    assert transitions.calls == [("up", STATE_CLOSED, STATE_OPEN)]
    opened_at = rate.opened_at
    assert opened_at is not None
    assert opened_at.timestamp() == pytest.approx(clock.now - 0.01 * 980)


def test_twenty_percent_failures_do_not_trip_a_rate_breaker_at_25_percent() -> None:
    clock = FakeClock()
    rate = rate_breaker(clock, window_size=50, minimum_calls=20, failure_rate_threshold=25)
    for i in range(1, 1001):
        call(rate, i % 5 == 0)
        assert rate.state == STATE_CLOSED
    assert rate.rates() == (20.0, 0.0)


def test_under_minimum_calls_nothing_opens() -> None:
    clock = FakeClock()
    rate = rate_breaker(clock, window_size=100, minimum_calls=30, failure_rate_threshold=50)
    for _ in range(29):  # 29 failures out of 29: 100 %, below minimum_calls
        call(rate, True)
    assert rate.state == STATE_CLOSED
    assert rate.rates() == (100.0, 0.0)
    call(rate, True)
    assert rate.state == STATE_OPEN


def test_slow_calls_alone_open_it() -> None:
    clock = FakeClock()
    rate = rate_breaker(
        clock,
        window_size=20,
        minimum_calls=20,
        failure_rate_threshold=50,
        slow_call_duration=0.2,
        slow_call_rate_threshold=80,
    )
    for i in range(1, 21):  # no failure; 16 in 20 (80 %) take 0.3 s
        assert rate.state == STATE_CLOSED
        call(rate, False, 0.3 if i % 5 else 0.05)
    assert rate.state == STATE_OPEN


def test_slow_calls_below_the_threshold_do_not() -> None:
    clock = FakeClock()
    rate = rate_breaker(
        clock,
        window_size=20,
        minimum_calls=20,
        slow_call_duration=0.2,
        slow_call_rate_threshold=80,
    )
    for i in range(1, 201):  # 15 in 20 (75 %) are slow
        call(rate, False, 0.3 if i % 4 else 0.05)
    assert rate.state == STATE_CLOSED
    assert rate.rates() == (0.0, 75.0)


def test_count_window_slides_old_failures_out() -> None:
    clock = FakeClock()
    rate = rate_breaker(clock, window_size=10, minimum_calls=10, failure_rate_threshold=50)
    for _ in range(4):
        call(rate, True)
    for _ in range(6):
        call(rate, False)  # 4 in 10: 40 %
    for _ in range(4):
        call(rate, False)  # the four failures slide out
    assert rate.rates() == (0.0, 0.0)
    for _ in range(4):
        call(rate, True)  # 4 in 10 again: still under 50 %
    assert rate.state == STATE_CLOSED
    call(rate, True)  # 5 in 10
    assert rate.state == STATE_OPEN


def test_time_window_slides_old_failures_out() -> None:
    clock = FakeClock(1_000.0)
    rate = rate_breaker(
        clock, window_type="time", window_size=10, minimum_calls=4, failure_rate_threshold=50
    )
    for _ in range(3):
        call(rate, True)  # three failures at second 1000: under minimum_calls
    clock.advance(10.0)  # second 1010: second 1000 left the window
    assert rate.rates() == (0.0, 0.0)
    for _ in range(3):
        call(rate, False)
    call(rate, True)  # 1 in 4
    assert rate.state == STATE_CLOSED
    clock.advance(9.0)  # second 1019: the last four calls are still in the window
    call(rate, True)  # 2 in 5
    assert rate.state == STATE_CLOSED
    call(rate, True)  # 3 in 6: 50 %
    assert rate.state == STATE_OPEN


def test_half_open_and_closing_stay_pybreakers() -> None:
    clock = FakeClock()
    transitions = Transitions()
    rate = rate_breaker(
        clock,
        transitions=transitions,
        reset_timeout=30.0,
        success_threshold=2,
        window_size=10,
        minimum_calls=2,
        failure_rate_threshold=50,
    )
    call(rate, True)
    call(rate, True)
    assert rate.state == STATE_OPEN
    assert call(rate, False) is None  # rejected while open
    clock.advance(30.0)
    assert call(rate, False) is Admission.PROBE
    assert rate.state == STATE_HALF_OPEN  # success_threshold is 2
    assert call(rate, False) is Admission.PROBE
    assert rate.state == STATE_CLOSED
    # The window started again: one failure is under minimum_calls, whatever it was before.
    call(rate, True)
    assert rate.state == STATE_CLOSED
    assert [new for _, _, new in transitions.calls] == [
        STATE_OPEN,
        STATE_HALF_OPEN,
        STATE_CLOSED,
    ]


def test_a_failed_probe_opens_it_again() -> None:
    clock = FakeClock()
    rate = rate_breaker(
        clock, reset_timeout=30.0, window_size=4, minimum_calls=1, failure_rate_threshold=100
    )
    call(rate, True)
    assert rate.state == STATE_OPEN
    clock.advance(30.0)
    assert call(rate, True) is Admission.PROBE
    assert rate.state == STATE_OPEN
    opened_at = rate.opened_at
    assert opened_at is not None
    assert opened_at.timestamp() == clock.now


def test_results_of_calls_admitted_before_the_opening_are_dropped() -> None:
    clock = FakeClock()
    rate = rate_breaker(
        clock, reset_timeout=30.0, window_size=10, minimum_calls=2, failure_rate_threshold=50
    )
    late = rate.admit()
    assert late is Admission.CLOSED
    call(rate, True)
    call(rate, True)
    assert rate.state == STATE_OPEN
    rate.record(late, True, 0.01)  # finishes while open: no effect
    clock.advance(30.0)
    assert call(rate, False) is Admission.PROBE
    assert rate.state == STATE_CLOSED
    assert rate.rates() == (0.0, 0.0)


def test_pybreakers_counter_is_not_fed_in_rate_mode() -> None:
    clock = FakeClock()
    rate = rate_breaker(clock, window_size=100, minimum_calls=100)
    for _ in range(20):  # 20 failures in a row: fail_max (5) means nothing here
        call(rate, True)
    assert rate.state == STATE_CLOSED
    assert rate.fail_counter == 0


def test_a_shared_storage_opened_by_one_breaker_rejects_on_the_other() -> None:
    clock = FakeClock()
    storage = pybreaker.CircuitMemoryStorage(STATE_CLOSED)
    settings = {"window_size": 10, "minimum_calls": 4, "failure_rate_threshold": 50}
    one = rate_breaker(clock, storage=storage, reset_timeout=30.0, **settings)
    other = rate_breaker(clock, storage=storage, reset_timeout=30.0, **settings)
    for _ in range(3):
        call(other, True)  # three failures in the other's window
    for _ in range(4):
        call(one, True)
    assert other.state == STATE_OPEN
    assert other.admit() is None
    clock.advance(30.0)
    assert call(other, False) is Admission.PROBE
    assert storage.state == STATE_CLOSED
    # The other's window was emptied when it saw the circuit open: one more
    # failure does not add up with the three from before.
    call(other, True)
    assert other.state == STATE_CLOSED


def test_rates_is_none_in_consecutive_mode_and_configure_switches_modes() -> None:
    clock = FakeClock()
    breaker = Breaker("up", fail_max=5, reset_timeout=LONG, clock=clock)
    assert breaker.rates() is None
    assert breaker.rate is None
    settings = RateSettings(window_size=4, minimum_calls=4, failure_rate_threshold=50)
    breaker.configure(
        fail_max=5, reset_timeout=LONG, success_threshold=1, half_open_max_calls=1, rate=settings
    )
    assert breaker.rate == settings
    for failed in (True, False, True):
        call(breaker, failed)
    assert breaker.state == STATE_CLOSED
    call(breaker, False)  # 2 in 4: 50 %
    assert breaker.state == STATE_OPEN
    breaker.force_close()
    breaker.configure(fail_max=5, reset_timeout=LONG, success_threshold=1, half_open_max_calls=1)
    assert breaker.rate == settings  # "keep" by default
    breaker.configure(
        fail_max=2, reset_timeout=LONG, success_threshold=1, half_open_max_calls=1, rate=None
    )
    assert breaker.rates() is None
    call(breaker, True)
    call(breaker, True)
    assert breaker.state == STATE_OPEN


def test_config_keys_make_the_rate_settings() -> None:
    from sidecar.app.build import rate_settings
    from sidecar.config import SidecarConfig

    assert rate_settings(SidecarConfig()) is None  # consecutive by default
    config = SidecarConfig.model_validate(
        {
            "breaker": {
                "mode": "rate",
                "window_type": "time",
                "window_size": 30,
                "minimum_calls": 200,
                "failure_rate_threshold": 15,
                "slow_call_duration": "250ms",
                "slow_call_rate_threshold": 60,
            }
        }
    )
    assert rate_settings(config) == RateSettings("time", 30, 200, 15.0, 0.25, 60.0)


@pytest.mark.parametrize(
    ("breaker", "key"),
    [
        ({"window_size": 10, "minimum_calls": 11}, "breaker.minimum_calls"),
        ({"failure_rate_threshold": 0}, "breaker.failure_rate_threshold"),
        ({"slow_call_rate_threshold": 101}, "breaker.slow_call_rate_threshold"),
        ({"mode": "ratio"}, "breaker.mode"),
        ({"slow_call_duration": "0s"}, "breaker.slow_call_duration"),
    ],
)
def test_bad_rate_keys_are_config_errors_naming_the_key(
    breaker: dict[str, object], key: str
) -> None:
    from sidecar.config import load_config
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{key}\b"):
        load_config(None, environ={}, overrides={("breaker", k): v for k, v in breaker.items()})
