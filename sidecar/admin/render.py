"""``/metrics`` and ``/`` rendered on a thread of their own, so that no scrape holds the event loop.

With a few hundred method labels the exposition takes tens of milliseconds
of Python (about 45 ms for the text format and 85 ms for OpenMetrics at 200
labels, most of it formatting); on the loop, every Thrift call waits that
long, and a burst of scrapes adds up. Here the loop only hands the work to
one render thread and writes the bytes when they are ready.

Requests that arrive while a render of the same page and format is running
share it: however many scrapers there are, one render runs at a time, and
after a render of t seconds the next starts at least `PACE` times t later,
so rendering takes about half a core at most. Each render starts after the
request came: what it shows is never older than the request. What is read
on the render thread must be safe to read there
(`sidecar.metrics.calls.CallMetrics` copies its figures first; the rest
are prometheus_client's own, which lock; the parts behind ``/state`` are
read on the loop).

While a render runs, the interpreter's thread switch interval is lowered
from 5 ms to `SWITCH_INTERVAL`, so that the loop waits about that long at
most for the GIL when it has work, and the cyclic garbage collector is off
(a render's objects die by reference count; a full collection triggered by
them would hold the GIL for milliseconds). bench/scrapes.py measures it.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

# Seconds a thread may hold the GIL while another waits for it, during a render.
SWITCH_INTERVAL = 0.0001
# After a render of t seconds, the next one starts at least PACE * t later.
PACE = 1.0


class Renderer:
    """Runs renders on one worker thread; requests for a render already running share it."""

    def __init__(self) -> None:
        self._executor: ThreadPoolExecutor | None = None
        self._running: dict[Hashable, asyncio.Future[bytes]] = {}
        self._next_start = 0.0
        self.asked = 0  # renders asked for
        self.renders = 0  # renders started: at most one per key at a time

    def render(self, key: Hashable, make: Callable[[], bytes]) -> asyncio.Future[bytes]:
        """``make()`` run off the loop, or the render of ``key`` already running."""
        self.asked += 1
        running = self._running.get(key)
        if running is not None:
            return running
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="metrics-render")
        self.renders += 1
        done: Future[bytes] = self._executor.submit(self._render, make)
        result = asyncio.wrap_future(done)
        self._running[key] = result
        result.add_done_callback(lambda _: self._running.pop(key, None))
        return result

    def _render(self, make: Callable[[], bytes]) -> bytes:
        """On the render thread: paced, with a short switch interval and no GC pauses."""
        wait = self._next_start - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        before = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        collecting = gc.isenabled()
        gc.disable()  # a render's garbage is freed by reference counting alone
        started = time.monotonic()
        try:
            return make()
        finally:
            if collecting:
                gc.enable()
            sys.setswitchinterval(before)
            ended = time.monotonic()
            self._next_start = ended + PACE * (ended - started)

    def close(self) -> None:
        """Stop the render thread (a render in progress finishes on its own)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
