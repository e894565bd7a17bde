"""Walking the models by key path, and writing key paths for people."""

from __future__ import annotations

from typing import Literal

from sidecar.config import MethodConfig, RetryConfig, SidecarConfig
from sidecar.config.keys import annotation_at, format_key, model_at, split_optional
from sidecar.config.overrides import StaticException


def test_split_optional_takes_none_off_a_union_of_two() -> None:
    assert split_optional(int | None) == (int, True)
    assert split_optional(int) == (int, False)
    assert split_optional(int | str) == (int | str, False)
    assert split_optional(Literal["a", "b"]) == (Literal["a", "b"], False)


def test_annotation_at_follows_sections_mappings_and_lists() -> None:
    assert annotation_at(("retry",)) is RetryConfig
    assert annotation_at(("retry", "max_attempts")) is int
    assert annotation_at(("methods", "getItem")) is MethodConfig
    assert annotation_at(("methods", "getItem", "fallback", "static_exception")) is StaticException
    assert annotation_at(("upstream", "addresses", 0)) is not None
    assert annotation_at(("retry", "max_atempts")) is None
    assert annotation_at(("retry", "max_attempts", "deeper")) is None


def test_model_at_is_the_section_or_none() -> None:
    assert model_at(()) is SidecarConfig
    assert model_at(("retry",)) is RetryConfig
    assert model_at(("retry", "max_attempts")) is None


def test_format_key() -> None:
    assert format_key(("retry", "retry_on", 1)) == "retry.retry_on[1]"
    assert format_key(("listen",)) == "listen"
    assert format_key(()) == "(top level)"
