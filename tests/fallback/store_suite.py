"""The conformance tests of ``tests/fallback/test_stores.py``, for another backend's file.

A test file imports the three ``test_*`` functions below and defines its own
``make_harness`` fixture (the backend under test, built on a fake clock); pytest
collects them there, with that file's fixture. Every conformance check that
takes ``make_harness`` runs: the ones with no other parameter through
`test_conformance`, the bounds check as it stands there, with its cases.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from tests.fallback import test_stores as conformance

CHECKS = [
    fn
    for name, fn in vars(conformance).items()
    if name.startswith("test_") and "make_harness" in inspect.signature(fn).parameters
]
SIMPLE_CHECKS = [fn for fn in CHECKS if len(inspect.signature(fn).parameters) == 1]


@pytest.mark.parametrize("check", SIMPLE_CHECKS, ids=lambda fn: fn.__name__.removeprefix("test_"))
def test_conformance(check: Callable[..., None], make_harness: Any) -> None:
    check(make_harness)


# The bounds check, with its own cases (its parametrize marks come along).
test_conformance_100k_distinct_keys_stay_within_bounds = (
    conformance.test_100k_distinct_keys_stay_within_bounds
)


def test_every_conformance_check_runs_here() -> None:
    covered = {fn.__name__ for fn in SIMPLE_CHECKS} | {"test_100k_distinct_keys_stay_within_bounds"}
    every = {fn.__name__ for fn in CHECKS}
    # Not a test module: pytest does not rewrite these asserts, so they say what differs.
    assert covered == every, f"not run here: {sorted(every - covered)}"
    assert len(CHECKS) >= 10, f"only {len(CHECKS)} conformance checks found"
