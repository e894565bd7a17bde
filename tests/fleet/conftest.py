"""Fixtures of the fleet tests: one ``redis-server`` per session, a restartable one per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.fleet import RedisServer, redis_server


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[RedisServer]:
    """A redis-server for the whole session; tests keep apart by key prefix (`key_prefix`)."""
    with redis_server() as server:
        yield server


@pytest.fixture
def redis_server_fixture() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and start again."""
    with redis_server() as server:
        yield server


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses."""
    return f"t-{uuid.uuid4().hex[:12]}"
