"""The admin endpoint: its answers, its formats, and what careless or hostile clients get.

Most tests run `AdminServer` alone on an event loop in a background thread
(`AdminThread`) and talk to it over real sockets on 127.0.0.1: answers are
read raw and parsed with ``http.client``, metrics with prometheus_client's
text and OpenMetrics parsers. The last two run a whole sidecar: in a thread,
then as a ``python -m sidecar run`` process.
``/readyz`` answering 503 while draining is checked in
tests/app/test_signals.py, where a drain happens.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import http.client
import io
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, TypeVar

import pytest
import thriftpy2.thrift
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families
from prometheus_client.registry import Collector

from sidecar import __version__, native
from sidecar.admin import AdminServer
from sidecar.metrics import PREFIX, SidecarMetrics
from tests.support.clients import split_address, thriftpy2_client
from tests.support.raw import encode_call, raw_call
from tests.support.rig import rig
from tests.support.servers import thriftpy2_server
from tests.support.sidecar import Metrics, SidecarThread, base_config, http_get
from tests.support.wait import wait_until

T = TypeVar("T")
NewLoop = Callable[[], asyncio.AbstractEventLoop]
TAE = thriftpy2.thrift.TApplicationException

# What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every log record, the sidecar's included (whatever an earlier test configured)."""
    monkeypatch.setattr(logging.getLogger("sidecar"), "propagate", True)
    caplog.set_level(logging.DEBUG)
    return caplog


def loud(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at WARNING or above, or with a traceback, as text."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING or r.exc_info
    ]


@pytest.fixture(params=["asyncio", "uvloop"])
def new_loop(request: pytest.FixtureRequest) -> NewLoop:
    """Each test runs on asyncio's loop and on uvloop's (the one `sidecar run` uses)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


class AdminThread:
    """An `AdminServer` on 127.0.0.1, on its own event loop in a background thread."""

    def __init__(self, new_loop: NewLoop, registry: Any = None, **kwargs: Any) -> None:
        self.metrics = SidecarMetrics()
        self.is_ready = True
        self.document: dict[str, Any] = {"version": __version__, "breakers": []}
        kwargs.setdefault("ready", lambda: self.is_ready)
        kwargs.setdefault("state", lambda: self.document)
        self.server = AdminServer(registry or self.metrics.registry, **kwargs)
        self.loop = new_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.address = ("", 0)

    def __enter__(self) -> AdminThread:
        self._thread.start()
        self.address = self.run(self.server.listen("127.0.0.1", 0))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the loop's thread."""

        async def invoke() -> T:
            return fn()

        result: T = self.run(invoke())
        return result

    def open_connections(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=5)


def read_all(sock: socket.socket) -> bytes:
    """Read until the server closes (5 s at most between bytes)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(address: tuple[str, int], request: bytes, *, half_close: bool = False) -> bytes:
    """Send raw bytes on a new connection (then end our side if asked); read the answer."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def parse(raw: bytes, method: str = "GET") -> Reply:
    """One whole HTTP response, parsed by ``http.client``; nothing may follow it."""
    response = http.client.HTTPResponse(_Bytes(raw), method=method)  # type: ignore[arg-type]
    response.begin()
    body = response.read()  # IncompleteRead unless the body matches Content-Length
    head_length = raw.index(b"\r\n\r\n") + 4
    assert raw[head_length:] == body, "bytes after the response"
    assert response.headers["Connection"] == "close"
    return Reply(response.status, response.headers, body)


def get(address: tuple[str, int], path: str, method: str = "GET", **headers: str) -> Reply:
    lines = [f"{method} {path} HTTP/1.1", "Host: admin"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return parse(exchange(address, request), method)


def samples(families: Iterable[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families
        for s in family.samples
    }


def with_traffic(metrics: SidecarMetrics) -> None:
    stats = metrics.calls.method("Catalog:getItem")
    stats.request("ok", 0.003)
    stats.request("ok", 0.2)
    stats.attempt("127.0.0.1:9", "ok")
    metrics.retries.labels("Catalog:getItem", "timeout").inc(2)
    metrics.client_connections.set(3)


# Endpoints and formats


def test_endpoints_answer_get_and_head(new_loop: NewLoop) -> None:
    # A registry whose text does not change between two scrapes (process_* CPU
    # seconds and memory do), so a HEAD's Content-Length can be compared with a GET's.
    still = CollectorRegistry()
    Counter("calls", "calls seen", registry=still).inc(3)
    with AdminThread(new_loop, registry=still) as admin:
        reply = get(admin.address, "/healthz")
        assert (reply.status, reply.body) == (200, b"ok\n")
        assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert get(admin.address, "/healthz?verbose=1").body == b"ok\n"
        assert get(admin.address, "/readyz").status == 200
        admin.is_ready = False
        reply = get(admin.address, "/readyz")
        assert (reply.status, reply.body) == (503, b"not ready\n")
        admin.document = {"config": {"version": 3}, "when": datetime.date(2026, 1, 2)}
        reply = get(admin.address, "/state")
        assert reply.headers["Content-Type"] == "application/json"
        assert json.loads(reply.body) == {"config": {"version": 3}, "when": "2026-01-02"}
        reply = get(admin.address, "/nope")
        assert reply.status == 404
        assert b"/metrics" in reply.body
        reply = get(admin.address, "/metrics", method="POST", Content_Length="0")
        assert reply.status == 405
        assert reply.headers["Allow"] == "GET, HEAD"
        for path in ("/metrics", "/healthz", "/readyz", "/state", "/nope"):
            full = get(admin.address, path)
            head = get(admin.address, path, method="HEAD")
            assert head.body == b""  # `parse` checked that nothing follows the head
            assert head.status == full.status
            assert head.headers["Content-Type"] == full.headers["Content-Type"]
            assert head.headers["Content-Length"] == str(len(full.body))


def test_metrics_are_the_prometheus_text_format_by_default(new_loop: NewLoop) -> None:
    scrapes = []
    with AdminThread(new_loop, before_scrape=lambda: scrapes.append(1)) as admin:
        with_traffic(admin.metrics)
        reply = get(admin.address, "/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert scrapes == [1]
        text = reply.body.decode()
        found = samples(text_families(text))
        ok = (("method", "getItem"), ("outcome", "ok"), ("service", "Catalog"))
        assert found[(PREFIX + "requests_total", ok)] == 2
        retried = (("method", "Catalog:getItem"), ("reason", "timeout"))
        assert found[(PREFIX + "retries_total", retried)] == 2
        assert found[(PREFIX + "request_duration_seconds_count", ok[:1] + ok[2:])] == 2
        assert found[(PREFIX + "client_connections", ())] == 3
        build = (("build", native.build()), ("version", __version__))
        assert found[(PREFIX + "build_info", build)] == 1
        assert "_created" not in text
        assert "# EOF" not in text


def test_metrics_are_openmetrics_when_the_scraper_asks(new_loop: NewLoop) -> None:
    with AdminThread(new_loop) as admin:
        with_traffic(admin.metrics)
        text = get(admin.address, "/metrics").body.decode()
        reply = get(admin.address, "/metrics", Accept=PROMETHEUS_ACCEPT)
        assert reply.status == 200
        content_type = reply.headers["Content-Type"]
        assert content_type.startswith("application/openmetrics-text; version=1.0.0;")
        body = reply.body.decode()
        assert body.endswith("# EOF\n")
        assert "_created" not in body
        # The same samples as the text format, read by the OpenMetrics parser (but the
        # process_* values, which move between two renders).
        openmetrics = samples(openmetrics_families(body))  # type: ignore[no-untyped-call]
        text_samples = samples(text_families(text))
        assert openmetrics.keys() == text_samples.keys()
        assert {k: v for k, v in openmetrics.items() if not k[0].startswith("process_")} == {
            k: v for k, v in text_samples.items() if not k[0].startswith("process_")
        }
        head = get(admin.address, "/metrics", method="HEAD", Accept="application/openmetrics-text")
        assert head.headers["Content-Type"].startswith("application/openmetrics-text;")


def test_exposition_is_the_registry_without_created_series(new_loop: NewLoop) -> None:
    # The expected text: every series but `_created`, as the endpoint used to
    # produce it by filtering (with the library's `_created` series on).
    metrics = SidecarMetrics()
    with_traffic(metrics)
    enable_created_metrics()  # type: ignore[no-untyped-call]
    assert b"_created" in generate_latest(metrics.registry)
    families = []
    for family in metrics.registry.collect():
        family.samples = [s for s in family.samples if not s.name.endswith("_created")]
        families.append(family)

    class Filtered:
        def collect(self) -> list[Metric]:
            return families

    def steady(text: bytes) -> bytes:
        """Without the process_* lines, whose values move between two renders."""
        return b"".join(line for line in text.splitlines(keepends=True) if b"process_" not in line)

    expected = generate_latest(Filtered())
    with AdminThread(new_loop, metrics.registry) as admin:
        body = get(admin.address, "/metrics").body
    assert steady(body) == steady(expected)
    assert b"process_resident_memory_bytes " in body


class PageParser(HTMLParser):
    """The tags, links, cell texts and meta tags of a page, as html.parser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.meta: list[dict[str, str | None]] = []
        self.cells: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "a":
            self.links.append(dict(attrs)["href"] or "")
        elif tag == "meta":
            self.meta.append(dict(attrs))
        elif tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'


def test_the_index_links_the_endpoints_and_escapes_what_came_from_the_wire(
    new_loop: NewLoop,
) -> None:
    with AdminThread(new_loop) as admin:
        with_traffic(admin.metrics)
        stats = admin.call(lambda: admin.metrics.calls.method("Svc:" + HOSTILE))
        admin.call(lambda: stats.request("ok", 0.0004))
        admin.document = {
            "version": __version__,
            "ready": True,
            "uptime_seconds": 4.0,
            "breakers": [{"name": HOSTILE, "state": "open", "consecutive_failures": 3}],
            "upstream": {"addresses": ["127.0.0.1:9"], "ejected": ["127.0.0.1:9"]},
            "pools": [],
        }
        reply = get(admin.address, "/")
        head = get(admin.address, "/", method="HEAD")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert head.headers["Content-Length"] == str(len(reply.body))
    page = PageParser()
    page.feed(reply.body.decode())
    page.close()
    assert "script" not in page.tags
    assert "img" not in page.tags
    assert set(page.links) == {"/metrics", "/healthz", "/readyz", "/state"}
    assert {"http-equiv": "refresh", "content": "2"} in page.meta
    # The names are shown as they are, as text.
    assert "Svc:" + HOSTILE in page.cells
    assert HOSTILE in page.cells
    # The same table as `sidecar top`: from zero over the uptime here (no earlier reading).
    row = page.cells[page.cells.index("Catalog:getItem") :][:8]
    assert row == ["Catalog:getItem", "0.5", "100.00%", "0.0", "0.5", "0.0", "5.00ms", "247ms"]
    assert page.cells[page.cells.index(HOSTILE) + 1] == "open"
    assert page.cells[page.cells.index("127.0.0.1:9") + 1] == "ejected"


# Careless and hostile clients


def test_connect_and_close_logs_nothing(new_loop: NewLoop, logs: pytest.LogCaptureFixture) -> None:
    with AdminThread(new_loop) as admin:
        for _ in range(3):
            admin.connect().close()
        with admin.connect() as sock:  # ends its side, then waits for ours
            sock.shutdown(socket.SHUT_WR)
            answer = read_all(sock)
        assert loud(logs) == []
        assert answer == b""
        assert get(admin.address, "/healthz").status == 200
        wait_until(lambda: admin.open_connections() == 0, message="connections closed")
    assert loud(logs) == []


def test_garbage_gets_400_with_a_text_body(
    new_loop: NewLoop, logs: pytest.LogCaptureFixture
) -> None:
    with AdminThread(new_loop) as admin:
        whole = exchange(admin.address, b"\xff\xfe\xfd garbage, not http\r\n\r\n")
        cut_short = exchange(admin.address, b"\x16\x03\x01 GET /metr", half_close=True)
        no_host = exchange(admin.address, b"GET /metrics HTTP/1.1\r\n\r\n")
        for raw in (cut_short, whole, no_host):
            reply = parse(raw)  # the whole body that Content-Length announces
            assert reply.status == 400
            assert reply.body == b"bad request: not HTTP/1.1 as expected\n"
            assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
        wait_until(lambda: admin.open_connections() == 0, message="connections closed")
    assert loud(logs) == []


def test_oversized_requests_are_refused(new_loop: NewLoop, logs: pytest.LogCaptureFixture) -> None:
    with AdminThread(new_loop) as admin:
        long_target = b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\nHost: admin\r\n\r\n"
        many_headers = b"GET /metrics HTTP/1.1\r\nHost: admin\r\n" + b"X-Pad: yyyyyyyy\r\n" * 2000
        body = b"GET /metrics HTTP/1.1\r\nHost: admin\r\nContent-Length: 9000\r\n\r\n" + b"z" * 9000
        for request, status in ((long_target, 431), (many_headers + b"\r\n", 431), (body, 413)):
            reply = parse(exchange(admin.address, request))
            assert (reply.status, reply.body) == (status, b"request too large\n")
        # Just under the limit is fine.
        pad = b"X-Pad: " + b"y" * 7000 + b"\r\n"
        assert (
            parse(
                exchange(admin.address, b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + pad + b"\r\n")
            ).status
            == 200
        )
    assert loud(logs) == []


def test_a_request_not_complete_in_time_is_answered_408_and_closed(
    new_loop: NewLoop, logs: pytest.LogCaptureFixture
) -> None:
    timeout = 0.5
    with AdminThread(new_loop, request_timeout=timeout) as admin:
        # Slowloris: a byte every 50 ms does not extend the deadline.
        with admin.connect() as sock:
            started = time.monotonic()
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Slow: ")
            sock.settimeout(0.05)
            answer = b""
            for _ in range(200):  # 10 s at most
                try:
                    sock.sendall(b"a")
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:  # closed on us between two bytes
                    break
                break
            elapsed = time.monotonic() - started
            sock.settimeout(5)
            answer += read_all(sock)
        assert timeout * 0.9 <= elapsed < timeout + 3
        reply = parse(answer)
        assert (reply.status, reply.body) == (408, b"request not received in time\n")
        # A connection that sends nothing is closed as well.
        with admin.connect() as sock:
            started = time.monotonic()
            assert parse(read_all(sock)).status == 408
            assert time.monotonic() - started < timeout + 3
        wait_until(lambda: admin.open_connections() == 0, message="connections closed")
    assert loud(logs) == []


def test_at_most_max_connections_are_served_at_once(
    new_loop: NewLoop, logs: pytest.LogCaptureFixture
) -> None:
    with AdminThread(new_loop, max_connections=4) as admin:
        held = [admin.connect() for _ in range(4)]
        wait_until(lambda: admin.open_connections() == 4, message="four connections open")
        reply = get(admin.address, "/healthz")
        assert reply.status == 503
        assert reply.body == b"too many admin connections; try again\n"
        refusals = [r for r in logs.records if "refusing admin client" in r.getMessage()]
        assert len(refusals) == 1
        assert refusals[0].levelno == logging.WARNING
        held.pop().close()
        wait_until(lambda: admin.open_connections() == 3, message="one closed")
        assert get(admin.address, "/healthz").status == 200
        for sock in held:
            sock.close()
        wait_until(lambda: admin.open_connections() == 0, message="connections closed")


def test_a_failing_handler_answers_500_and_is_logged_rate_limited(
    new_loop: NewLoop, logs: pytest.LogCaptureFixture
) -> None:
    def broken_state() -> dict[str, Any]:
        raise RuntimeError("state is broken")

    with AdminThread(new_loop, state=broken_state) as admin:
        for _ in range(15):
            reply = get(admin.address, "/state")
            assert (reply.status, reply.body) == (500, b"internal error\n")
        assert get(admin.address, "/healthz").status == 200
    warnings = [r.getMessage() for r in logs.records if r.levelno >= logging.WARNING]
    # The default burst: 10 lines, then one saying the rest are suppressed.
    assert warnings[:10] == ["admin request GET /state failed: RuntimeError: state is broken"] * 10
    assert len(warnings) == 11
    assert "suppressing" in warnings[10]
    assert not [r for r in logs.records if r.levelno >= logging.ERROR]


def test_close_drops_open_connections(new_loop: NewLoop) -> None:
    with AdminThread(new_loop) as admin, admin.connect() as sock:
        wait_until(lambda: admin.open_connections() == 1, message="connection open")
        admin.run(admin.server.close())
        assert read_all(sock) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(admin.address, timeout=5).close()


# /metrics off the loop


class BlockingCollector(Collector):
    """A collector that waits for `release` in `collect`, noting the thread it runs on."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.threads: list[str] = []

    def collect(self) -> Iterable[Metric]:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.release.wait(10), "never released"
        yield GaugeMetricFamily("blocking_probe", "A gauge behind a slow collect.", value=7)


def _scrape_in_thread(
    address: tuple[str, int], path: str = "/metrics"
) -> tuple[threading.Thread, list[Reply]]:
    replies: list[Reply] = []
    thread = threading.Thread(target=lambda: replies.append(get(address, path)))
    thread.start()
    return thread, replies


@pytest.mark.parametrize("path", ["/metrics", "/"])
def test_a_slow_render_does_not_hold_the_loop(new_loop: NewLoop, path: str) -> None:
    """While a page is being rendered, the loop answers other requests (it was blocked)."""
    registry = CollectorRegistry()
    slow = BlockingCollector()
    registry.register(slow)
    with AdminThread(new_loop, registry=registry) as admin:
        thread, replies = _scrape_in_thread(admin.address, path)
        assert slow.entered.wait(10), "the render never started"
        assert get(admin.address, "/healthz").status == 200  # the loop is free meanwhile
        slow.release.set()
        thread.join(10)
    [reply] = replies
    assert reply.status == 200
    if path == "/metrics":
        assert samples(text_families(reply.body.decode())) == {("blocking_probe", ()): 7.0}
    else:
        assert b"<table" in reply.body
    assert slow.threads[0].startswith("metrics-render"), slow.threads


def test_concurrent_scrapes_share_one_render(new_loop: NewLoop) -> None:
    registry = CollectorRegistry()
    slow = BlockingCollector()
    registry.register(slow)
    with AdminThread(new_loop, registry=registry) as admin:
        scrapes = [_scrape_in_thread(admin.address) for _ in range(8)]
        assert slow.entered.wait(10), "the render never started"
        wait_until(lambda: admin.server.renderer.asked == 8, message="eight scrapes asked")
        slow.release.set()
        for thread, _ in scrapes:
            thread.join(10)
        assert admin.server.renderer.renders == 1
    bodies = {reply.body for _, replies in scrapes for reply in replies}
    assert [reply.status for _, replies in scrapes for reply in replies] == [200] * 8
    assert len(bodies) == 1
    assert slow.threads == [slow.threads[0]]  # collected once


def test_a_failing_render_answers_500(new_loop: NewLoop, logs: pytest.LogCaptureFixture) -> None:
    class Broken(Collector):
        def collect(self) -> Iterable[Metric]:
            raise RuntimeError("collector is broken")

    registry = CollectorRegistry()
    registry.register(Broken())
    with AdminThread(new_loop, registry=registry) as admin:
        reply = get(admin.address, "/metrics")
        assert (reply.status, reply.body) == (500, b"internal error\n")
        assert get(admin.address, "/healthz").status == 200
    assert "admin request GET /metrics failed: RuntimeError: collector is broken" in [
        r.getMessage() for r in logs.records
    ]


# The whole sidecar


def _http(address: str, request: bytes) -> bytes:
    """Send a raw HTTP request to ``http://host:port`` and read the whole answer."""
    host, port = split_address(address.removeprefix("http://"))
    return exchange((host, port), request)


def test_metrics_live_in_their_own_registry_and_endpoints_answer() -> None:
    with (
        thriftpy2_server("framed") as upstream,
        SidecarThread(base_config([upstream.address])) as st,
    ):
        with thriftpy2_client(st.address, "framed") as c:
            assert c.add(2, 3) == 5
        status, body = http_get(st.admin + "/metrics")
        assert status == 200
        assert Metrics(body).value("thrift_sidecar_requests_total", method="add", outcome="ok") == 1
        # The sidecar's own metrics and its process's: no Python or platform collectors.
        assert "python_info" not in body
        assert "python_gc_objects_collected_total" not in body
        assert "process_cpu_seconds_total" in body
        # ... and none of them in prometheus_client's global registry.
        global_names = [m.name for m in REGISTRY.collect()]
        assert global_names, "the global registry has its default collectors"
        assert not [n for n in global_names if n.startswith("thrift_sidecar_")]
        SidecarMetrics()  # a second set in this process does not collide
        SidecarMetrics()

        assert http_get(st.admin + "/healthz") == (200, "ok\n")
        assert http_get(st.admin + "/readyz") == (200, "ready\n")
        status, body = http_get(st.admin + "/nope")
        assert status == 404
        assert "/metrics" in body
        answer = _http(st.admin, b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 ")
        answer = _http(st.admin, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"text/plain" in head
        assert rest == b""
        answer = _http(st.admin, b"GET /" + b"x" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 431 ")


FAIL_MAX = 2
RESET_TIMEOUT = 60.0
STATE_CONFIG: dict[str, Any] = {
    "breaker": {"fail_max": FAIL_MAX, "reset_timeout": f"{RESET_TIMEOUT:g}s"},
    # No floor and a long window: the token count is exactly ratio * calls.
    "retry": {"budget": {"ratio": 0.2, "min_retries_per_second": 0, "window": "5m"}},
    "fallback": {"serve_on": ["breaker_open"]},
}


def test_state_document_after_traffic_and_reloads() -> None:
    with rig(STATE_CONFIG) as r, thriftpy2_client(r.sidecar.address, "framed") as c:
        assert c.getItem(1).id == 1
        r.proxy.plan.extend_schedule(["internal_error"] * FAIL_MAX)
        for _ in range(FAIL_MAX):
            with pytest.raises(TAE):
                c.getItem(3)
        assert c.getItem(1).id == 1  # the cached reply, while open
        with pytest.raises(TAE, match="circuit open"):
            c.getItem(9)
        r.sidecar.signal(signal.SIGHUP)  # the same file: a reload that changes nothing
        wait_until(lambda: r.sidecar.state()["config_version"] == 2, message="reloaded")
        item = raw_call(r.upstream.address, encode_call("getItem", {"id": 1}), "framed")
        state = wait_until(
            lambda: (s := r.sidecar.state())["client_connections"] == 1 and s,
            message="one client connected",
        )

        assert set(state) == {
            "version",
            "config_version",
            "ready",
            "uptime_seconds",
            "listen",
            "upstream",
            "breakers",
            "pools",
            "retry_budget",
            "concurrency",
            "hedging",
            "fallback_store",
            "fallback_store_losses",
            "shared_state",
            "config",
            "method_labels",
            "client_connections",
            "oneway",
            "health_check",
        }
        assert state["health_check"] == {"enabled": False}
        assert state["version"] == __version__
        assert state["concurrency"] == {
            "in_flight": 0,
            "max_in_flight": None,
            "shed_total": 0,
            "adaptive": None,
        }
        assert state["ready"] is True
        assert state["uptime_seconds"] > 0
        assert state["listen"] == r.sidecar.address
        assert state["upstream"] == {
            "name": r.upstream_address,
            "addresses": [r.upstream_address],
            "ejected": [],
        }

        [breaker] = state["breakers"]
        last_opened = breaker.pop("last_opened")
        probe_in = breaker.pop("probe_in_seconds")
        assert breaker == {
            "name": r.upstream_address,
            "state": "open",
            "consecutive_failures": FAIL_MAX,
            "half_open_successes": 0,
            "probes_in_flight": 0,
            "rejected_calls": 2,
            "transitions": {"closed->open": 1},
            "fail_max": FAIL_MAX,
            "reset_timeout_seconds": RESET_TIMEOUT,
        }
        opened = datetime.datetime.fromisoformat(last_opened)
        age = (datetime.datetime.now(datetime.UTC) - opened).total_seconds()
        assert 0 <= age < RESET_TIMEOUT
        assert RESET_TIMEOUT - age - 1 <= probe_in <= RESET_TIMEOUT - age + 1

        assert state["pools"] == [
            {
                "address": r.upstream_address,
                "transport": "framed",
                "open": 1,
                "idle": 1,
                "busy": 0,
                "max": 64,
                "ejected": False,
            }
        ]
        assert state["retry_budget"] == {
            "tokens": 0.6,  # 3 calls were let through, 0.2 each
            "exhausted_total": 0,
            "ratio": 0.2,
            "min_retries_per_second": 0.0,
            "window_seconds": 300.0,
        }
        assert state["hedging"] == {  # off: the default budget, untouched
            "tokens": 10.0,
            "delays_seconds": {},
            "samples": {},
            "ratio": 0.1,
            "min_hedges_per_second": 1.0,
            "window_seconds": 10.0,
            "hedges_total": 0,
            "won_total": 0,
            "exhausted_total": 0,
        }
        assert state["fallback_store"] == {
            "backend": "memory",
            "entries": 1,
            # key, the memory store's overhead, the reply and getItem(1)'s 12 argument bytes
            "bytes": len("getItem|") + 32 + 300 + len(item) + 12,
            "healthy": True,
        }
        assert state["fallback_store_losses"] == {
            "dropped_writes": 0,
            "failed_writes": 0,
            "missed_reads": 0,
        }
        assert state["config"] == {
            "version": 2,
            "reloads_ok": 1,
            "reloads_failed": 0,
            "last_reload_error": None,
            "restart_needed_for": [],
        }
        assert state["shared_state"] == {"enabled": False}  # local mode
        assert state["method_labels"] == {"in_use": 1, "max": 200}  # getItem

        # A rejected reload is in the document; a listen change waits for a restart.
        broken = copy.deepcopy(r.sidecar.config)
        broken["retry"]["max_attempts"] = 0
        r.sidecar.write_config(broken)
        r.sidecar.signal(signal.SIGHUP)
        config = wait_until(
            lambda: (s := r.sidecar.state()["config"])["reloads_failed"] == 1 and s,
            message="rejected reload",
        )
        assert config["version"] == 2
        assert "retry.max_attempts" in config["last_reload_error"]
        moved = copy.deepcopy(r.sidecar.config)
        moved["listen"] = "127.0.0.1:1"
        r.sidecar.write_config(moved)
        r.sidecar.signal(signal.SIGHUP)
        config = wait_until(
            lambda: (s := r.sidecar.state()["config"])["version"] == 3 and s,
            message="third version",
        )
        assert config["restart_needed_for"] == ["listen"]
        assert config["last_reload_error"] is None
        assert r.sidecar.state()["listen"] == r.sidecar.address
