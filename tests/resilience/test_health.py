"""Health check thresholds: when probe results take an address out and bring it back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.resilience.health import HealthTracker, Verdict

A, B = "10.0.0.1:9091", "10.0.0.2:9091"


def tracker(healthy: int = 2, unhealthy: int = 3) -> HealthTracker:
    return HealthTracker([A, B], healthy_threshold=healthy, unhealthy_threshold=unhealthy)


def probe(t: HealthTracker, passed: bool, out: bool, address: str = A) -> Verdict:
    return t.record(address, passed, "pass" if passed else "timeout", out)


@pytest.mark.parametrize("unhealthy", [1, 2, 3, 5])
def test_unhealthy_threshold_failures_in_a_row_take_it_out(unhealthy: int) -> None:
    t = tracker(unhealthy=unhealthy)
    verdicts = [probe(t, False, out=False) for _ in range(unhealthy)]
    assert verdicts == [Verdict.STAY] * (unhealthy - 1) + [Verdict.TAKE_OUT]
    assert not t.get(A).healthy
    assert t.get(B).healthy  # the other address is untouched


def test_a_pass_breaks_the_run_of_failures() -> None:
    t = tracker(unhealthy=3)
    for passed in (False, False, True, False, False):
        assert probe(t, passed, out=False) is Verdict.STAY
    assert probe(t, False, out=False) is Verdict.TAKE_OUT


@pytest.mark.parametrize("healthy", [1, 2, 4])
def test_healthy_threshold_passes_in_a_row_bring_it_back(healthy: int) -> None:
    t = tracker(healthy=healthy, unhealthy=1)
    assert probe(t, False, out=False) is Verdict.TAKE_OUT
    verdicts = [probe(t, True, out=True) for _ in range(healthy)]
    assert verdicts == [Verdict.STAY] * (healthy - 1) + [Verdict.BRING_BACK]
    assert t.get(A).healthy


def test_a_failure_while_out_starts_the_passes_again() -> None:
    t = tracker(healthy=2, unhealthy=1)
    probe(t, False, out=False)
    assert probe(t, True, out=True) is Verdict.STAY
    assert probe(t, False, out=True) is Verdict.STAY  # already out: nothing more to do
    assert probe(t, True, out=True) is Verdict.STAY
    assert probe(t, True, out=True) is Verdict.BRING_BACK


def test_passes_before_a_passive_ejection_do_not_count() -> None:
    """Probes pass, then client calls eject the address: two new passes are needed."""
    t = tracker(healthy=2)
    for _ in range(5):
        assert probe(t, True, out=False) is Verdict.STAY
    assert probe(t, True, out=True) is Verdict.STAY  # the first probe after the ejection
    assert probe(t, True, out=True) is Verdict.BRING_BACK


def test_an_address_in_rotation_is_never_brought_back_and_one_out_never_taken_out() -> None:
    t = tracker(healthy=1, unhealthy=1)
    assert probe(t, True, out=False) is Verdict.STAY
    assert probe(t, False, out=True) is Verdict.STAY


def test_any_passing_reads_the_latest_probe_of_each_address() -> None:
    t = tracker()
    assert not t.any_passing()  # no probe yet
    probe(t, True, out=False, address=A)
    probe(t, False, out=False, address=B)
    assert t.any_passing()
    probe(t, False, out=False, address=A)
    assert not t.any_passing()


@settings(max_examples=200, deadline=None)
@given(
    results=st.lists(st.booleans(), max_size=60),
    healthy=st.integers(1, 4),
    unhealthy=st.integers(1, 4),
)
def test_verdicts_follow_the_streaks(results: list[bool], healthy: int, unhealthy: int) -> None:
    """Driven like the checker drives it: out only after `unhealthy` failures in a row,
    back only after `healthy` passes in a row."""
    t = tracker(healthy=healthy, unhealthy=unhealthy)
    out = False
    run_pass = run_fail = 0
    for passed in results:
        verdict = probe(t, passed, out)
        run_pass, run_fail = (run_pass + 1, 0) if passed else (0, run_fail + 1)
        if verdict is Verdict.TAKE_OUT:
            assert not out
            assert run_fail >= unhealthy
            out = True
        elif verdict is Verdict.BRING_BACK:
            assert out
            assert run_pass >= healthy
            out = False
        else:
            assert not (not out and not passed and run_fail >= unhealthy)
            assert not (out and passed and run_pass >= healthy)
