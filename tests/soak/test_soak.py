"""A short soak in CI: every fault kind once or more, and what must hold through them.

The long run and how to read it: ``bench/soak.py`` and docs/robustness.md.
"""

from __future__ import annotations

import pytest

from tests.soak.runner import SoakSettings, run_soak
from tests.soak.schedule import KINDS, make_schedule
from tests.support.redis import redis_binary

SECONDS = 15.0
PERIOD = 1.5
# Growth allowed over the run (the baseline is taken after a warm-up).
RSS_GROWTH_MB = 48.0


def test_schedule_is_a_function_of_the_seed_and_covers_every_kind() -> None:
    first = make_schedule(7, SECONDS, PERIOD, KINDS)
    assert first == make_schedule(7, SECONDS, PERIOD, KINDS)
    assert first != make_schedule(8, SECONDS, PERIOD, KINDS)
    assert {e.kind for e in first} == set(KINDS)
    assert all(1.0 <= e.at < SECONDS - 1.0 for e in first)
    reloads = [e.params["config"] for e in first if e.kind == "reload"]
    assert reloads[:2] == ["valid_b", "broken"]


@pytest.mark.timeout(120)
def test_short_soak() -> None:
    redis_binary()  # fails with how to install it when missing
    report = run_soak(SoakSettings(seed=3, seconds=SECONDS, period=PERIOD, settle_seconds=15.0))
    text = report.to_text()
    assert not report.crashed, text
    done = report.faults
    for kind in ("reset_windows", "delay_windows", "redis_restarts", "sqlite_deleted"):
        assert done[kind] >= 1, text
    assert done["upstream_killed"] + done["upstream_stopped"] >= 1, text
    # Every client made calls, and none got a reply that was not its own and right.
    for name, client in report.clients.items():
        assert client["ok"] > 0, f"{name}\n{text}"
        assert client["wrong_replies"] == 0, text
    # Writes: each order executed at most once, and no receipt without an execution.
    assert report.receipts > 0, text
    assert report.executed_twice == [], text
    assert report.receipts_not_executed == [], text
    # SIGHUP: each valid config taken, each broken one refused.
    valid = done["reload_valid_a"] + done["reload_valid_b"]
    assert report.reloads.get("ok", 0) == valid, text
    assert report.reloads.get("error", 0) == done["reload_broken"], text
    # The faults were seen as such.
    assert report.state_backend_errors, text
    assert report.fallback_store_errors.get("file", 0) >= 1, text
    # The breaker recovers: each opening closes within a few probes, never a long
    # run of failed probes while the upstream is up (one 10-minute run got stuck so).
    moves = report.breaker_transitions
    assert moves.get("half-open->open", 0) <= 2 * moves.get("closed->open", 0) + 5, text
    # Resources: fds back to the baseline, RSS bounded.
    assert report.fds.after <= report.fds.before, text
    assert report.fds_left == {}, text
    assert report.rss_mb.peak <= report.rss_mb.before + RSS_GROWTH_MB, text


@pytest.mark.timeout(90)
def test_a_write_sent_twice_is_caught() -> None:
    """placeOrder wrongly marked idempotent: retried after a lost reply, executed twice."""
    redis_binary()
    settings = SoakSettings(
        seed=4,
        seconds=6.0,
        period=1.0,
        kinds=("resets",),
        settle_seconds=5.0,
        config_overrides={"methods": {"placeOrder": {"idempotent": True}}},
    )
    report = run_soak(settings)
    assert report.faults["reset_windows"] >= 1, report.to_text()
    assert report.executed_twice, report.to_text()
    assert report.receipts_not_executed == [], report.to_text()
