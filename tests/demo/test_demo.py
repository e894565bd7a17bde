"""`sidecar demo` end to end, and the demo's parts (traffic, table arithmetic, compose programs).

The three demo runs (faults, ``--no-faults``, ``--keep-running``) start
together in one module fixture, each as ``python -m sidecar demo`` in a
session of its own, so the module costs about one run's time. Their
assertions read the printed table and summary, as a person would.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sidecar.demo.phases import OVERLOAD_SECONDS, plan_phases
from sidecar.demo.printer import Printer
from sidecar.demo.readings import Interval, MetricsView, Snapshot, histogram_quantile, in_order
from sidecar.demo.traffic import Traffic
from sidecar.demo.traffic_counts import TrafficCounts, percentile
from sidecar.metrics import SidecarMetrics
from sidecar.testing.catalog import CatalogServer
from sidecar.testing.faults import FaultStats
from tests.support.sidecar import REPO_ROOT, free_port, http_get
from tests.support.wait import wait_until

PHASES = ["healthy", "flaky", "outage", "recovery"]
# Bounds on a whole run: a 16 s demo, the sidecar's start, a loaded machine.
RUN_TIMEOUT = 120.0
ROW = re.compile(r"^(\d+s|total)\s")
PHASE = re.compile(r"^(\d)\. (\w+) \((\d+)s\): ")


@dataclass
class Row:
    label: str
    calls: int
    answered: int
    read_errors: int
    write_errors: int
    dropped: int
    faults: str
    retries: int
    cache: int
    static: int
    shed: int
    breaker: str

    @classmethod
    def parse(cls, line: str) -> Row:
        cells = line.split()
        assert len(cells) == 12, line
        number = [_int(c) for c in cells]
        reads, writes = (int(x.replace(",", "")) for x in cells[3].split("/"))
        return cls(
            cells[0], number[1], number[2], reads, writes, number[4], cells[5],
            number[6], number[7], number[8], number[9], cells[10],
        )  # fmt: skip


def _int(cell: str) -> int:
    """A number as printed (``1,234``); -1 for a cell that is not one."""
    try:
        return int(cell.replace(",", ""))
    except ValueError:
        return -1


@dataclass
class PhaseOutput:
    name: str
    seconds: int
    rows: list[Row] = field(default_factory=list)
    total: Row | None = None
    events: list[str] = field(default_factory=list)


def parse_output(text: str) -> dict[str, PhaseOutput]:
    """The table, per phase: rows, the total row and the event lines."""
    phases: dict[str, PhaseOutput] = {}
    current: PhaseOutput | None = None
    for line in text.splitlines():
        if m := PHASE.match(line):
            current = phases[m.group(2)] = PhaseOutput(m.group(2), int(m.group(3)))
        elif current is not None and ROW.match(line):
            row = Row.parse(line)
            if row.label == "total":
                current.total = row
                current = None
            else:
                current.rows.append(row)
        elif current is not None and line.startswith("      "):
            current.events.append(line.strip())
    return phases


@dataclass
class DemoRun:
    """One ``python -m sidecar demo`` in a session (process group) of its own."""

    proc: subprocess.Popen[bytes]
    out_path: Path
    started: float

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT) -> tuple[int, str]:
        try:
            code = self.proc.wait(max(1.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the demo did not end within {timeout}s:\n{self.output()}")
        return code, self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def start_demo(tmp: Path, name: str, *args: str) -> DemoRun:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("NO_COLOR", None)
    env["PYTHONIOENCODING"] = "utf-8"  # the table's arrows; ASCII "->" on other encodings
    out_path = tmp / f"{name}.txt"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "demo", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp,
            env=env,
            start_new_session=True,
        )
    return DemoRun(proc, out_path, time.monotonic())


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, DemoRun]]:
    tmp = tmp_path_factory.mktemp("demo")
    runs = {
        "faults": start_demo(tmp, "faults", "--duration", "16"),
        "no_faults": start_demo(tmp, "no_faults", "--duration", "12", "--no-faults"),
        "keep": start_demo(tmp, "keep", "--duration", "12", "--keep-running", "--rate", "60"),
    }
    try:
        yield runs
    finally:
        for run in runs.values():
            run.kill()


@pytest.mark.slow
def test_demo_shows_every_phase(demo_runs: dict[str, DemoRun]) -> None:
    code, out = demo_runs["faults"].wait()
    assert code == 0, out
    assert "\x1b[" not in out, "colour codes in output that is not a terminal"
    assert re.search(r"metrics   http://127\.0\.0\.1:\d+/metrics", out), out
    phases = parse_output(out)
    assert list(phases) == PHASES, out
    assert sum(p.seconds for p in phases.values()) == 16
    for phase in phases.values():
        assert phase.total is not None, f"no total row for {phase.name}:\n{out}"
        assert len(phase.rows) >= phase.seconds, out
        assert all(r.dropped == 0 for r in phase.rows), f"dropped connections:\n{out}"
        assert all(r.shed == 0 for r in phase.rows), f"shed calls without --overload:\n{out}"
    healthy, flaky, outage, recovery = (phases[n] for n in PHASES)
    h = healthy.total
    assert h is not None, out
    assert h.calls > 0, out
    assert h.answered == h.calls, out
    assert (h.read_errors, h.write_errors, h.retries, h.cache, h.static) == (0, 0, 0, 0, 0), out
    assert h.breaker == "closed", out

    # flaky: the injector breaks calls, the sidecar retries them; reads barely notice.
    f = flaky.total
    assert f is not None, out
    assert int(f.faults) > 0, out
    assert f.retries > 0, out
    opened_in_flaky = any("closed → open" in e for e in flaky.events)
    if not opened_in_flaky:  # then every failed read was retried or served from the cache
        assert f.read_errors * 50 <= f.calls, out

    # outage: the breaker opens, the cache and the static reply answer, the rest get an error.
    o = outage.total
    assert o is not None
    assert any("closed → open" in e for e in flaky.events + outage.events), out
    assert any(r.breaker == "open" for r in outage.rows), out
    assert o.cache > 0, out
    assert o.static > 0, out
    assert o.read_errors > 0, out  # the uncached reads
    assert o.write_errors > 0, out
    assert o.answered > o.read_errors + o.write_errors, out
    examples = "\n".join(outage.events)
    assert re.search(r"getItem\(7\)\s+→ Item 7 .*, the cached reply", examples), out
    assert re.search(r"getItem\(999\)\s+→ TApplicationException INTERNAL_ERROR: ", examples), out
    assert re.search(r"listItems\(999\)\s+→ .*\(the static reply\)", examples), out
    assert re.search(r"placeOrder\(\.\.\.\)\s+→ TApplicationException INTERNAL_ERROR", examples)

    # recovery: a half-open probe closes the breaker; then every call is answered.
    r = recovery.total
    assert r is not None, out
    assert r.breaker == "closed", out
    assert any("half-open → closed" in e for e in recovery.events), out
    assert recovery.rows[-1].breaker == "closed", out
    last = recovery.rows[-1]
    assert last.answered == last.calls, out
    assert last.read_errors + last.write_errors == 0, out

    summary = out[out.index("Summary") :]
    assert "0 dropped connections" in summary.split("overall")[1], out
    assert re.search(r"(\d+) reads answered from the\s+cache", summary), out
    assert "did not go as expected" not in out


@pytest.mark.slow
def test_demo_without_faults_is_all_healthy(demo_runs: dict[str, DemoRun]) -> None:
    code, out = demo_runs["no_faults"].wait()
    assert code == 0, out
    phases = parse_output(out)
    assert list(phases) == PHASES, out
    for phase in phases.values():
        t = phase.total
        assert t is not None, out
        assert t.calls > 0, out
        assert t.answered == t.calls, out
        assert (t.read_errors, t.write_errors, t.dropped, t.retries) == (0, 0, 0, 0), out
        assert (t.faults, t.cache, t.static, t.breaker) == ("0", 0, 0, "closed"), out
        assert not phase.events, out


@pytest.mark.slow
def test_demo_keep_running_serves_metrics_until_interrupted(
    demo_runs: dict[str, DemoRun],
) -> None:
    run = demo_runs["keep"]

    def still_running() -> bool:
        if run.proc.poll() is not None:
            pytest.fail(f"the demo exited with {run.proc.returncode}:\n{run.output()}")
        return "Still running (--keep-running)" in run.output()

    wait_until(still_running, timeout=RUN_TIMEOUT, interval=0.2, message="--keep-running")
    out = run.output()
    url = re.search(r"http://127\.0\.0\.1:\d+/metrics", out)
    pid = re.search(r"\(pid (\d+)\)", out)
    assert url, out
    assert pid, out
    status, body = http_get(url.group(0))
    assert status == 200
    assert "thrift_sidecar_requests_total" in body
    calls = MetricsView(body).total("thrift_sidecar_requests_total")
    # Light traffic goes on: the sidecar keeps counting calls.
    wait_until(
        lambda: (
            MetricsView(http_get(url.group(0))[1]).total("thrift_sidecar_requests_total") > calls
        ),
        timeout=10,
        interval=0.1,
        message="more calls while kept running",
    )
    os.killpg(run.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole group
    code, out = run.wait()
    assert code == 0, out
    assert "interrupted: stopping" in out
    sidecar_pid = int(pid.group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(sidecar_pid, 0)


@pytest.mark.slow
def test_demo_overload_sheds_calls_and_keeps_the_upstream_within_the_limit(
    tmp_path: Path,
) -> None:
    run = start_demo(tmp_path, "overload", "--duration", "12", "--no-faults", "--overload")
    try:
        code, out = run.wait()
    finally:
        run.kill()
    assert code == 0, out
    assert "one call at a time, 2 ms each (--overload)" in out
    phases = parse_output(out)
    assert list(phases) == [*PHASES, "overload"], out
    assert phases["overload"].seconds == OVERLOAD_SECONDS
    for name in PHASES:  # the usual traffic never reaches the limit
        total = phases[name].total
        assert total is not None, out
        assert total.shed == 0, out
        assert total.read_errors + total.write_errors == 0, out
    overload = phases["overload"]
    t = overload.total
    assert t is not None, out
    assert t.shed > 0, out
    assert t.cache > 0, out  # shed reads of hot items: their cached reply
    assert t.calls == t.answered + t.read_errors + t.write_errors, out
    assert t.dropped == 0, out
    assert all(r.breaker == "closed" for r in overload.rows), out
    assert not overload.events, out  # no breaker transition
    summary = out[out.index("Summary") :]
    peak = re.search(r"the\s+upstream\s+had\s+at\s+most\s+(\d+)\s+calls\s+at\s+once", summary)
    assert peak, out
    assert int(peak.group(1)) <= 8, out  # config/demo.yaml's upstream.max_in_flight
    assert "did not go as expected" not in out


# -- the demo's own parts, without the whole run -------------------------------------


def test_phases_scale_with_the_duration_and_leave_time_to_recover() -> None:
    for duration in (12, 13, 16, 20, 30, 47, 60, 300):
        phases = plan_phases(duration, faults=True, reset_timeout=3.0)
        assert [p.name for p in phases] == PHASES
        assert sum(p.seconds for p in phases) == duration
        assert all(p.seconds >= 2 for p in phases)
        assert phases[3].seconds >= 5  # reset_timeout + 2
        assert phases[1].rates
        assert not phases[1].down
        assert phases[2].down
        assert not phases[2].rates
    longer = plan_phases(12, faults=True, reset_timeout=10.0)
    assert longer[3].seconds >= 12
    quiet = plan_phases(20, faults=False, reset_timeout=3.0)
    assert all(not p.rates and not p.down for p in quiet)
    assert not any(p.crowd for p in quiet)
    overloaded = plan_phases(20, faults=True, reset_timeout=3.0, overload=True)
    assert [p.name for p in overloaded] == [*PHASES, "overload"]
    assert sum(p.seconds for p in overloaded) == 20 + OVERLOAD_SECONDS
    assert [p.crowd for p in overloaded] == [False] * 4 + [True]


def test_histogram_quantile_interpolates_like_promql() -> None:
    inf = float("inf")
    assert histogram_quantile(0.5, {}) is None
    assert histogram_quantile(0.5, {0.001: 0, inf: 0}) is None
    buckets = {0.001: 0.0, 0.0025: 50.0, 0.005: 100.0, inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.0025)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.00175)
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.00375)
    # In the first bucket the lower bound is 0; in +Inf, the largest finite bound.
    assert histogram_quantile(0.5, {0.01: 10.0, inf: 10.0}) == pytest.approx(0.005)
    assert histogram_quantile(0.99, {0.01: 1.0, inf: 10.0}) == pytest.approx(0.01)


def test_transitions_are_put_in_the_order_they_happened() -> None:
    counted = [("half-open", "closed", 1), ("half-open", "open", 2), ("open", "half-open", 3)]
    assert in_order(counted, "open") == [
        ("open", "half-open", 1),
        ("half-open", "open", 1),
        ("open", "half-open", 1),
        ("half-open", "open", 1),
        ("open", "half-open", 1),
        ("half-open", "closed", 1),
    ]
    assert in_order([("closed", "open", 1)], "closed") == [("closed", "open", 1)]
    # A change that cannot follow from the start state is still shown, at the end.
    assert in_order([("half-open", "closed", 1)], "closed") == [("half-open", "closed", 1)]


def test_intervals_read_a_real_exposition() -> None:
    metrics = SidecarMetrics()
    before = MetricsView(generate_latest(metrics.registry).decode())
    stats = metrics.calls.method("getItem")
    for seconds in (0.0004, 0.0004, 0.003, 0.2):
        stats.request("ok", seconds)
    metrics.retries.labels("getItem", "connection_closed").inc(3)
    metrics.fallback_replies.labels("getItem", "cache").inc(5)
    metrics.fallback_replies.labels("listItems", "static").inc()
    metrics.breaker_transitions.labels("u", "closed", "open").inc()
    metrics.breaker_state.labels("u").set(2)
    after = MetricsView(generate_latest(metrics.registry).decode())
    counts = TrafficCounts(calls=4, answered=4)
    interval = Interval.between(
        Snapshot(1.0, TrafficCounts(), before, FaultStats()),
        Snapshot(2.0, counts, after, FaultStats(calls=7, actions={"ok": 5, "reset_before": 2})),
    )
    assert interval.traffic.calls == 4
    assert interval.seconds == 1.0
    assert (interval.retries, interval.cache, interval.static) == (3, 5, 1)
    assert interval.faults_injected == 2
    assert interval.breaker == "open"
    assert interval.transitions == [("closed", "open", 1)]
    assert interval.p50 is not None
    assert 0.00025 <= interval.p50 <= 0.0025


def test_output_has_colour_only_when_asked() -> None:
    interval = Interval(1.0, TrafficCounts(calls=3, answered=2, read_errors=1), 0, 0, 0, 0, None,
                        "open", [])  # fmt: skip
    plain = io.StringIO()
    Printer(plain).row("1s", interval)  # a StringIO is not a terminal
    assert "\x1b[" not in plain.getvalue()
    assert Row.parse(plain.getvalue()).read_errors == 1
    coloured = io.StringIO()
    Printer(coloured, color=True).row("1s", interval)
    assert "\x1b[31m" in coloured.getvalue()


# -- what docker-compose runs: the upstream and the traffic generator, alone ----------


def test_traffic_counts_what_a_client_sees() -> None:
    with CatalogServer() as server:
        traffic = Traffic([server.address], clients=2, rate=200, seed=1).start()
        try:
            wait_until(lambda: traffic.snapshot().calls >= 100, timeout=30, interval=0.05)
        finally:
            traffic.stop()
        counts = traffic.snapshot()
    assert counts.calls >= 100
    assert counts.answered == counts.calls
    assert counts.reads + counts.writes == counts.calls
    assert counts.errors == 0
    assert counts.dropped == 0
    assert 0 < counts.writes < counts.reads
    assert (counts - counts).calls == 0
    assert (counts + counts).calls == 2 * counts.calls
    latency = percentile(traffic.take_latencies(), 0.5)
    assert latency is not None
    assert latency > 0
    # Against a port where nothing listens, calls never start: connect failures, no calls.
    nowhere = Traffic([f"127.0.0.1:{free_port()}"], clients=1, rate=50).start()
    try:
        wait_until(lambda: nowhere.snapshot().connect_failures >= 2, timeout=10, interval=0.05)
    finally:
        nowhere.stop()
    assert nowhere.snapshot().calls == 0


@pytest.mark.slow
def test_compose_entry_points_run_alone(tmp_path: Path) -> None:
    """``python -m sidecar.testing.upstream --faults cycle``, ``python -m sidecar.demo.traffic``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    port = free_port()
    upstream = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.testing.upstream",
            "--port",
            str(port),
            "--faults",
            "cycle",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:

        def listening() -> bool:
            assert upstream.poll() is None, "the upstream exited"
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
            except OSError:
                return False
            return True

        wait_until(listening, timeout=30, interval=0.05, message="the upstream's port")
        traffic = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar.demo.traffic",
                "--target",
                f"127.0.0.1:{port}",
                "--duration",
                "2",
                "--report-every",
                "1",
                "--rate",
                "40",
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        assert traffic.returncode == 0, traffic.stderr
        reports = re.findall(r"(\d+) calls: (\d+) answered, .* (\d+) dropped", traffic.stderr)
        assert reports, traffic.stderr
        assert sum(int(calls) for calls, _, _ in reports) > 0
        # The fault cycle starts healthy: every call answered, none dropped.
        assert all(calls == answered and dropped == "0" for calls, answered, dropped in reports)
    finally:
        upstream.send_signal(signal.SIGTERM)
        try:
            code = upstream.wait(15)
        except subprocess.TimeoutExpired:
            upstream.kill()
            upstream.wait(5)
            raise
        log = upstream.stdout.read().decode() if upstream.stdout else ""
    assert code == 0, log
    assert "fault cycle: healthy" in log
