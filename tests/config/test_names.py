"""One table of short names gives the flags and the short environment variables."""

from __future__ import annotations

from sidecar.config import ENV_SHORTCUTS, FLAG_KEYS, SHORT_NAMES, env_name, load_config
from sidecar.config.keys import annotation_at


def test_flags_and_variables_come_from_the_one_table() -> None:
    assert list(FLAG_KEYS.values()) == list(ENV_SHORTCUTS.values()) == list(SHORT_NAMES.values())
    for flag, key_path in FLAG_KEYS.items():
        assert ENV_SHORTCUTS["SIDECAR_" + flag[2:].upper().replace("-", "_")] == key_path
    assert FLAG_KEYS["--redis-url"] == ENV_SHORTCUTS["SIDECAR_REDIS_URL"] == ("state", "redis_url")


def test_every_short_name_is_a_key() -> None:
    for key_path in SHORT_NAMES.values():
        assert annotation_at(key_path) is not None, key_path


def test_a_shortcut_and_the_generic_variable_set_the_same_key() -> None:
    values = {
        "SIDECAR_UPSTREAM": "127.0.0.1:1,127.0.0.1:2",
        "SIDECAR_UPSTREAM_TRANSPORT": "framed",
        "SIDECAR_METRICS_LISTEN": "127.0.0.1:3",
        "SIDECAR_REDIS_URL": "redis://127.0.0.1:6379/0",
        "SIDECAR_LOG_LEVEL": "debug",
        "SIDECAR_LOG_FORMAT": "json",
    }
    for variable, value in values.items():
        key_path = ENV_SHORTCUTS[variable]
        generic = env_name(key_path)
        assert generic != variable
        by_shortcut = load_config(None, environ={variable: value})
        assert by_shortcut == load_config(None, environ={generic: value}), variable
        assert by_shortcut != load_config(None, environ={}), variable
