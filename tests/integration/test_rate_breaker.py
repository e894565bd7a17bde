"""``breaker.mode: rate`` through a real sidecar: it opens at the configured rate.

client ──► sidecar ──► FaultProxy ──► thriftpy2 upstream. The proxy fails
every fifth call with INTERNAL_ERROR (a breaker failure, not retried by
default): 20 % of failures, never two in a row. A consecutive breaker with
fail_max 5 never opens on that; a rate breaker at 15 % opens as soon as its
window holds minimum_calls. Slow calls are made by the proxy's delays. The
breaker's state and ratios are read from /metrics.
"""

from __future__ import annotations

from typing import Any

import pytest
import thriftpy2.thrift

from tests.support.rig import Rig, rig

TAE = thriftpy2.thrift.TApplicationException
EVERY_FIFTH = ["ok", "ok", "ok", "ok", "internal_error"]
BASE: dict[str, Any] = {
    "retry": {"per_try_timeout": "3s", "deadline": "5s"},
    "fallback": {"serve_on": []},
}


def config(**breaker: Any) -> dict[str, Any]:
    return {**BASE, "breaker": {"fail_max": 5, "reset_timeout": "60s", **breaker}}


def one_call(r: Rig, client: Any, i: int) -> bool:
    """Call getItem(i); True when it failed (the upstream's or the sidecar's error)."""
    try:
        assert client.getItem(i).id == i
    except TAE:
        return True
    return False


def ratio(r: Rig, name: str) -> float:
    return r.metrics().value(f"thrift_sidecar_breaker_{name}_ratio", breaker=r.breaker)


def test_twenty_percent_failures_leave_a_consecutive_breaker_closed() -> None:
    with rig(config()) as r, r.client() as client:
        r.plan.extend_schedule(EVERY_FIFTH * 40)
        failures = sum(one_call(r, client, i) for i in range(200))
        assert failures == 40
        assert r.state() == 0
        assert r.transitions("closed", "open") == 0
        # Consecutive mode has no window: its ratios are not exported.
        assert r.metrics().matching("thrift_sidecar_breaker_failure_ratio") == {}
    print("\nconsecutive, fail_max 5: 200 calls, 40 failures (20 %), breaker stayed closed")


def test_rate_breaker_opens_at_the_configured_rate() -> None:
    settings = config(mode="rate", window_size=50, minimum_calls=20, failure_rate_threshold=15)
    with rig(settings) as r, r.client() as client:
        r.plan.extend_schedule(EVERY_FIFTH * 10)
        for i in range(1, 11):
            one_call(r, client, i)
        assert r.state() == 0  # 10 calls: under minimum_calls, whatever the rate
        assert ratio(r, "failure") == pytest.approx(0.2)
        assert ratio(r, "slow_call") == 0
        opened_after = None
        for i in range(11, 51):
            one_call(r, client, i)
            if r.state() == 2:
                opened_after = i
                break
        # At 20 calls the window holds minimum_calls, 4 of them failed: 20 % >= 15 %.
        assert opened_after == 20
        assert r.transitions("closed", "open") == 1
        seen = r.proxy.stats.calls
        with pytest.raises(TAE, match="circuit open"):
            client.getItem(99)
        assert r.proxy.stats.calls == seen  # nothing reached the proxy
        assert ratio(r, "failure") == 0  # the window starts again with the opening
    print(f"\nrate, 15 % over minimum_calls 20: opened at call {opened_after} (4 failures)")


def test_rate_breaker_opens_on_slow_calls_alone() -> None:
    settings = config(
        mode="rate",
        window_size=10,
        minimum_calls=4,
        failure_rate_threshold=50,
        slow_call_duration="150ms",
        slow_call_rate_threshold=75,
    )
    with rig(settings) as r, r.client() as client:
        r.plan.extend_schedule(["ok", ("delay", 0.3), ("delay", 0.3), ("delay", 0.3)])
        failed = [one_call(r, client, i) for i in range(1, 4)]
        assert failed == [False, False, False]
        assert r.state() == 0
        assert ratio(r, "slow_call") == pytest.approx(2 / 3)
        assert not one_call(r, client, 4)  # the fourth call: 3 slow in 4 = 75 %
        assert r.state() == 2
        assert ratio(r, "failure") == 0
    print("\nrate, slow calls: 3 slow (300 ms > 150 ms) in 4 successful calls opened it")
