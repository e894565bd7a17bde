"""``upstream.max_in_flight`` and the ``shed`` fallback reason: defaults, values, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import load_config
from tests.config.files import error_of, write


def test_no_limit_by_default_and_shed_calls_get_fallbacks() -> None:
    config = load_config(None, environ={})
    assert config.upstream.max_in_flight is None
    assert "shed" in config.fallback.serve_on


def test_a_limit_from_the_file_or_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path, {"upstream": {"max_in_flight": 32}})
    assert load_config(path, environ={}).upstream.max_in_flight == 32
    environ = {"SIDECAR_UPSTREAM__MAX_IN_FLIGHT": "8"}
    assert load_config(path, environ=environ).upstream.max_in_flight == 8
    null = write(tmp_path, {"upstream": {"max_in_flight": None}}, "null.yaml")
    assert load_config(null, environ={}).upstream.max_in_flight is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "upstream.max_in_flight: must be at least 1 (got 0)"),
        (-3, "upstream.max_in_flight: must be at least 1 (got -3)"),
        ("many", "upstream.max_in_flight: expected a whole number (got 'many')"),
        (2.5, "upstream.max_in_flight: expected a whole number (got 2.5)"),
    ],
)
def test_a_limit_below_one_or_not_a_number_is_an_error(
    tmp_path: Path, value: object, expected: str
) -> None:
    assert expected in error_of(tmp_path, {"upstream": {"max_in_flight": value}})


def test_an_unknown_fallback_reason_names_shed_among_the_choices(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"fallback": {"serve_on": ["shed", "overload"]}})
    assert "fallback.serve_on[1]" in message
    assert "breaker_open, retries_exhausted, shed" in message
    assert "'overload'" in message


def test_adaptive_concurrency_is_off_by_default_and_takes_envoys_defaults() -> None:
    assert load_config(None, environ={}).upstream.adaptive_concurrency is None


def test_adaptive_concurrency_with_defaults_and_durations(tmp_path: Path) -> None:
    raw = {"upstream": {"adaptive_concurrency": {"update_interval": "250ms"}}}
    adaptive = load_config(write(tmp_path, raw), environ={}).upstream.adaptive_concurrency
    assert adaptive is not None
    assert adaptive.update_interval == 0.25
    assert (adaptive.min_concurrency, adaptive.max_concurrency) == (3, 1000)
    assert (adaptive.min_rtt_interval, adaptive.min_rtt_requests) == (60.0, 50)
    assert (adaptive.sample_percentile, adaptive.min_rtt_buffer, adaptive.jitter) == (50, 25, 15)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (
            {"min_concurrency": 20, "max_concurrency": 10},
            "upstream.adaptive_concurrency.min_concurrency: must not be above max_concurrency "
            "(10) (got 20)",
        ),
        ({"min_concurrency": 0}, "upstream.adaptive_concurrency.min_concurrency: must be at"),
        ({"sample_percentile": 0}, "upstream.adaptive_concurrency.sample_percentile: "),
        ({"jitter": 150}, "upstream.adaptive_concurrency.jitter: "),
        ({"update_interval": "0s"}, "upstream.adaptive_concurrency.update_interval: "),
        ({"min_rtt_request": 5}, "upstream.adaptive_concurrency.min_rtt_request"),
    ],
)
def test_adaptive_concurrency_errors_name_the_key(
    tmp_path: Path, settings: dict[str, object], expected: str
) -> None:
    assert expected in error_of(tmp_path, {"upstream": {"adaptive_concurrency": settings}})
