"""``workers``: one process by default, a number, ``auto``; errors name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.app.limits import budget, limiter, worker_share
from sidecar.config import load_config
from sidecar.config.model import worker_count
from tests.config.files import error_of, write


def test_one_worker_by_default_a_number_or_auto(tmp_path: Path) -> None:
    assert load_config(None, environ={}).workers == 1
    path = write(tmp_path, {"workers": 3})
    assert load_config(path, environ={}).workers == 3
    assert load_config(path, environ={"SIDECAR_WORKERS": "2"}).workers == 2
    auto = load_config(path, environ={"SIDECAR_WORKERS": "auto"})
    assert auto.workers == "auto"
    assert worker_count(auto.workers) == len(os.sched_getaffinity(0))
    assert worker_count(3) == 3


@pytest.mark.parametrize("value", [0, -1, 65, "many", 2.5])
def test_a_count_out_of_range_or_not_a_number_is_an_error(tmp_path: Path, value: object) -> None:
    assert "workers" in error_of(tmp_path, {"workers": value})


def test_each_worker_keeps_its_share_of_the_retry_budgets_floor(tmp_path: Path) -> None:
    path = write(tmp_path, {"retry": {"budget": {"min_retries_per_second": 10, "window": "10s"}}})
    config = load_config(path, environ={})
    alone, shared = budget(config), budget(config, workers=2)
    # The floor is retries per window: 100 for one process, 50 for each of two.
    assert alone.floor == pytest.approx(100.0)
    assert shared.floor == pytest.approx(50.0)
    assert shared.ratio == alone.ratio


def test_auto_follows_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    cpus = len(os.sched_getaffinity(0))
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # 1.5 CPUs: 2 workers
    assert worker_count("auto", str(limit)) == min(cpus, 2)
    limit.write_text("50000 100000\n")  # half a CPU: still one worker
    assert worker_count("auto", str(limit)) == 1
    limit.write_text("max 100000\n")  # no limit: the affinity
    assert worker_count("auto", str(limit)) == cpus
    assert worker_count("auto", str(tmp_path / "absent")) == cpus
    limit.write_text("garbage\n")
    assert worker_count("auto", str(limit)) == cpus


@pytest.mark.parametrize(
    ("total", "count", "parts"),
    [(8, 2, [4, 4]), (3, 2, [2, 1]), (7, 3, [3, 2, 2]), (1, 2, [1, 1]), (5, 1, [5])],
)
def test_max_in_flight_is_split_between_the_workers(
    total: int, count: int, parts: list[int]
) -> None:
    assert [worker_share(total, i, count) for i in range(count)] == parts
    config = load_config(None, environ={"SIDECAR_UPSTREAM__MAX_IN_FLIGHT": str(total)})
    limits = [limiter(config, (i, count)) for i in range(count)]
    assert [limit.limit for limit in limits] == parts
    note = f", this worker's share of {total}" if count > 1 else ""
    assert {limit.share_note for limit in limits} == {note}
