"""The models' own rules: defaults, frozen sections, method keys, rules across sections."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from sidecar.config import MethodFallback, SidecarConfig, load_config
from tests.config.files import error_of, write


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


def test_redis_cache_needs_the_redis_url_and_says_how_to_set_it(tmp_path: Path) -> None:
    message = error_of(tmp_path, {"fallback": {"cache": {"backend": "redis"}}})
    assert (
        "fallback.cache.backend: backend redis needs state.redis_url "
        "(or --redis-url, SIDECAR_REDIS_URL) (got 'redis')"
    ) in message


def test_static_and_static_exception_exclude_each_other(tmp_path: Path) -> None:
    data = {"methods": {"getItem": {"fallback": {"static": 1, "static_exception": {"name": "E"}}}}}
    message = error_of(tmp_path, data)
    assert "methods.getItem.fallback.static_exception: set static or static_exception" in message


def test_a_null_per_method_section_is_the_default(tmp_path: Path) -> None:
    text = "methods:\n  getItem:\n    fallback:\n      static_exception:\n"
    fallback = load_config(write(tmp_path, text), environ={}).methods["getItem"].fallback
    assert fallback == MethodFallback()


def test_a_config_is_frozen() -> None:
    config = SidecarConfig()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        config.retry.max_attempts = 5  # type: ignore[misc]
