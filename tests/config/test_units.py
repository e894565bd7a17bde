"""Durations, sizes and addresses: parsing, formatting, round trips."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import SidecarConfig
from sidecar.config.fallback import CacheConfig
from sidecar.config.overrides import RetryOverride
from sidecar.config.policy import RetryConfig
from sidecar.config.units import (
    field_kind,
    format_duration,
    format_size,
    parse_address,
    parse_duration,
    parse_size,
    split_address,
)
from sidecar.config.upstream import UpstreamConfig


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


@pytest.mark.parametrize("bad", ["16mb", "1.5MiB", "-1", True, None, 1.5])
def test_bad_sizes_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


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


def test_addresses_split_into_host_and_port() -> None:
    assert split_address("127.0.0.1:9090") == ("127.0.0.1", 9090)
    assert split_address("[::1]:0") == ("::1", 0)
    assert split_address("db.example:65535") == ("db.example", 65535)
    assert parse_address("localhost:1") == "localhost:1"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("localhost", "expected HOST:PORT"),
        (":9090", "expected HOST:PORT"),
        ("host:http", "expected HOST:PORT"),
        ("host:65536", "port 65536 is out of range"),
        (9090, "expected HOST:PORT"),
    ],
)
def test_bad_addresses_are_refused(bad: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_address(bad)


def test_field_kind_names_the_unit_types_optional_or_not() -> None:
    fields = {
        **{f"top.{k}": v for k, v in SidecarConfig.model_fields.items()},
        **{f"retry.{k}": v for k, v in RetryConfig.model_fields.items()},
        **{f"cache.{k}": v for k, v in CacheConfig.model_fields.items()},
        **{f"upstream.{k}": v for k, v in UpstreamConfig.model_fields.items()},
    }
    kinds = {name: field_kind(f.annotation, f.metadata) for name, f in fields.items()}
    assert kinds["retry.deadline"] == kinds["top.drain_timeout"] == "duration"
    assert kinds["top.max_frame_size"] == kinds["cache.max_bytes"] == "size"
    assert kinds["top.listen"] == "address"
    assert kinds["retry.max_attempts"] is None
    assert kinds["upstream.addresses"] is None  # a list of addresses, not one
    deadline = RetryOverride.model_fields["deadline"]
    assert field_kind(deadline.annotation, deadline.metadata) == "duration"
