"""Fixtures of the integration tests: the session's sidecars."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration import Deployments


@pytest.fixture(scope="session")
def deployments() -> Iterator[Deployments]:
    """Sidecars started on first use and stopped (and checked) when the session ends."""
    started = Deployments()
    try:
        yield started
    finally:
        started.close()
