"""An upstream hook that holds chosen calls: which attempt is slow is the test's choice."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from tests.support.servers import Thriftpy2Server, thriftpy2_server

# Seconds a held call waits at most: a test that forgets to release still ends.
HOLD_LIMIT = 10.0


class Hold:
    """The next `arm`ed executions of a method wait until `release` (at most `HOLD_LIMIT`).

    Set as a server's ``hook``. ``held`` counts the executions waiting now.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[str, int] = {}
        self._released = threading.Event()
        self._held = 0

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def arm(self, method: str, count: int = 1) -> None:
        """Hold the next ``count`` executions of ``method``."""
        with self._lock:
            self._armed[method] = self._armed.get(method, 0) + count
            self._released.clear()

    def release(self) -> None:
        """Let every held execution go on (and any later armed one through at once)."""
        self._released.set()

    def __call__(self, name: str) -> None:
        with self._lock:
            left = self._armed.get(name, 0)
            if not left:
                return
            self._armed[name] = left - 1
            self._held += 1
        try:
            self._released.wait(HOLD_LIMIT)
        finally:
            with self._lock:
                self._held -= 1


@contextlib.contextmanager
def held_server() -> Iterator[tuple[Thriftpy2Server, Hold]]:
    """A framed thriftpy2 upstream whose hook is a `Hold`, released on the way out."""
    hold = Hold()
    with thriftpy2_server("framed") as server:
        server.hook = hold
        try:
            yield server, hold
        finally:
            hold.release()
