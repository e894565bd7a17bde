"""Which per-method entries and patterns apply to a wire method name."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config import SidecarConfig, is_idempotent, matches_any, method_overrides


def config(**data: Any) -> SidecarConfig:
    return SidecarConfig.model_validate(data)


@pytest.mark.parametrize(
    ("name", "patterns", "expected"),
    [
        ("getItem", ["get*"], True),
        ("Catalog:getItem", ["get*"], True),  # a bare pattern sees the bare method
        ("Catalog:getItem", ["Catalog:get*"], True),
        ("Other:getItem", ["Catalog:get*"], False),
        ("getItem", ["Catalog:get*"], False),
        ("GetItem", ["get*"], False),  # case counts, as in Thrift
        ("placeOrder", [], False),
        ("ping", ["*:ping", "ping"], True),
    ],
)
def test_matches_any(name: str, patterns: list[str], expected: bool) -> None:
    assert matches_any(name, patterns) is expected


def test_method_overrides_most_specific_first() -> None:
    c = config(
        methods={
            "Catalog:getItem": {"retry": {"max_attempts": 5}},
            "getItem": {"retry": {"max_attempts": 2}},
            "ping": {},
        }
    )
    assert method_overrides(c, "Catalog:getItem") == [
        c.methods["Catalog:getItem"],
        c.methods["getItem"],
    ]
    assert method_overrides(c, "Other:getItem") == [c.methods["getItem"]]
    assert method_overrides(c, "getItem") == [c.methods["getItem"]]
    assert method_overrides(c, "Other:ping") == [c.methods["ping"]]
    assert method_overrides(c, "listItems") == []


def test_is_idempotent_first_setting_then_patterns() -> None:
    c = config(
        retry={"idempotent": ["get*"]},
        methods={
            "Catalog:getItem": {"idempotent": False},
            "Catalog:putItem": {"retry": {"max_attempts": 2}},  # says nothing: the next one does
            "putItem": {"idempotent": True},
        },
    )
    assert is_idempotent(c, "getItem")  # the pattern
    assert is_idempotent(c, "Other:getItem")
    assert not is_idempotent(c, "Catalog:getItem")  # the entry beats the pattern
    assert is_idempotent(c, "Catalog:putItem")  # unset here, set on the bare name
    assert is_idempotent(c, "putItem")
    assert not is_idempotent(c, "deleteItem")
