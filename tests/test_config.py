"""Config loading in-process: units, precedence, messages, paths, shipped files, docs.

The same bad configs through the real command line are in tests/test_cli.py;
here are the rules that are cheaper to check without a subprocess.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from sidecar.checks import config_warnings
from sidecar.cli import load_checked
from sidecar.config import (
    MethodFallback,
    SidecarConfig,
    dump_yaml,
    env_overrides,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
    to_yaml_data,
)
from sidecar.docs import config_keys, key_paths, main, render_config_reference
from sidecar.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IDL = REPO / "idl" / "example.thrift"
SHIPPED = REPO / "config" / "sidecar.yaml"
DEMO = REPO / "config" / "demo.yaml"


def write(tmp_path: Path, data: dict[str, Any] | str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict[str, Any] | str, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), environ=kwargs.pop("environ", {}), **kwargs)
    return str(info.value)


# units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1.5s", 1.5), (3, 3.0)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [("16MiB", 16 << 20), ("64KiB", 65536), ("1GiB", 1 << 30), ("2MB", 2_000_000), (100, 100)],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["5d", "ms", "1 sec", "", True, None, "1e3s", [1]])
def test_bad_durations_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_non_finite_duration_is_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        parse_duration(math.inf)


@given(st.integers(min_value=0, max_value=10**9))
def test_format_duration_round_trips_milliseconds(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@given(st.integers(min_value=0, max_value=1 << 40))
def test_format_size_round_trips(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_formats_read_as_people_write_them() -> None:
    assert [format_duration(s) for s in (0.025, 0.5, 1.5, 10, 300, 7200, 0)] == [
        "25ms",
        "500ms",
        "1.5s",
        "10s",
        "5m",
        "2h",
        "0s",
    ]
    assert [format_size(b) for b in (16 << 20, 1536, 100, 1 << 30)] == [
        "16MiB",
        "1536B",
        "100B",
        "1GiB",
    ]


# precedence: flags > environment > file > defaults


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path, {"listen": "127.0.0.1:1001", "retry": {"max_attempts": 5}})
    env = {"SIDECAR_LISTEN": "127.0.0.1:1002", "SIDECAR_RETRY__MAX_ATTEMPTS": "6"}
    flags = {("listen",): "127.0.0.1:1003"}
    assert load_config(None, environ={}).listen == "0.0.0.0:9090"
    assert load_config(path, environ={}).listen == "127.0.0.1:1001"
    from_env = load_config(path, environ=env)
    assert (from_env.listen, from_env.retry.max_attempts) == ("127.0.0.1:1002", 6)
    from_flag = load_config(path, environ=env, overrides=flags)
    assert (from_flag.listen, from_flag.retry.max_attempts) == ("127.0.0.1:1003", 6)
    # Keys nobody set keep their defaults.
    assert from_flag.retry.deadline == SidecarConfig().retry.deadline


def test_env_lists_nulls_empty_and_method_names() -> None:
    env = {
        "SIDECAR_UPSTREAM": "10.0.0.1:9091, 10.0.0.2:9091",
        "SIDECAR_RETRY__RETRY_ON": "timeout,connect_error",
        "SIDECAR_METRICS_LISTEN": "null",
        "SIDECAR_IDL": "",  # empty: unset
        "SIDECAR_METHODS__getItem__RETRY__MAX_ATTEMPTS": "4",
        "SIDECAR_METHODS__placeOrder__IDEMPOTENT": "false",
        "SIDECAR_LOG_LEVEL": "DEBUG",
        "SIDECAR_CONFIG": "/nonexistent.yaml",  # read by the CLI, not a key
        "OTHER": "x",
    }
    config = load_config(None, environ=env)
    assert config.upstream.addresses == ("10.0.0.1:9091", "10.0.0.2:9091")
    assert config.retry.retry_on == ("timeout", "connect_error")
    assert config.metrics.listen is None
    assert config.idl is None
    assert config.methods["getItem"].retry.max_attempts == 4
    assert config.methods["placeOrder"].idempotent is False
    assert config.log.level == "debug"
    assert ("idl",) not in env_overrides(env)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SIDECAR_RETRY__MAX_ATTEMPTS": "abc"},
            [
                "retry.max_attempts (from environment variable SIDECAR_RETRY__MAX_ATTEMPTS)",
                "whole number",
                "'abc'",
            ],
        ),
        (
            {"SIDECAR_RETRY__MAX_ATEMPTS": "3"},
            ["SIDECAR_RETRY__MAX_ATEMPTS", "did you mean SIDECAR_RETRY__MAX_ATTEMPTS?"],
        ),
        ({"SIDECAR_LISTEN": "nowhere"}, ["listen (from environment variable SIDECAR_LISTEN)"]),
        (
            {"SIDECAR_UPSTREAM": "127.0.0.1:1,bad"},
            ["upstream.addresses[1] (from environment variable SIDECAR_UPSTREAM)", "'bad'"],
        ),
    ],
)
def test_env_errors_name_the_variable(env: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=env)
    message = str(info.value)
    for part in expected:
        assert part in message
    # No file was involved, so the message must not blame one (or "defaults").
    assert "defaults" not in message
    assert " in " not in message.split(":")[0]


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


def test_did_you_mean_reaches_into_methods(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"methods": {"getItem": {"fallback": {"statc": 1}}}})
    assert "methods.getItem.fallback.statc: unknown key (did you mean 'static'?)" in message


def test_duplicate_yaml_key_names_both_lines(tmp_path: Path) -> None:
    message = error_of(tmp_path, "retry:\n  max_attempts: 3\n  deadline: 1s\n  max_attempts: 5\n")
    assert "line 4" in message
    assert "'max_attempts' appears twice" in message
    assert "first on line 2" in message


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = "x-base: &base {fail_max: 3}\nbreaker:\n  <<: *base\n  fail_max: 4\n"
    # x-base is unknown (an error of its own), but the merge is not a duplicate key.
    assert "appears twice" not in error_of(tmp_path, text)
    text = "breaker:\n  <<: {fail_max: 3}\n  fail_max: 4\n"
    assert load_config(write(tmp_path, text), environ={}).breaker.fail_max == 4


# relative paths


def test_idl_in_file_is_relative_to_the_file(tmp_path: Path) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (tmp_path / "svc.thrift").write_text(EXAMPLE_IDL.read_text())
    config = load_config(write(sub, {"idl": "../svc.thrift"}), environ={})
    assert config.idl == str((tmp_path / "svc.thrift").resolve())


def test_idl_from_flag_or_env_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sub = tmp_path / "conf"
    sub.mkdir()
    (tmp_path / "svc.thrift").write_text(EXAMPLE_IDL.read_text())
    path = write(sub, {"listen": "127.0.0.1:1"})
    monkeypatch.chdir(tmp_path)
    by_flag = load_config(path, environ={}, overrides={("idl",): "svc.thrift"})
    by_env = load_config(path, environ={"SIDECAR_IDL": "svc.thrift"})
    assert by_flag.idl == by_env.idl == str((tmp_path / "svc.thrift").resolve())
    with pytest.raises(ConfigError, match=r"idl \(from environment variable SIDECAR_IDL\)"):
        load_config(path, environ={"SIDECAR_IDL": "../svc.thrift"})


def test_sqlite_path_is_relative_to_the_file(tmp_path: Path) -> None:
    data = {"fallback": {"cache": {"backend": "sqlite", "path": "cache.db"}}}
    config = load_config(write(tmp_path, data), environ={})
    assert config.fallback.cache.path == str(tmp_path.resolve() / "cache.db")


# cross-key rules


def test_admin_port_cannot_be_the_listen_port(tmp_path: Path) -> None:
    message = error_of(
        tmp_path, {"listen": "127.0.0.1:7000", "metrics": {"listen": "0.0.0.0:7000"}}
    )
    assert "metrics.listen: the admin endpoint cannot share the port of listen" in message
    # Port 0 means "any free port": two of them do not clash.
    data = {"listen": "127.0.0.1:0", "metrics": {"listen": "127.0.0.1:0"}}
    assert load_config(write(tmp_path, data), environ={}).metrics.listen == "127.0.0.1:0"


def test_method_keys_are_names_not_patterns(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"methods": {"get*": {"idempotent": True}}})
    assert "methods.get*: not a method name" in message
    assert "(got 'get*')" in message
    ok = {"methods": {"Catalog:getItem": {}, "com.example.Svc:get_item": {}}}
    assert set(load_config(write(tmp_path, ok), environ={}).methods) == set(ok["methods"])


# shipped files, effective config, docs


def test_shipped_config_states_every_default() -> None:
    """config/sidecar.yaml's values are the defaults, except the marked examples."""
    shipped = yaml.safe_load(SHIPPED.read_text())
    defaults = to_yaml_data(SidecarConfig())
    examples = {"idl", "methods"}
    for key, value in defaults.items():
        if key in examples:
            continue
        if key == "upstream":
            value = {**value, "addresses": shipped["upstream"]["addresses"]}
        assert _normalise(shipped[key]) == _normalise(value), key


def _normalise(value: Any) -> Any:
    """Parse units so that `10.0` and `10`, or `5m` and `300s`, compare equal."""
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, str):
        for parse in (parse_duration, parse_size):
            try:
                return float(parse(value))
            except ValueError:
                pass
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _yaml_key_paths(data: Any, prefix: str = "") -> set[str]:
    found: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            name = "<method>" if prefix == "methods." else str(key)
            path = prefix + name
            found.add(path)
            if key in ("static", "value") and prefix.endswith(("fallback.", "static_exception.")):
                continue  # the value of a static reply is the service's data, not keys
            found |= _yaml_key_paths(value, path + ".")
    return found


def test_shipped_config_mentions_every_key() -> None:
    written = _yaml_key_paths(yaml.safe_load(SHIPPED.read_text()))
    written.discard("methods")
    missing = sorted(set(key_paths()) - written - {"methods"})
    assert not missing, f"config/sidecar.yaml does not mention {missing}"
    unknown = sorted(written - set(key_paths()) - {"methods.<method>"})
    assert not unknown


def test_shipped_configs_load_with_their_idl() -> None:
    for path in (SHIPPED, DEMO):
        config, parts = load_checked(str(path), environ={})
        assert config.idl == str(EXAMPLE_IDL.resolve())
        assert parts["static_replies"], path
    demo = load_config(DEMO, environ={})
    assert demo.upstream.addresses == ("127.0.0.1:9091",)
    assert 1 <= demo.breaker.reset_timeout <= 5
    assert demo.fallback.serve_on


def test_effective_config_dump_loads_back_the_same(tmp_path: Path) -> None:
    config = load_config(SHIPPED, environ={})
    text = dump_yaml(to_yaml_data(config))
    assert "max_frame_size: 16MiB" in text
    assert "initial_backoff: 25ms" in text
    again = load_config(write(tmp_path, text), environ={})
    assert again == config


def test_every_key_has_a_description() -> None:
    keys = config_keys()
    assert len(keys) == len(key_paths()) > 60
    assert all(k.description.strip() for k in keys)


def test_config_reference_is_up_to_date() -> None:
    checked_in = (REPO / "docs" / "config-reference.md").read_text()
    assert checked_in == render_config_reference(), (
        "docs/config-reference.md is stale: run "
        "`python -m sidecar.docs config --write docs/config-reference.md`"
    )
    for key in config_keys():
        heading = "." not in key.path and (key.section or key.type == "mapping of sections")
        assert (f"## `{key.path}`" if heading else f"| `{key.path}` |") in checked_in


def test_docs_check_flag_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "ref.md"
    stale.write_text(render_config_reference().replace("`250ms`", "`300ms`", 1) + "x\n")
    assert main(["config", "--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["config", "--write", str(stale)]) == 0
    assert main(["config", "--check", str(stale)]) == 0


# warnings


def test_warnings_for_settings_that_are_valid_but_unintended(tmp_path: Path) -> None:
    data = {
        "idl": str(EXAMPLE_IDL),
        "listen": "127.0.0.1:9090",
        "upstream": {"addresses": ["localhost:9090"]},
        "retry": {"idempotent": ["*"], "initial_backoff": "2s", "max_backoff": "1s"},
        "methods": {
            "placeOrder": {"retry": {"max_attempts": 3}},
            "getItm": {"idempotent": True},
        },
    }
    config, parts = load_checked(str(write(tmp_path, data)), environ={})
    text = "\n".join(config_warnings(config, parts["known_methods"]))
    assert "retrying after send is enabled for placeOrder, whose name suggests a write" in text
    assert "retry.idempotent matches every method" in text
    assert "methods.getItm: the IDL has no such method" in text
    assert "calls would loop back into the sidecar" in text
    assert "retry.initial_backoff (2s) is longer than retry.max_backoff (1s)" in text


def test_explicitly_idempotent_write_is_warned_about(tmp_path: Path) -> None:
    data = {
        "upstream": {"addresses": ["127.0.0.1:1"]},
        "methods": {"placeOrder": {"idempotent": True}, "submit": {"retry": {"max_attempts": 4}}},
    }
    warnings = config_warnings(load_config(write(tmp_path, data), environ={}))
    assert any("retrying after send is enabled for method placeOrder" in w for w in warnings)
    assert any(
        "methods.submit.retry.max_attempts is 4 but submit is not idempotent" in w for w in warnings
    )


def test_shipped_configs_have_no_warnings() -> None:
    for path in (SHIPPED, DEMO):
        config, parts = load_checked(str(path), environ={})
        assert config_warnings(config, parts["known_methods"]) == [], path


def test_a_section_with_every_key_commented_out_means_defaults(tmp_path: Path) -> None:
    text = "retry:\n  # max_attempts: 5\nmethods:\nbreaker:\n  fail_max: 2\n"
    config = load_config(write(tmp_path, text), environ={})
    assert config.retry == SidecarConfig().retry
    assert config.methods == {}
    assert config.breaker.fail_max == 2
    # A per-method section that is null is still "no static exception", not an error.
    text = "methods:\n  getItem:\n    fallback:\n      static_exception:\n"
    fallback = load_config(write(tmp_path, text), environ={}).methods["getItem"].fallback
    assert fallback == MethodFallback()
