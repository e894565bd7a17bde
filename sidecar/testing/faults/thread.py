"""A `FaultProxy` on its own event loop in a background thread, for code that is not asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from sidecar.protocol.framing import Transport
from sidecar.testing.faults.plan import FaultPlan
from sidecar.testing.faults.proxy import FaultProxy
from sidecar.testing.faults.stats import FaultStats

T = TypeVar("T")


class FaultProxyThread:
    """A `FaultProxy` on its own event loop in a daemon thread.

    Use as a context manager, or `start()` / `stop()`. Arguments: as `FaultProxy`.
    """

    def __init__(
        self,
        upstream: str,
        transport: Transport | str = Transport.FRAMED,
        plan: FaultPlan | None = None,
        **kwargs: Any,
    ) -> None:
        self.proxy = FaultProxy(upstream, transport, plan, **kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="fault-proxy", daemon=True
        )

    @property
    def plan(self) -> FaultPlan:
        return self.proxy.plan

    @property
    def address(self) -> str:
        return self.proxy.address

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def stats(self) -> FaultStats:
        return self.proxy.stats

    def start(self) -> FaultProxyThread:
        """Start the loop thread and listen; returns self."""
        self._thread.start()
        self._run(self.proxy.start())
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the proxy, then its loop and thread; safe to call twice."""
        if not self._thread.is_alive():
            return
        try:
            self._run(self.proxy.stop(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()

    def set_down(self, down: bool) -> None:
        """See `FaultProxy.set_down`; returns once done."""
        self._run(self.proxy.set_down(down))

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 5.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> FaultProxyThread:
        if not self._thread.is_alive():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_in_thread(
    upstream: str,
    transport: Transport | str = Transport.FRAMED,
    plan: FaultPlan | None = None,
    **kwargs: Any,
) -> FaultProxyThread:
    """A started `FaultProxyThread` (stop it, or use it as a context manager)."""
    return FaultProxyThread(upstream, transport, plan, **kwargs).start()
