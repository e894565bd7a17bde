"""The soak's probe watch: it counts failed probes right, and its check tells the path's state."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from sidecar.testing.faults import FaultPlan, FaultProxyThread
from tests.soak.upstream_process import UpstreamProcess
from tests.soak.watch import ProbeStreak, ProbeWatch, check_path, transitions
from tests.support.sidecar import Metrics
from tests.support.wait import wait_until


def scrape(failed: int, closed: int, opened: int = 1) -> Metrics:
    """A ``/metrics`` text with these breaker transition counts (parsed as a scrape is)."""
    name = "thrift_sidecar_breaker_transitions_total"
    lines = [f"# TYPE {name} counter"]
    for old, new, value in (
        ("closed", "open", opened),
        ("open", "half-open", failed + closed),
        ("half-open", "open", failed),
        ("half-open", "closed", closed),
    ):
        lines.append(f'{name}{{breaker="u",from_state="{old}",to_state="{new}"}} {value}')
    return Metrics("\n".join(lines) + "\n")


def test_transitions_are_read_by_from_and_to_state() -> None:
    assert transitions(scrape(failed=3, closed=2)) == {
        "closed->open": 1.0,
        "open->half-open": 5.0,
        "half-open->open": 3.0,
        "half-open->closed": 2.0,
    }


def test_a_streak_counts_failed_probes_until_a_closing() -> None:
    streak = ProbeStreak()
    assert streak.update(transitions(scrape(failed=5, closed=1))) == 0  # the first reading
    assert streak.update(transitions(scrape(failed=7, closed=1))) == 2
    assert streak.update(transitions(scrape(failed=8, closed=1))) == 3
    assert streak.update(transitions(scrape(failed=9, closed=2))) == 0  # closed meanwhile
    assert streak.update(transitions(scrape(failed=10, closed=2))) == 1


def test_the_watch_checks_once_per_episode() -> None:
    readings = [
        scrape(failed=0, closed=0),
        scrape(failed=2, closed=0),
        scrape(failed=4, closed=0),  # a streak of 4: checked
        scrape(failed=6, closed=0),  # the same episode: not again
        scrape(failed=6, closed=1),  # closed: the episode ends
        scrape(failed=10, closed=1),  # a new streak of 4: checked
    ]
    served: list[int] = []  # one entry per reading taken (the watch's own thread)

    def next_reading() -> Metrics:
        served.append(1)
        return readings[min(len(served), len(readings)) - 1]

    paths = iter(["first check", "second check", "third check"])
    with ProbeWatch(next_reading, lambda: next(paths), 0.0, streak=4, interval=0.01) as watch:
        wait_until(lambda: len(served) >= len(readings) + 2, timeout=5.0, message="readings")
    assert [line.split(": ", 1)[1] for line in watch.checks] == ["first check", "second check"]
    assert "4 failed probes in a row" in watch.checks[0]


@pytest.mark.timeout(60)
def test_the_path_check_tells_a_dead_upstream_from_a_live_one() -> None:
    with tempfile.TemporaryDirectory(prefix="soak-watch-") as workdir:
        upstream = UpstreamProcess(Path(workdir) / "orders.txt")
        upstream.start()
        proxy = FaultProxyThread(upstream.address, "framed", FaultPlan(seed=1)).start()
        try:
            up = check_path(upstream, proxy)
            assert "ping to the upstream answered" in up, up
            assert "ping through the fault proxy answered" in up, up
            upstream.stop()
            down = check_path(upstream, proxy)
            assert down.startswith("upstream process not running"), down
            assert "ping to the upstream failed" in down, down
            assert "ping through the fault proxy failed" in down, down
            assert down.endswith("so far: 1 {'connect: ECONNREFUSED': 1}"), down
        finally:
            proxy.stop()
            upstream.stop()
