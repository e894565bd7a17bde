"""Validation errors as one readable paragraph: key paths, origins, did-you-mean, values."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import load_config
from sidecar.config.messages import origin_of, paragraph
from sidecar.errors import ConfigError
from tests.config.files import error_of, write


def test_file_errors_name_the_file_and_flag_errors_the_flag(tmp_path: Path) -> None:
    path = write(tmp_path, {"retry": {"max_attempts": 0}})
    assert error_of(tmp_path, {"retry": {"max_attempts": 0}}).startswith(
        f"invalid configuration in {path}: retry.max_attempts: must be at least 1 (got 0)"
    )
    with pytest.raises(ConfigError) as info:
        load_config(
            path,
            environ={},
            overrides={("retry", "max_attempts"): 3, ("listen",): "x"},
            override_names={("listen",): "--listen"},
        )
    assert str(info.value) == (
        "invalid configuration: listen (from --listen): expected HOST:PORT, "
        "for example 127.0.0.1:9090 (got 'x')"
    )


def test_several_problems_are_listed_together(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"listen": "x", "retry": {"max_attempts": 0, "multipler": 2}})
    lines = message.splitlines()
    assert lines[0].endswith("(3 problems):")
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "listen",
        "retry.max_attempts",
        "retry.multipler",
    ]
    assert "did you mean 'multiplier'?" in lines[3]


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"breaker": {"zzz": 1}})
    assert "breaker.zzz: unknown key; the keys of breaker are: scope, fail_max," in message
    message = error_of(tmp_path, {"zzz": 1})
    assert "zzz: unknown key; the keys of the top level are: listen, transport," in message


def test_did_you_mean_reaches_into_methods(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"methods": {"getItem": {"fallback": {"statc": 1}}}})
    assert "methods.getItem.fallback.statc: unknown key (did you mean 'static'?)" in message


def test_near_misses_of_a_choice_are_suggested(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"breaker": {"scope": "methd"}})
    assert "breaker.scope: must be one of upstream, method (did you mean 'method'?)" in message


def test_long_values_are_cut_short(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"listen": "x" * 200})
    assert "(got 'xxxxx" in message
    assert message.endswith("...)")
    assert len(message) < 250


def test_the_origin_of_a_key_is_that_of_the_nearest_section_set() -> None:
    origins = {("retry",): "environment variable SIDECAR_RETRY", ("listen",): "--listen"}
    assert origin_of(("retry", "budget", "ratio"), origins) == "environment variable SIDECAR_RETRY"
    assert origin_of(("listen",), origins) == "--listen"
    assert origin_of(("breaker", "fail_max"), origins) is None


def test_the_file_is_named_only_when_every_problem_came_from_it() -> None:
    assert paragraph([("a: bad", None)], "c.yaml") == "invalid configuration in c.yaml: a: bad"
    assert paragraph([("a: bad", "--a")], "c.yaml") == "invalid configuration: a: bad"
    assert paragraph([("a: bad", None), ("b: bad", "--b")], None) == (
        "invalid configuration (2 problems):\n  a: bad\n  b: bad"
    )
