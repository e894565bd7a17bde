"""An upstream with a fixed capacity: one worker, so the more calls at once, the slower each.

`OneWorker` stands for an upstream's scarce resource (a database
connection, a core): each call holds it for ``service_time`` seconds and the
others queue. One call alone takes ``service_time``; n calls at once take up
to n * ``service_time`` each, and the upstream serves 1 / ``service_time``
calls per second whatever the concurrency. Offered more than that, its
queue, and so its latency, grows without bound: the upstream that the
sidecar's ``upstream.max_in_flight`` protects.

It counts the calls inside it (queued or served) and the most seen at once,
which is what a test asserts a concurrency limit on. `WorkerHandler` puts
any thriftpy2 handler behind one (`sidecar.testing.catalog.CatalogServer`'s
``service_time``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class OneWorker:
    """One worker serving calls one at a time, ``service_time`` seconds each.

    Args:
        service_time: seconds each call holds the worker.

    Attributes:
        in_flight: calls inside now, queued or being served.
        max_in_flight: the most calls inside at once so far.
        served: calls served so far.
    """

    def __init__(self, service_time: float) -> None:
        if service_time <= 0:
            raise ValueError("service_time must be positive")
        self.service_time = service_time
        self.in_flight = 0
        self.max_in_flight = 0
        self.served = 0
        self._count = threading.Lock()
        self._worker = threading.Lock()

    def serve(self) -> None:
        """Queue for the worker, hold it for ``service_time``, then return."""
        with self._count:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            with self._worker:
                time.sleep(self.service_time)
        finally:
            with self._count:
                self.in_flight -= 1
                self.served += 1

    def reset_max(self) -> None:
        """Start counting the most calls at once afresh (from those inside now)."""
        with self._count:
            self.max_in_flight = self.in_flight


class WorkerHandler:
    """A thriftpy2 handler whose every method first waits for `OneWorker` to serve it."""

    def __init__(self, handler: Any, worker: OneWorker) -> None:
        self._handler = handler
        self._worker = worker

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._handler, name)
        worker = self._worker

        def served(*args: Any) -> Any:
            worker.serve()
            return method(*args)

        return served
