"""Test configuration shared by every test directory."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import prometheus_client.metrics
import pytest

# Tests import `sidecar` and `tests.support` from the checkout, installed or not.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support.redis import RedisServer, redis_server  # noqa: E402  (after the path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In a run of the compiled build, skip the tests marked ``pure_python``, with their reason.

    They inject a fault or read a detail by patching or inspecting module
    internals that the compiled build binds when it is built (a function
    replaced on a class or module, a method's signature); the pure-Python
    run of the same source runs them (docs/compiled.md).
    """
    from sidecar import native

    if native.build() == "python":
        return
    for item in items:
        marker = item.get_closest_marker("pure_python")
        if marker is not None:
            item.add_marker(pytest.mark.skip(reason=f"pure Python only: {marker.args[0]}"))


@pytest.fixture(autouse=True)
def created_switch() -> Iterator[None]:
    """Put back prometheus_client's process-wide ``_created`` switch after each test.

    `sidecar.admin.AdminServer.listen` turns it off for the whole process (the
    sidecar is one process); the next test must see the library's default.
    """
    was_on = prometheus_client.metrics._use_created
    yield
    if was_on:
        prometheus_client.enable_created_metrics()  # type: ignore[no-untyped-call]
    else:
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


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
