"""``sidecar top``: against a live sidecar with traffic, under a pseudo-terminal; its arithmetic.

The live tests run a real sidecar process (`tests.support.rig`) with thriftpy2
clients calling it from a thread, and ``python -m sidecar top`` as a user
would: ``--once`` with a pipe, and the interactive view under a pseudo-terminal
(Python's ``pty``), ended with SIGINT. The rates and quantiles are checked on
their own against scrapes written out by hand.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import generate_latest

from sidecar.metrics import SidecarMetrics
from sidecar.top import live
from sidecar.top.screen import printable, render
from sidecar.top.snapshot import Snapshot
from sidecar.top.table import quantile, table
from tests.support.rig import Rig, rig
from tests.support.sidecar import REPO_ROOT, free_port
from tests.support.wait import wait_until

TOP = [sys.executable, "-m", "sidecar", "top"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


class Traffic:
    """Calls from a thread, about one every 5 ms, until stopped (at most 30 s, 6000 calls)."""

    def __init__(self, r: Rig) -> None:
        self._rig = r
        self.done: list[float] = []  # monotonic times at which getItem calls returned
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        deadline = time.monotonic() + 30
        try:
            with self._rig.client() as c:
                for i in range(6000):
                    if self._stop.is_set() or time.monotonic() > deadline:
                        return
                    c.getItem(1 + i % 3)
                    self.done.append(time.monotonic())
                    if i % 4 == 0:
                        c.ping()
                    self._stop.wait(0.005)
        except BaseException as exc:
            self.error = exc

    def between(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.done) if start <= t <= end)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, self.error


@contextmanager
def live_sidecar() -> Iterator[tuple[Rig, Traffic]]:
    # The control listener on a free port too: the default one may be in use on this machine.
    with rig({"control": {"listen": f"127.0.0.1:{free_port()}"}}) as r, Traffic(r) as traffic:
        wait_until(lambda: traffic.done, timeout=10.0, message="the first call answered")
        yield r, traffic


def seconds(cell: str) -> float:
    """``410µs``, ``0.41ms``, ``12ms``, ``1.50s`` in seconds."""
    for unit, scale in (("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if cell.endswith(unit):
            return float(cell.removesuffix(unit)) * scale
    raise AssertionError(f"not a latency: {cell!r}")


def row(frame: str, name: str) -> list[str]:
    for line in frame.splitlines():
        cells = line.split()
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{frame}")


def test_top_once_shows_each_method_at_a_plausible_rate() -> None:
    with live_sidecar() as (r, traffic):
        started = time.monotonic()
        done = subprocess.run(
            [*TOP, "--once", "--admin", r.sidecar.admin, "--interval", "1"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
        ended = time.monotonic()
    assert done.returncode == 0, done.stderr
    frame = done.stdout
    assert "\x1b" not in frame  # --once writes plain text, for scripts
    assert "rates over 1." in frame
    cells = row(frame, "getItem")
    calls, success, errors, retries, fallbacks = (cells[1], cells[2], *cells[3:6])
    # Every getItem call the sidecar counted in the interval was answered to the client
    # between the start and the end of `sidecar top` (give or take the reply's way back).
    interval = float(re.search(r"rates over ([\d.]+)s", frame).group(1))  # type: ignore[union-attr]
    counted = float(calls) * interval
    assert 0 < counted <= traffic.between(started, ended + 0.5) + 1
    average = traffic.between(started, ended) / (ended - started)
    assert average / 3 <= float(calls) <= average * 3
    assert (success, errors, retries, fallbacks) == ("100.00%", "0.0", "0.0", "0.0")
    p50, p99 = seconds(cells[6]), seconds(cells[7])
    assert 0 < p50 <= p99 < 1.0
    assert float(row(frame, "ping")[1]) > 0
    breakers, upstreams = frame.split("\nBREAKER")[1].split("\nUPSTREAM")
    assert row(breakers, r.breaker)[1:3] == ["closed", "0"]
    assert row(upstreams, r.upstream_address)[1] == "no"  # not ejected


def test_top_under_a_terminal_draws_frames_and_exits_0_on_sigint() -> None:
    with live_sidecar() as (r, _traffic):
        main, child = pty.openpty()
        proc = subprocess.Popen(
            [*TOP, "--admin", r.sidecar.admin, "--interval", "0.3"],
            stdin=child,
            stdout=child,
            stderr=child,
            env=ENV,
            close_fds=True,
        )
        os.close(child)
        screen = b""
        try:
            deadline = time.monotonic() + 30
            while screen.count(b"\x1b[2J") < 3 or b"getItem" not in screen.rsplit(b"\x1b[2J")[-1]:
                assert time.monotonic() < deadline, screen.decode(errors="replace")
                ready, _, _ = select.select([main], [], [], 0.5)
                if ready:
                    screen += os.read(main, 65536)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
            while True:  # what it wrote on the way out
                ready, _, _ = select.select([main], [], [], 0.5)
                if not ready:
                    break
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # the terminal's other end is closed
                    break
                if not chunk:
                    break
                screen += chunk
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            os.close(main)
    text = screen.decode(errors="replace")
    last = text.rsplit("\x1b[2J", 1)[-1]
    assert "METHOD" in last
    assert "CALLS/S" in last
    assert float(row(last, "getItem")[1]) > 0
    assert "Traceback" not in text
    assert text.rstrip().endswith("\x1b[?25h")  # the cursor is given back


def test_top_once_says_so_when_the_admin_port_cannot_be_read() -> None:
    done = subprocess.run(
        [*TOP, "--once", "--admin", f"127.0.0.1:{free_port()}", "--interval", "0.1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=30,
    )
    assert done.returncode == 1
    assert "cannot read http://127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr


# The arithmetic, on scrapes written out by hand


def scrape(calls_ok: int, calls_failed: int, retries: int, fast: int, slow: int) -> str:
    """A /metrics text of one method: ``fast`` calls under 1 ms, ``slow`` ones under 10 ms."""
    p = "thrift_sidecar_"
    m = 'service="Catalog",method="getItem"'
    total = fast + slow
    return (
        f"# TYPE {p}requests_total counter\n"
        f'{p}requests_total{{{m},outcome="ok"}} {calls_ok}\n'
        f'{p}requests_total{{{m},outcome="timeout"}} {calls_failed}\n'
        f'{p}requests_total{{{m},outcome="fallback"}} 2\n'
        f"# TYPE {p}retries_total counter\n"
        f'{p}retries_total{{method="Catalog:getItem",reason="timeout"}} {retries}\n'
        f"# TYPE {p}request_duration_seconds histogram\n"
        f'{p}request_duration_seconds_bucket{{{m},le="0.001"}} {fast}\n'
        f'{p}request_duration_seconds_bucket{{{m},le="0.01"}} {total}\n'
        f'{p}request_duration_seconds_bucket{{{m},le="+Inf"}} {total}\n'
        f"{p}request_duration_seconds_count{{{m}}} {total}\n"
        f"{p}request_duration_seconds_sum{{{m}}} 0.1\n"
    )


STATE = {
    "version": "1.2.3",
    "uptime_seconds": 10.0,
    "ready": True,
    "breakers": [{"name": "10.0.0.1:9", "state": "open", "consecutive_failures": 5}],
    "upstream": {"addresses": ["10.0.0.1:9", "10.0.0.2:9"], "ejected": ["10.0.0.2:9"]},
    "pools": [{"address": "10.0.0.1:9", "open": 3, "busy": 1}],
}


def test_rates_and_quantiles_over_the_interval() -> None:
    before = Snapshot.from_text(scrape(10, 0, 0, 10, 0), STATE, at=100.0)
    after = Snapshot.from_text(scrape(100, 10, 4, 60, 50), STATE, at=102.0)
    frame = table(before, after)
    [getitem] = frame.methods
    assert getitem.method == "Catalog:getItem"  # the retries (method="Catalog:getItem") join it
    assert frame.interval == 2.0
    assert getitem.calls_per_second == 50.0  # 100 calls in 2 s
    assert getitem.errors_per_second == 5.0
    assert getitem.success == 0.9
    assert getitem.retries_per_second == 2.0
    assert getitem.fallbacks_per_second == 0.0  # 2 before, 2 after
    # 100 calls in the interval: 50 under 1 ms, 50 between 1 and 10 ms.
    assert getitem.p50 == pytest.approx(0.001)
    assert getitem.p99 == pytest.approx(0.001 + 0.009 * 49 / 50)
    # Without an earlier reading: from zero over the uptime.
    since_start = table(None, after).methods[0]
    assert since_start.calls_per_second == 112 / 10.0
    # A counter that went down (a restart) counts from zero.
    restarted = table(after, Snapshot.from_text(scrape(4, 0, 0, 4, 0), STATE, at=104.0))
    assert restarted.methods[0].calls_per_second == 3.0  # 6 calls (2 are fallbacks) in 2 s
    assert [(b.name, b.state, b.failures) for b in frame.breakers] == [("10.0.0.1:9", "open", 5)]
    assert [(a.address, a.ejected, a.open, a.busy) for a in frame.addresses] == [
        ("10.0.0.1:9", False, 3, 1),
        ("10.0.0.2:9", True, 0, 0),
    ]


def test_quantile_edges() -> None:
    assert quantile(0.5, {}) is None
    assert quantile(0.5, {0.001: 0, float("inf"): 0}) is None
    assert quantile(0.5, {0.001: 0, 0.01: 0, float("inf"): 10}) == 0.01  # past the last bound
    assert quantile(1.0, {0.001: 4, float("inf"): 4}) == 0.001


def test_a_hostile_method_name_cannot_drive_the_terminal() -> None:
    metrics = SidecarMetrics()
    metrics.calls.method("Catalog:\x1b[2Jevil\nline").request("ok", 0.001)
    text = generate_latest(metrics.registry).decode()  # as /metrics would give it
    hostile = Snapshot.from_text(text, STATE, at=1.0)
    frame = render(table(None, hostile), "http://x")
    assert "\x1b" not in frame
    assert "Catalog:\\x1b[2Jevil\\nline" in frame
    assert printable("fine:name") == "fine:name"


def test_the_admin_address_defaults_to_the_metrics_listen_variable() -> None:
    assert live.default_admin({}) == "http://127.0.0.1:9464"
    assert live.default_admin({"SIDECAR_METRICS_LISTEN": "0.0.0.0:9999"}) == "http://127.0.0.1:9999"
    assert live.default_admin({"SIDECAR_METRICS_LISTEN": "10.1.2.3:80"}) == "http://10.1.2.3:80"
    assert live.admin_url("http://h:1/") == "http://h:1"
