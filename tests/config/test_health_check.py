"""The ``health_check`` section: defaults, and every error naming its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.config import load_config
from sidecar.errors import ConfigError
from sidecar.fallback.static import EMPTY_ARGUMENTS, load_idl_parts
from tests.config.files import REPO, error_of, write

INTEROP_IDL = REPO / "idl" / "interop.thrift"


def test_off_by_default_and_defaults_when_on(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, {}), environ={}).health_check is None
    check = load_config(write(tmp_path, {"health_check": {"method": "ping"}}), environ={})
    assert check.health_check is not None
    h = check.health_check
    assert (h.method, h.arguments, h.interval, h.timeout) == ("ping", None, 5.0, 1.0)
    assert (h.unhealthy_threshold, h.healthy_threshold) == (3, 2)


def test_set_from_the_environment(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, {}),
        environ={
            "SIDECAR_HEALTH_CHECK__METHOD": "Catalog:ping",
            "SIDECAR_HEALTH_CHECK__INTERVAL": "2s",
        },
    )
    assert config.health_check is not None
    assert (config.health_check.method, config.health_check.interval) == ("Catalog:ping", 2.0)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({}, "health_check.method: required key is missing"),
        ({"method": "get item"}, "health_check.method: expected a method name"),
        ({"method": "ping", "interval": "0s"}, "health_check.interval: must be longer than zero"),
        ({"method": "ping", "timeout": "2s", "interval": "1s"}, "health_check.timeout: a probe"),
        ({"method": "ping", "unhealthy_threshold": 0}, "health_check.unhealthy_threshold"),
        ({"method": "ping", "healthy_threshold": 0}, "health_check.healthy_threshold"),
        ({"method": "ping", "intervall": "1s"}, "health_check.intervall: unknown key"),
        ({"method": "ping", "arguments": [1]}, "health_check.arguments"),
    ],
)
def test_bad_sections_name_the_key(tmp_path: Path, section: dict[str, Any], expected: str) -> None:
    assert expected in error_of(tmp_path, {"health_check": section})


def idl_error(tmp_path: Path, section: dict[str, Any], idl: Path | None = INTEROP_IDL) -> str:
    data: dict[str, Any] = {"health_check": section}
    if idl is not None:
        data["idl"] = str(idl)
    config = load_config(write(tmp_path, data), environ={})
    with pytest.raises(ConfigError) as info:
        load_idl_parts(config)
    return str(info.value)


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"method": "getItem", "arguments": {"id": "x"}}, "health_check.arguments.id: expected"),
        (
            {"method": "getItem", "arguments": {"ids": 1}},
            "health_check.arguments.ids: getItem_args",
        ),
        ({"method": "getItems"}, "health_check.method: no such method"),
        ({"method": "notify", "arguments": {"tag": "x"}}, "health_check.method: notify is oneway"),
        ({"method": "Echo:echo", "arguments": {"message": 5}}, "health_check.arguments.message"),
    ],
)
def test_arguments_are_checked_against_the_idl(
    tmp_path: Path, section: dict[str, Any], expected: str
) -> None:
    assert expected in idl_error(tmp_path, section)


def test_arguments_without_an_idl_are_an_error(tmp_path: Path) -> None:
    message = idl_error(tmp_path, {"method": "getItem", "arguments": {"id": 1}}, idl=None)
    assert message.startswith("health_check.arguments: the probe's arguments are typed")


def test_arguments_are_encoded_once_in_the_binary_protocol(tmp_path: Path) -> None:
    def parts(section: dict[str, Any], idl: Path | None = INTEROP_IDL) -> bytes:
        data: dict[str, Any] = {"health_check": section}
        if idl is not None:
            data["idl"] = str(idl)
        arguments = load_idl_parts(load_config(write(tmp_path, data), environ={}))
        return bytes(arguments["health_arguments"])

    assert parts({"method": "ping"}, idl=None) == EMPTY_ARGUMENTS
    assert parts({"method": "ping"}) == EMPTY_ARGUMENTS  # in two services, same arguments
    # getItem(1: i64 id = 7): field header (i64, id 1), the value, STOP.
    assert parts({"method": "getItem", "arguments": {"id": 7}}) == (
        b"\x0a\x00\x01" + (7).to_bytes(8, "big") + b"\x00"
    )
