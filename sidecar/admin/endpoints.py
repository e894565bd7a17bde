"""The read-only admin listener: ``/``, ``/metrics``, ``/healthz``, ``/readyz``, ``/state``.

GET and HEAD only; anything else gets 405, so the port Prometheus scrapes
cannot change the sidecar (writes are on the control listener,
`sidecar.admin.control`). ``/metrics`` is OpenMetrics or the Prometheus
text format, as the scraper's ``Accept`` asks (chosen and encoded by
prometheus_client), without ``_created`` series. ``/`` is the table of
``sidecar top`` as a page (`sidecar.top.html`). Both are rendered off the
loop (`sidecar.admin.render`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from sidecar.admin.listener import Answer, HttpServer, Request, text
from sidecar.admin.render import Renderer
from sidecar.top.html import render_index
from sidecar.top.snapshot import Snapshot
from sidecar.top.table import table

HTML = "text/html; charset=utf-8"
# The index compares with a reading at least this old (seconds) for its rates.
INDEX_INTERVAL = 1.0


class AdminServer(HttpServer):
    """The read-only admin endpoints.

    ``/`` is an HTML index (the endpoints and the table of ``sidecar top``);
    ``/healthz`` is 200 while the loop runs; ``/readyz`` 200 when ``ready()``,
    else 503 with ``why_not_ready()`` in the body; ``/state`` the JSON of
    ``state()``.

    Args:
        registry: the metrics registry to expose.
        ready: says whether ``/readyz`` is 200.
        state: returns the ``/state`` document.
        before_scrape: called before ``/metrics`` and ``/`` are rendered (to refresh gauges).
        why_not_ready: the reason ``/readyz`` gives when not ready (a line).
        limits: see `HttpServer`.
    """

    name = "admin"

    def __init__(
        self,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        state: Callable[[], dict[str, Any]],
        before_scrape: Callable[[], None] | None = None,
        *,
        why_not_ready: Callable[[], str] | None = None,
        **limits: Any,
    ) -> None:
        super().__init__(**limits)
        self._registry = registry
        self._ready = ready
        self._state = state
        self._before_scrape = before_scrape
        self.renderer = Renderer()
        self._why_not_ready = why_not_ready
        # Earlier readings, for the index's rates.
        self._readings: list[Snapshot] = []

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Start serving; returns the bound address (port 0 picks a free one).

        Turns off prometheus_client's ``_created`` series. That switch is
        process-wide: it applies to every registry in this process, which in
        the sidecar is this one alone.
        """
        disable_created_metrics()  # type: ignore[no-untyped-call]
        return await super().listen(host, port)

    async def close(self) -> None:
        await super().close()
        self.renderer.close()

    def route(self, request: Request) -> Answer | asyncio.Future[Answer]:
        if request.method not in ("GET", "HEAD"):
            return text(405, "only GET and HEAD", [("Allow", "GET, HEAD")])
        path = request.path
        if path == "/metrics":
            if self._before_scrape is not None:
                self._before_scrape()
            encode, content_type = choose_encoder(request.header(b"accept"))
            rendered = self.renderer.render(encode, functools.partial(encode, self._registry))
            return _answer_when_rendered(rendered, content_type)
        if path == "/healthz":
            return text(200, "ok")
        if path == "/readyz":
            if self._ready():
                return text(200, "ready")
            reason = self._why_not_ready() if self._why_not_ready else ""
            return text(503, f"not ready: {reason}" if reason else "not ready")
        if path == "/state":
            body = json.dumps(self._state(), indent=2, sort_keys=True, default=str)
            return Answer(200, "application/json", body.encode() + b"\n")
        if path in ("/", "/index.html"):
            if self._before_scrape is not None:
                self._before_scrape()
            state = self._state()  # read on the loop, where the parts live
            rendered = self.renderer.render("index", lambda: self._index(state))
            return _answer_when_rendered(rendered, HTML)
        return text(404, "not found: try /, /metrics, /healthz, /readyz or /state")

    def _index(self, state: dict[str, Any]) -> bytes:
        """The index page (on the render thread): rates since a reading `INDEX_INTERVAL` old."""
        now = time.monotonic()
        current = Snapshot.from_families(self._registry.collect(), state, now)
        older = [r for r in self._readings if now - r.at >= INDEX_INTERVAL]
        before = older[-1] if older else None
        # Keep the newest reading old enough to compare with, and the younger ones.
        self._readings = [*older[-1:], *(r for r in self._readings if now - r.at < INDEX_INTERVAL)]
        self._readings.append(current)
        return render_index(table(before, current)).encode()


def _answer_when_rendered(
    rendered: asyncio.Future[bytes], content_type: str
) -> asyncio.Future[Answer]:
    """The 200 answer with the exposition, once it is rendered (its failure, if it fails)."""
    answer: asyncio.Future[Answer] = rendered.get_loop().create_future()

    def made(done: asyncio.Future[bytes]) -> None:
        if answer.done():
            return
        if done.cancelled():
            answer.cancel()
        elif (exc := done.exception()) is not None:
            answer.set_exception(exc)
        else:
            answer.set_result(Answer(200, content_type, done.result()))

    rendered.add_done_callback(made)
    return answer
