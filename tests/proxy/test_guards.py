"""The guard of `Call` and `ClientConnection` (`sidecar.proxy.guards`).

What a bug costs each of them is tested with a running sidecar
(tests/proxy/test_call.py, tests/proxy/test_client.py); here, the guard
itself: what a guarded method returns, that a bug reaches the object's
``_crashed`` with the exception still current, and that methods of up to two
arguments get a wrapper of their own arity (no ``*args`` packing per call).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import pytest

from sidecar.metrics.calls import MethodStats
from sidecar.protocol.envelope import parse_header
from sidecar.proxy.guards import guarded, positional_count


class Bug(RuntimeError):
    """A bug, planted by the test."""


class Owner:
    """An object with guarded ways in, of every arity the guard knows."""

    def __init__(self) -> None:
        self.crashes: list[BaseException | None] = []

    def _crashed(self) -> None:
        self.crashes.append(sys.exc_info()[1])

    @guarded
    def none(self) -> str:
        """No argument."""
        return "none"

    @guarded
    def one(self, a: int) -> int:
        return a

    @guarded
    def two(self, a: int, b: int) -> int:
        return a + b

    @guarded
    def three(self, a: int, b: int, c: int) -> int:
        return a + b + c

    @guarded
    def keyword(self, a: int, *, b: int = 1) -> int:
        return a * b

    @guarded
    def broken(self, a: int) -> int:
        raise Bug(str(a))


def test_a_guarded_method_returns_what_it_returns() -> None:
    owner = Owner()
    assert owner.none() == "none"
    assert owner.one(1) == 1
    assert owner.two(1, 2) == 3
    assert owner.three(1, 2, 3) == 6
    assert owner.keyword(2, b=3) == 6
    assert owner.crashes == []


def test_a_bug_goes_to_crashed_with_the_exception_current() -> None:
    owner = Owner()
    assert owner.broken(7) is None
    [crash] = owner.crashes
    assert isinstance(crash, Bug)
    assert str(crash) == "7"


def test_the_guard_keeps_the_docstring() -> None:
    assert Owner.none.__doc__ == "No argument."


@pytest.mark.pure_python("reads the wrapper's signature; a compiled wrapper has none to read")
@pytest.mark.parametrize(("name", "arity"), [("none", 1), ("one", 2), ("two", 3), ("three", 3)])
def test_up_to_two_arguments_get_a_wrapper_of_their_own_arity(name: str, arity: int) -> None:
    wrapper = getattr(Owner, name)
    if name == "three":  # three arguments after self: the general wrapper
        assert inspect.getfullargspec(wrapper).varargs == "args"
        return
    assert positional_count(wrapper) == arity


@pytest.mark.parametrize(
    ("function", "count"),
    [
        (lambda: None, 0),
        (lambda self: None, 1),
        (lambda self, a, /: None, 2),
        (lambda self, a, b: None, 3),
        (lambda self, a=1: None, -1),
        (lambda self, *args: None, -1),
        (lambda self, *, a: None, -1),
        (lambda self, **kwargs: None, -1),
        (len, 1),  # a builtin, read from its text signature
        (bytearray.find, -1),  # a builtin without one
    ],
)
def test_positional_count(function: Any, count: int) -> None:
    assert positional_count(function) == count


@pytest.mark.parametrize(
    ("function", "count"),
    [(MethodStats.request, 3), (MethodStats.attempt, 3), (parse_header, -1)],
)
def test_positional_count_of_the_sidecars_own_functions(function: Any, count: int) -> None:
    """In the compiled build these have no code object: their counts come from the
    signatures mypyc gives them, or every guard there would pack ``*args``."""
    assert positional_count(function) == count
