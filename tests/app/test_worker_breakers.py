"""The breakers two workers build over one breaker table (`sidecar.app.build.breakers`)."""

from __future__ import annotations

from pathlib import Path

from sidecar.app import build
from sidecar.config import SidecarConfig
from sidecar.metrics import SidecarMetrics
from sidecar.resilience.breaker import Admission
from sidecar.resilience.breakers import BreakerSet
from sidecar.workers.breaker_table import BreakerTable

FAIL_MAX = 4


def config() -> SidecarConfig:
    return SidecarConfig.model_validate(
        {
            "upstream": {"addresses": ["127.0.0.1:9"]},
            "breaker": {"fail_max": FAIL_MAX, "reset_timeout": "60s"},
        }
    )


def worker_breakers(path: Path) -> BreakerSet:
    table = BreakerTable.open(path)
    seen: list[tuple[str, str, str, bool]] = []
    return build.breakers(config(), SidecarMetrics(), None, lambda *t: seen.append(t), table)


def test_failures_counted_after_a_close_survive_another_worker_noticing_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "breakers"
    BreakerTable.create(path).close()
    a = worker_breakers(path).for_label("getItem")
    b = worker_breakers(path).for_label("getItem")
    assert a.name == b.name
    for _ in range(FAIL_MAX):
        a.record(Admission.CLOSED, failed=True)
    assert b.state == "open"  # b adopts the opening
    a.force_close()
    a.record(Admission.CLOSED, failed=True)
    a.record(Admission.CLOSED, failed=True)
    assert b.admit() is Admission.CLOSED  # b notices the close: must not reset the count
    assert b.fail_counter == 2
    b.record(Admission.CLOSED, failed=True)
    a.record(Admission.CLOSED, failed=True)  # the fourth failure since the close, in all
    assert a.state == "open"
    assert b.state == "open"
