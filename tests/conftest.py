"""Test configuration shared by every test directory."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

# Imported before any test runs. A run with no property test would otherwise import
# it in hypothesis's terminal summary, where pytest's assertion rewriting parses it
# while the run's garbage is collected, and CPython 3.11's ast.parse can then fail with
# "AST constructor recursion depth mismatch" (python/cpython#106905; seen running
# tests/proxy/test_tls.py alone; tests/support/source.py).
import hypothesis  # noqa: F401
import prometheus_client
import prometheus_client.metrics
import pytest

# Tests import `sidecar` and `tests.support` from the checkout, installed or not.
_REPO_ROOT = str(Path(__file__).resolve().parents[1])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.support.redis import RedisServer, redis_server  # noqa: E402  (after the path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip what another suite of this run takes: ``pure_python`` tests outside the
    pure-Python build, ``one_build`` tests outside their one suite.

    ``pure_python``: they inject a fault or read a detail by patching or
    inspecting module internals that the compiled build binds when it is
    built (a function replaced on a class or module, a method's signature).
    ``one_build``: what they test does not depend on the build they run in
    (they build and install a wheel of their own), so running them twice
    would only cost CI minutes. They run in the pure-Python suite, or with
    ``suite="mypyc"`` in the compiled one, when scripts/test runs it too
    (``THRIFT_SIDECAR_TEST_SUITES``): the two suites run at the same time,
    and the one that ends first takes some (docs/compiled.md).
    """
    from sidecar import native

    build = native.build()
    suites = suites_run(build)
    for item in items:
        reason = skipped_here(item.get_closest_marker, build, suites)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


# The builds scripts/test has a suite for (THRIFT_SIDECAR_TEST_BUILDS).
BUILDS: Final = frozenset({"python", "mypyc"})


def suites_run(build: str) -> frozenset[str]:
    """The builds whose suites this run runs: scripts/test says
    (``THRIFT_SIDECAR_TEST_SUITES``); a suite run alone assumes the pure one runs
    too, besides its own."""
    told = os.environ.get("THRIFT_SIDECAR_TEST_SUITES", "").split()
    return frozenset(told) if told else frozenset({"python", build})


def skipped_here(
    marker: Callable[[str], pytest.Mark | None], build: str, suites: frozenset[str]
) -> str | None:
    """Why a test with these markers is skipped in a run of ``build`` among ``suites``;
    None: it runs."""
    pure = marker("pure_python")
    if pure is not None and build != "python":
        return f"pure Python only: {pure.args[0]}"
    one = marker("one_build")
    if one is None:
        return None
    suite = one.kwargs.get("suite", "python")
    if suite not in BUILDS:  # a misspelt suite would run the test elsewhere, unseen
        raise ValueError(f"one_build(suite={suite!r}): a suite is one of {sorted(BUILDS)}")
    if suite not in suites:  # its suite does not run: the pure one takes it, or this one
        suite = "python" if "python" in suites else build
    return None if build == suite else f"one build only ({suite} suite): {one.args[0]}"


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
