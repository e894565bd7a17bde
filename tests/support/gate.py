"""An upstream whose getItem calls can be held: a test's way to keep a call in flight."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tests.support.servers import Thriftpy2Server, thriftpy2_server


class Gate:
    """Holds ``getItem`` calls at the upstream while closed (10 s at most)."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()

    def close(self) -> None:
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def __call__(self, name: str) -> None:
        if name == "getItem":
            self._open.wait(10)


@contextlib.contextmanager
def gated_upstream() -> Iterator[Thriftpy2Server]:
    """A framed thriftpy2 upstream with a `Gate` as its hook (opened again on the way out)."""
    gate = Gate()
    with thriftpy2_server("framed") as server:
        server.hook = gate
        yield server
        gate.open()


def gate_of(upstream: Thriftpy2Server) -> Gate:
    """The gate of a `gated_upstream`."""
    assert isinstance(upstream.hook, Gate)
    return upstream.hook
