"""What a valid config still needs to run (`require_upstream`) and warnings about it."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.cli.loading import load_checked
from sidecar.config import SidecarConfig, config_warnings, load_config, require_upstream
from sidecar.errors import ConfigError
from tests.config.files import DEMO, EXAMPLE_IDL, SHIPPED, write


def test_require_upstream_names_every_way_to_set_one() -> None:
    with pytest.raises(ConfigError) as info:
        require_upstream(SidecarConfig())
    assert str(info.value) == (
        "upstream.addresses: at least one upstream address is needed to run; set "
        "upstream.addresses in the file, --upstream HOST:PORT or SIDECAR_UPSTREAM"
    )
    require_upstream(SidecarConfig.model_validate({"upstream": {"addresses": ["127.0.0.1:1"]}}))


def test_no_upstream_is_a_warning_with_the_same_advice() -> None:
    warnings = config_warnings(SidecarConfig())
    assert any(
        w.startswith("no upstream address") and "--upstream HOST:PORT or SIDECAR_UPSTREAM" in w
        for w in warnings
    ), warnings


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


def test_idempotency_follows_the_same_rule_as_the_policy() -> None:
    """``Svc:m`` says nothing about idempotency, ``m`` does: ``m``'s setting counts."""
    config = SidecarConfig.model_validate(
        {
            "upstream": {"addresses": ["127.0.0.1:1"]},
            "methods": {
                "Catalog:placeOrder": {"retry": {"max_attempts": 3}},
                "placeOrder": {"idempotent": True},
            },
        }
    )
    text = "\n".join(config_warnings(config))
    assert "Catalog:placeOrder is not idempotent" not in text
    assert "retrying after send is enabled for method placeOrder" in text


def test_without_the_idl_no_method_is_called_unknown() -> None:
    config = SidecarConfig.model_validate(
        {"upstream": {"addresses": ["127.0.0.1:1"]}, "methods": {"getItem": {}}}
    )
    assert config_warnings(config, known_methods=None) == []
    assert "the IDL has no such method" in "\n".join(config_warnings(config, known_methods=[]))


def test_shipped_configs_have_no_warnings() -> None:
    for path in (SHIPPED, DEMO):
        config, parts = load_checked(str(path), environ={})
        assert config_warnings(config, parts["known_methods"]) == [], path
