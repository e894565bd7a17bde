"""The guard of every way into a call or a client connection: a bug stops where it came in.

The objects the event loop calls back, a `Call` (its start, replies, errors,
task and timer callbacks) and a `ClientConnection` (its asyncio callbacks),
put each of those methods behind `guarded`. An exception below one goes to
the object's own ``_crashed``, which decides what a bug costs: the call
answers INTERNAL_ERROR, the connection is closed. Nothing above the guard
(the event loop, another call, another connection) sees it.

A guard runs several times on every call, so it is of fixed arity: a method
with no, one or two plain positional arguments after ``self`` gets a wrapper
that takes just those. A wrapper taking ``*args, **kwargs`` packs a tuple and
a dict each time (about 1 µs per proxied call, README "Speed"); it is kept for
any other signature.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar


class Guarded(Protocol):
    """An object whose ways in are guarded: it knows what a bug in one of them costs."""

    def _crashed(self) -> None:
        """Called inside the ``except`` block (the exception is still current)."""


S = TypeVar("S", bound=Guarded)
P = ParamSpec("P")
R = TypeVar("R")


def guarded(step: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R | None]:
    """``step`` behind the guard: what it returns, or None after a bug (handed to ``_crashed``)."""
    arguments = positional_count(step)
    chosen: Callable[..., R | None]
    if arguments == 1:
        chosen = _guard0(step)
    elif arguments == 2:
        chosen = _guard1(step)
    elif arguments == 3:
        chosen = _guard2(step)
    else:

        def guarded(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R | None:
            try:
                return step(self, *args, **kwargs)
            except Exception:
                self._crashed()
                return None

        chosen = guarded
    chosen.__doc__ = step.__doc__
    return chosen


def _guard0(step: Callable[..., R]) -> Callable[..., R | None]:
    def guarded(self: Guarded) -> R | None:
        try:
            return step(self)
        except Exception:
            self._crashed()
            return None

    return guarded


def _guard1(step: Callable[..., R]) -> Callable[..., R | None]:
    def guarded(self: Guarded, arg: Any, /) -> R | None:
        try:
            return step(self, arg)
        except Exception:
            self._crashed()
            return None

    return guarded


def _guard2(step: Callable[..., R]) -> Callable[..., R | None]:
    def guarded(self: Guarded, arg: Any, arg2: Any, /) -> R | None:
        try:
            return step(self, arg, arg2)
        except Exception:
            self._crashed()
            return None

    return guarded


def positional_count(function: Callable[..., Any]) -> int:
    """How many plain positional parameters ``function`` has (``self`` included); -1 when it
    takes anything else (defaults, ``*args``, keyword-only, ``**kwargs``) or says nothing.

    Read from the signature, not the code object: a compiled function has no
    ``__code__``, but it has a signature.
    """
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read
        return -1
    plain = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind not in plain or p.default is not p.empty for p in parameters):
        return -1
    return len(parameters)
