"""The admin HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz``, ``/state``.

A deliberately small HTTP/1.1 server on asyncio (GET and HEAD only, one
request per connection, requests capped at 8 KiB), so that it runs on the
sidecar's own event loop and reads its state without locks or threads.

- ``/metrics``: the Prometheus text exposition of the sidecar's own registry,
  without the ``_created`` series prometheus_client adds to every counter
  (the text format exports them as extra gauges; nothing here reads them, and
  they would double the series count).
- ``/healthz``: 200 while the process runs its event loop.
- ``/readyz``: 200 once the Thrift port listens and the config is loaded, 503
  while starting or draining.
- ``/state``: JSON with breakers, pools, budget, fallback store and config figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("sidecar.admin")

MAX_REQUEST_BYTES = 8192
REQUEST_TIMEOUT = 5.0
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class WithoutCreated(Collector):
    """A registry's metrics without the ``_created`` samples of counters and histograms."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class AdminServer:
    """Serves the admin endpoints.

    Args:
        registry: the metrics registry to expose.
        ready: says whether ``/readyz`` is 200.
        state: returns the ``/state`` document.
        before_scrape: called before ``/metrics`` is rendered (to refresh gauges).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        state: Callable[[], dict[str, Any]],
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self._registry = registry
        self._exposed = WithoutCreated(registry)
        self._ready = ready
        self._state = state
        self._before_scrape = before_scrape
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start serving; returns the bound address."""
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        except ConnectionError:
            writer.close()
            return
        except Exception:
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", b"internal error\n"
        header = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(header.encode("latin-1"))
            if not head.startswith(b"HEAD"):
                writer.write(body)
            await writer.drain()
        writer.close()

    def _respond(self, head: bytes) -> tuple[int, str, bytes]:
        if len(head) > MAX_REQUEST_BYTES:
            return 400, "text/plain", b"request too large\n"
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        path = target.split("?", 1)[0]
        if path == "/metrics":
            if self._before_scrape is not None:
                self._before_scrape()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._exposed)
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            if self._ready():
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        if path == "/state":
            body = json.dumps(self._state(), indent=2, sort_keys=True, default=str)
            return 200, "application/json", body.encode() + b"\n"
        return 404, "text/plain", b"not found: try /metrics, /healthz, /readyz or /state\n"
