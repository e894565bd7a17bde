"""Loading: the YAML file, precedence of the layers, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli.loading import load_checked
from sidecar.config import SidecarConfig, load_config
from sidecar.config.load import read_yaml, set_path
from sidecar.errors import ConfigError
from tests.config.files import DEMO, EXAMPLE_IDL, SHIPPED, error_of, write

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


def test_set_path_makes_and_replaces_sections_on_the_way() -> None:
    data: dict[str, object] = {"retry": 3, "listen": "a:1"}
    set_path(data, ("retry", "budget", "ratio"), 0.5)
    set_path(data, ("log", "level"), "debug")
    assert data == {
        "retry": {"budget": {"ratio": 0.5}},
        "listen": "a:1",
        "log": {"level": "debug"},
    }


# the YAML file


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


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"- listen: 0.0.0.0:9090\n", "the top level must be a mapping of keys"),
        (b"just words\n", "not a plain string"),
        (b"1: x\n", "1: keys must be names"),
        (b"retry:\n\tmax_attempts: 3\n", "not tabs"),
        (b"listen: \xff\n", "not UTF-8 text"),
    ],
)
def test_files_that_are_no_config_are_named(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)) as info:
        read_yaml(path)
    assert expected in str(info.value)


def test_an_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing yet\n"), environ={}) == SidecarConfig()


def test_a_section_with_every_key_commented_out_means_defaults(tmp_path: Path) -> None:
    text = "retry:\n  # max_attempts: 5\nmethods:\nbreaker:\n  fail_max: 2\n"
    config = load_config(write(tmp_path, text), environ={})
    assert config.retry == SidecarConfig().retry
    assert config.methods == {}
    assert config.breaker.fail_max == 2


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


def test_an_idl_that_is_a_directory_is_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"idl": "."})
    path = tmp_path / "c.yaml"
    assert message.startswith(f"invalid configuration in {path}: idl: is a directory: '.'")


def test_sqlite_path_is_relative_to_the_file(tmp_path: Path) -> None:
    data = {"fallback": {"cache": {"backend": "sqlite", "path": "cache.db"}}}
    config = load_config(write(tmp_path, data), environ={})
    assert config.fallback.cache.path == str(tmp_path.resolve() / "cache.db")


# shipped files


def test_shipped_configs_load_with_their_idl() -> None:
    for path in (SHIPPED, DEMO):
        config, parts = load_checked(str(path), environ={})
        assert config.idl == str(EXAMPLE_IDL.resolve())
        assert parts["static_replies"], path
    demo = load_config(DEMO, environ={})
    assert demo.upstream.addresses == ("127.0.0.1:9091",)
    assert 1 <= demo.breaker.reset_timeout <= 5
    assert demo.fallback.serve_on
