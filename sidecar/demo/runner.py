"""``sidecar demo``: the example upstream, a fault injector, the real sidecar, and clients.

What runs (all on 127.0.0.1, free ports unless given):

    clients (threads) ──► sidecar (``sidecar run``, a subprocess) ──► FaultProxy ──► Catalog

- the Catalog service of ``idl/example.thrift`` (`sidecar.demo.upstream`, a thread);
- a `FaultProxy` in front of it (`sidecar.demo.faults`, a thread), which the
  phases tell to misbehave;
- the sidecar itself, started as a user would (``python -m sidecar run
  --config FILE``) with the demo settings of ``config/demo.yaml`` (shipped in
  the package as ``sidecar/demo/demo.yaml``, with the packaged IDL and the
  ports filled in);
- `Traffic`: paced Catalog calls from several client threads.

Phases (their lengths scale with ``--duration``): healthy → flaky (the fault
injector resets some calls; the sidecar retries the reads) → outage (the
fault injector is down: the breaker opens and the sidecar serves cached or
static replies, or a clear ``TApplicationException``) → recovery (back up:
a half-open probe succeeds and the breaker closes).

Every second a table row shows what the clients saw (their own counts) next
to what the sidecar did (read from its ``/metrics`` over HTTP, parsed with
prometheus_client's parser, as a user would). A summary per phase follows,
and the run checks its own story: retries in the flaky phase, the breaker
opening and fallbacks served in the outage, the breaker closed at the end, no
dropped client connection. Exit status 0 when all of that held, 1 when not,
2 when the demo could not start.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml
from prometheus_client.parser import text_string_to_metric_families

from sidecar.demo.faults import FaultPlan, FaultProxyThread, FaultStats
from sidecar.demo.traffic import Traffic, TrafficCounts
from sidecar.demo.upstream import FLAKY_RATES, CatalogServer, example_idl_path, make_item

PREFIX = "thrift_sidecar_"
BREAKER_STATES = {0: "closed", 1: "half-open", 2: "open"}
# The shortest run whose phases still tell the story (the recovery needs the
# breaker's reset_timeout, 3s in the demo settings, plus a little).
MIN_DURATION = 12.0
# Shares of the run per phase; the recovery gets the rest.
PHASE_SHARES = {"healthy": 0.2, "flaky": 0.25, "outage": 0.3}
# Calls per second with --keep-running once the phases are over.
LIGHT_RATE = 20.0
# Seconds between table rows with --keep-running once the phases are over.
KEEP_RUNNING_ROW_EVERY = 10
# Seconds to wait for the sidecar's /readyz, and for it to exit on SIGTERM.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
# A call of the demo's own (the "what a client sees" examples): never asked by the traffic.
UNCACHED_ID = 999
UNCACHED_LIMIT = 999
CACHED_ID = 7


class DemoError(Exception):
    """The demo could not start or lost a part it needs."""


@dataclass(frozen=True)
class DemoOptions:
    """What ``sidecar demo`` was asked to do."""

    duration: float = 30.0
    keep_running: bool = False
    faults: bool = True
    port: int | None = None
    metrics_port: int | None = None
    clients: int = 4
    rate: float = 120.0
    seed: int | None = None


@dataclass(frozen=True)
class Phase:
    """One scripted phase: what the fault injector does, for how long."""

    name: str
    seconds: int
    headline: str
    rates: dict[str, float] = field(default_factory=dict)
    down: bool = False


def plan_phases(duration: float, faults: bool, reset_timeout: float) -> list[Phase]:
    """The four phases, their lengths in whole seconds adding up to ``duration``.

    The recovery lasts at least ``reset_timeout`` + 2 s, so that the breaker's
    half-open probe happens after the upstream is back.
    """
    total = round(max(MIN_DURATION, duration))
    recovery = max(math.ceil(reset_timeout) + 2, round(total * (1 - sum(PHASE_SHARES.values()))))
    rest = max(6, total - recovery)
    healthy = max(2, round(rest * PHASE_SHARES["healthy"] / sum(PHASE_SHARES.values())))
    flaky = max(2, round(rest * PHASE_SHARES["flaky"] / sum(PHASE_SHARES.values())))
    outage = max(2, rest - healthy - flaky)
    before = round(FLAKY_RATES.get("reset_before", 0.0) * 100)
    after = round(FLAKY_RATES.get("reset_after", 0.0) * 100)
    if not faults:
        note = "no faults injected (--no-faults): the upstream stays healthy"
        return [
            Phase("healthy", healthy, note),
            Phase("flaky", flaky, note),
            Phase("outage", outage, note),
            Phase("recovery", recovery, note),
        ]
    return [
        Phase(
            "healthy", healthy, "the upstream answers every call; the sidecar caches good replies"
        ),
        Phase(
            "flaky",
            flaky,
            f"the fault injector resets {before + after}% of the calls ({before}% before "
            f"the upstream runs them, {after}% after); the sidecar retries reads, never a "
            "write it has sent",
            rates=dict(FLAKY_RATES),
        ),
        Phase(
            "outage",
            outage,
            "the upstream is down: the breaker opens, reads get cached or static replies",
            down=True,
        ),
        Phase(
            "recovery",
            recovery,
            "the upstream is back: a half-open probe closes the breaker",
        ),
    ]


# -- the sidecar's metrics, as a user reads them --------------------------------------


class MetricsView:
    """One scrape of ``/metrics``, parsed with prometheus_client's parser."""

    def __init__(self, text: str = "") -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.append((sample.name, dict(sample.labels), sample.value))

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def by_label(self, name: str, *keys: str) -> dict[tuple[str, ...], float]:
        """Sums of ``name`` grouped by the values of ``keys``."""
        grouped: dict[tuple[str, ...], float] = {}
        for sample, have, value in self.samples:
            if sample == name:
                key = tuple(have.get(k, "") for k in keys)
                grouped[key] = grouped.get(key, 0.0) + value
        return grouped

    def breaker_state(self) -> str:
        """The worst state of any breaker (open > half-open > closed)."""
        values = [v for s, _, v in self.samples if s == PREFIX + "breaker_state"]
        return BREAKER_STATES.get(int(max(values, default=0)), "?")


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q``-quantile from cumulative bucket counts by upper bound, as PromQL computes it.

    Linear interpolation inside the bucket where the rank falls; None when
    there are no observations; the largest finite bound when the rank falls
    in the ``+Inf`` bucket.
    """
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class Snapshot:
    """What the clients, the sidecar and the fault injector had counted at one moment."""

    at: float
    traffic: TrafficCounts
    metrics: MetricsView
    faults: FaultStats


@dataclass
class Interval:
    """The difference between two snapshots, as the table and summary show it."""

    seconds: float
    traffic: TrafficCounts
    faults_injected: int
    retries: float
    cache: float
    static: float
    p50: float | None
    breaker: str
    transitions: list[tuple[str, str, int]]
    budget_tokens: float

    @classmethod
    def between(cls, a: Snapshot, b: Snapshot) -> Interval:
        ma, mb = a.metrics, b.metrics
        fallback_a = ma.by_label(PREFIX + "fallback_replies_total", "source")
        fallback_b = mb.by_label(PREFIX + "fallback_replies_total", "source")
        transitions = []
        ta = ma.by_label(PREFIX + "breaker_transitions_total", "from_state", "to_state")
        tb = mb.by_label(PREFIX + "breaker_transitions_total", "from_state", "to_state")
        for (old, new), count in sorted(tb.items()):
            delta = int(count - ta.get((old, new), 0.0))
            if delta > 0:
                transitions.append((old, new, delta))
        transitions = in_order(transitions, ma.breaker_state())
        ba = ma.by_label(PREFIX + "request_duration_seconds_bucket", "le")
        bb = mb.by_label(PREFIX + "request_duration_seconds_bucket", "le")
        buckets = {float(le): bb[(le,)] - ba.get((le,), 0.0) for (le,) in bb}
        return cls(
            seconds=b.at - a.at,
            traffic=b.traffic - a.traffic,
            faults_injected=_injected(b.faults) - _injected(a.faults),
            retries=mb.total(PREFIX + "retries_total") - ma.total(PREFIX + "retries_total"),
            cache=fallback_b.get(("cache",), 0.0) - fallback_a.get(("cache",), 0.0),
            static=fallback_b.get(("static",), 0.0) - fallback_a.get(("static",), 0.0),
            p50=histogram_quantile(0.5, buckets),
            breaker=mb.breaker_state(),
            transitions=transitions,
            budget_tokens=mb.total(PREFIX + "retry_budget_tokens"),
        )


def in_order(transitions: list[tuple[str, str, int]], start: str) -> list[tuple[str, str, int]]:
    """Transitions counted in one interval, in the order they can have happened from ``start``.

    The counter says only how often each change happened; following the
    states from the one at the start of the interval puts them in sequence
    (``open → half-open`` before ``half-open → open``).
    """
    left = {(old, new): count for old, new, count in transitions}
    ordered: list[tuple[str, str, int]] = []
    state = start
    while True:
        steps = [(old, new) for (old, new), count in left.items() if old == state and count]
        if not steps:
            break
        # Prefer a change that leads on to the others (a walk that uses them all).
        step = max(steps, key=lambda s: sum(n for (o, _), n in left.items() if o == s[1]))
        left[step] -= 1
        if ordered and ordered[-1][:2] == step:
            ordered[-1] = (*step, ordered[-1][2] + 1)
        else:
            ordered.append((*step, 1))
        state = step[1]
    ordered += [(old, new, count) for (old, new), count in left.items() if count]
    return ordered


def _injected(stats: FaultStats) -> int:
    return stats.calls - stats.action("ok")


# -- output ---------------------------------------------------------------------------


_BREAKER_COLOURS = {"closed": "32", "half-open": "33", "open": "31"}


class Printer:
    """The table and the rest of the output; colour only on a terminal (and not NO_COLOR)."""

    COLUMNS = (
        ("time", 5),
        ("calls", 6),
        ("answered", 8),
        ("errors r/w", 10),
        ("dropped", 7),
        ("faults", 6),
        ("retries", 7),
        ("cache", 6),
        ("static", 6),
        ("breaker", 9),
        ("p50 ms", 6),
    )

    def __init__(self, out: TextIO, color: bool | None = None) -> None:
        self.out = out
        if color is None:
            color = _isatty(out) and not os.environ.get("NO_COLOR")
        self.color = color
        encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
        self.arrow = "→" if encoding == "utf8" else "->"

    def style(self, text: str, *codes: str) -> str:
        if not self.color or not codes:
            return text
        return "\033[" + ";".join(codes) + "m" + text + "\033[0m"

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def header(self) -> None:
        cells = [
            name.rjust(width) if i else name.ljust(width)
            for i, (name, width) in enumerate(self.COLUMNS)
        ]
        self.line(self.style("  ".join(cells).rstrip(), "1"))

    def phase(self, phase: Phase, number: int, width: int = 100) -> None:
        title = f"{number}. {phase.name} ({phase.seconds}s)"
        lines = textwrap.wrap(
            f"{title}: {phase.headline}", width, subsequent_indent="   ", break_on_hyphens=False
        )
        lines[0] = self.style(title, "1", "36") + lines[0][len(title) :]
        for line in lines:
            self.line(line)

    def row(
        self, label: str, interval: Interval, *, down: bool = False, total: bool = False
    ) -> None:
        t = interval.traffic
        values = [
            label,
            f"{t.calls:,}",
            f"{t.answered:,}",
            f"{t.read_errors}/{t.write_errors}",
            f"{t.dropped}",
            "down" if down else f"{interval.faults_injected:,}",
            f"{interval.retries:,.0f}",
            f"{interval.cache:,.0f}",
            f"{interval.static:,.0f}",
            interval.breaker,
            f"{interval.p50 * 1000:.2f}" if interval.p50 is not None else "-",
        ]
        colours: dict[int, tuple[str, ...]] = {
            9: (_BREAKER_COLOURS.get(interval.breaker, ""),),
        }
        if t.errors:
            colours[3] = ("31",)
        if t.dropped:
            colours[4] = ("31",)
        cells = []
        for i, (value, (_, width)) in enumerate(zip(values, self.COLUMNS, strict=True)):
            text = value.ljust(width) if i == 0 else value.rjust(width)
            codes = tuple(c for c in (*colours.get(i, ()), "1" if total else "") if c)
            cells.append(self.style(text, *codes))
        self.line("  ".join(cells))

    def paragraph(self, label: str, text: str, width: int = 100) -> None:
        """``label`` then ``text`` wrapped to ``width``, later lines indented under the text."""
        indent = " " * (2 + len(label))
        lines = textwrap.wrap(
            text,
            width,
            initial_indent="  " + label,
            subsequent_indent=indent,
            break_on_hyphens=False,
        )
        for line in lines:
            self.line(line)

    def event(self, text: str) -> None:
        self.line(self.style(f"      {text}", "33"))


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


# -- the parts ------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def packaged_demo_settings() -> Iterator[dict[str, Any]]:
    """The demo settings (``config/demo.yaml``, shipped as ``sidecar/demo/demo.yaml``)."""
    resource = importlib.resources.files("sidecar.demo").joinpath("demo.yaml")
    yield dict(yaml.safe_load(resource.read_text(encoding="utf-8")))


def demo_config(
    settings: dict[str, Any], *, listen: str, admin: str, upstream: str, idl: Path
) -> dict[str, Any]:
    """The demo settings with the ports and the packaged IDL filled in."""
    config = dict(settings)
    config["listen"] = listen
    config["idl"] = str(idl)
    config["upstream"] = {**dict(config.get("upstream") or {}), "addresses": [upstream]}
    config["metrics"] = {**dict(config.get("metrics") or {}), "listen": admin}
    return config


class SidecarProcess:
    """``python -m sidecar run --config FILE`` as a child process, with its log in a file."""

    def __init__(self, config_path: Path, log_path: Path, admin_url: str) -> None:
        self.admin_url = admin_url
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "run", "--config", str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"the sidecar exited with status {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            url = self.admin_url + "/readyz"
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as response:
                if response.status == 200:
                    return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the sidecar was not ready after {timeout:g}s:\n" + self.log_tail()
                )
            time.sleep(0.05)

    def scrape(self) -> MetricsView:
        if self.proc.poll() is not None:
            raise DemoError(
                f"the sidecar exited with status {self.proc.returncode}:\n" + self.log_tail()
            )
        try:
            with urllib.request.urlopen(self.admin_url + "/metrics", timeout=5.0) as response:
                return MetricsView(response.read().decode())
        except (OSError, urllib.error.URLError) as exc:
            raise DemoError(f"cannot read {self.admin_url}/metrics: {exc}") from None

    def stop(self) -> int | None:
        """SIGTERM, wait, kill if it hangs; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (as Ctrl-C), so the demo cleans up either way."""

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# -- the run --------------------------------------------------------------------------


@dataclass
class PhaseResult:
    phase: Phase
    interval: Interval
    opened: bool = False
    closed_after: float | None = None
    after_close: TrafficCounts = field(default_factory=TrafficCounts)


class Demo:
    """One run of the demo; `run` returns the exit status."""

    def __init__(self, options: DemoOptions, out: TextIO, color: bool | None = None) -> None:
        self.options = options
        self.p = Printer(out, color)
        self.results: list[PhaseResult] = []
        self.examples_shown = False
        self.tick_number = 0
        self.summarised = False
        self.failures: list[str] = []

    def run(self) -> int:
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(stop_on_sigterm())
                try:
                    return self._run(stack)
                except KeyboardInterrupt:
                    self.p.line()
                    self.p.line("interrupted: stopping the clients, the sidecar and the upstream")
                    if self.options.keep_running and self.summarised:
                        return 1 if self.failures else 0
                    return 130
        except DemoError as exc:
            self.p.line(f"sidecar demo: {exc}")
            return 2

    def _run(self, stack: contextlib.ExitStack) -> int:
        o = self.options
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sidecar-demo-")))
        idl = stack.enter_context(example_idl_path())
        settings = stack.enter_context(packaged_demo_settings())
        upstream = CatalogServer().start()
        stack.callback(upstream.stop)
        proxy = FaultProxyThread(upstream.address, "framed", FaultPlan(seed=o.seed)).start()
        stack.callback(proxy.stop)
        listen = f"127.0.0.1:{o.port or free_port()}"
        admin = f"127.0.0.1:{o.metrics_port or free_port()}"
        config = demo_config(settings, listen=listen, admin=admin, upstream=proxy.address, idl=idl)
        reset_timeout = _seconds(config.get("breaker", {}).get("reset_timeout", "30s"))
        fail_max = int(config.get("breaker", {}).get("fail_max", 5))
        config_path = workdir / "demo.yaml"
        config_path.write_text(
            "# sidecar demo: config/demo.yaml with the demo's ports and the packaged IDL\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        self._check_config(config_path)
        phases = plan_phases(o.duration, o.faults, reset_timeout)
        admin_url = f"http://{admin}"
        sidecar = SidecarProcess(config_path, workdir / "sidecar.log", admin_url)
        stack.callback(sidecar.stop)
        self._banner(upstream, proxy, listen, admin_url, sidecar, phases, fail_max, reset_timeout)
        sidecar.wait_ready(READY_TIMEOUT)
        traffic = Traffic([listen], clients=o.clients, rate=o.rate, seed=o.seed).start()
        stack.callback(traffic.stop)

        def snapshot() -> Snapshot:
            return Snapshot(time.monotonic(), traffic.snapshot(), sidecar.scrape(), proxy.stats)

        self.p.line()
        self.p.header()
        previous = snapshot()
        clock = previous.at
        for number, phase in enumerate(phases, 1):
            proxy.plan.set_rates(phase.rates)
            proxy.set_down(phase.down)
            self.p.phase(phase, number)
            phase_start = previous
            result = PhaseResult(phase, Interval.between(phase_start, phase_start))
            for _ in range(phase.seconds):
                clock += 1.0
                current = self._tick(clock, snapshot, previous, phase.down)
                if result.closed_after is not None:
                    result.after_close = result.after_close + (current.traffic - previous.traffic)
                if current.metrics.breaker_state() == "open":
                    result.opened = True
                    if phase.down and not self.examples_shown:
                        self._examples(traffic)
                if (
                    phase.name == "recovery"
                    and result.closed_after is None
                    and current.metrics.breaker_state() == "closed"
                ):
                    result.closed_after = current.at - phase_start.at
                previous = current
            if phase.name == "recovery" and o.faults:
                # The breaker may still wait for its probe; give it one reset_timeout more.
                extra = 0
                while previous.metrics.breaker_state() != "closed" and extra < reset_timeout + 2:
                    clock += 1.0
                    extra += 1
                    previous = self._tick(clock, snapshot, previous, False)
                    if previous.metrics.breaker_state() == "closed":
                        result.closed_after = previous.at - phase_start.at
            result.interval = Interval.between(phase_start, previous)
            self.results.append(result)
            self.p.row("total", result.interval, down=phase.down, total=True)
        failures = self.failures = self._summary(upstream, fail_max)
        self.summarised = True
        if o.keep_running:
            self._keep_running(traffic, snapshot, admin_url, sidecar, previous)
        traffic.stop()
        code = sidecar.stop()
        if code not in (0, None):
            failures.append(
                f"the sidecar exited with status {code} (log below)\n{sidecar.log_tail()}"
            )
        if failures:
            self.p.line()
            self.p.line(self.p.style("The demo did not go as expected:", "1", "31"))
            for failure in failures:
                self.p.line(f"  - {failure}")
            return 1
        if not o.keep_running:
            self.p.line()
            self.p.line(
                "Next: `sidecar demo --keep-running` keeps it all up to explore /metrics and "
                "/state;"
            )
            self.p.line("the settings are config/demo.yaml's, every key is in config/sidecar.yaml.")
        return 0

    def _check_config(self, path: Path) -> None:
        """Fail early, with the sidecar's own message, if the demo config is not valid."""
        from sidecar.config import load_config
        from sidecar.errors import ConfigError
        from sidecar.fallback.static import load_idl_parts

        try:
            load_idl_parts(load_config(path, environ={}))
        except ConfigError as exc:
            raise DemoError(f"the demo's config is not valid: {exc}") from None

    def _tick(
        self, at: float, snapshot: Callable[[], Snapshot], previous: Snapshot, down: bool
    ) -> Snapshot:
        delay = at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        current = snapshot()
        interval = Interval.between(previous, current)
        for old, new, count in interval.transitions:
            times = f" ({count} times)" if count > 1 else ""
            self.p.event(f"breaker {old} {self.p.arrow} {new}{times}")
        self.tick_number += 1
        self.p.row(f"{self.tick_number}s", interval, down=down)
        return current

    def _examples(self, traffic: Traffic) -> None:
        """What a client sees while the circuit is open: three calls of our own."""
        self.examples_shown = True
        a = self.p.arrow
        idl = traffic.idl
        expected = make_item(idl, CACHED_ID)
        order = idl.Order(customer="demo", lines=[idl.OrderLine(itemId=CACHED_ID, quantity=1)])
        calls: list[tuple[str, Callable[[Any], Any], Callable[[Any], str]]] = [
            (
                f"getItem({CACHED_ID})",
                lambda c: c.getItem(CACHED_ID),
                lambda r: (
                    f'Item {r.id} "{r.name}"'
                    + (", the cached reply" if r == expected else ", NOT the cached reply")
                ),
            ),
            (
                f"getItem({UNCACHED_ID})",
                lambda c: c.getItem(UNCACHED_ID),
                lambda r: f"Item {r.id} (unexpected: nothing was cached for it)",
            ),
            (
                f"listItems({UNCACHED_LIMIT})",
                lambda c: c.listItems(UNCACHED_LIMIT),
                lambda r: ", ".join(f'"{i.name}"' for i in r) + " (the static reply)",
            ),
            (
                "placeOrder(...)",
                lambda c: c.placeOrder(order),
                lambda r: f"Receipt {r.orderId} (unexpected: the upstream is down)",
            ),
        ]
        self.p.event("what a client sees now, calls of our own:")
        client = traffic.client()
        try:
            for label, call, show in calls:
                try:
                    text = show(call(client))
                except Exception as exc:  # what the client gets is what we show
                    text = _describe_exception(exc)
                self.p.event(f"  {label:<16} {a} {text}")
        finally:
            client.close()

    def _banner(
        self,
        upstream: CatalogServer,
        proxy: FaultProxyThread,
        listen: str,
        admin_url: str,
        sidecar: SidecarProcess,
        phases: list[Phase],
        fail_max: int,
        reset_timeout: float,
    ) -> None:
        o = self.options
        p = self.p
        p.line(
            p.style("thrift-sidecar demo", "1") + ": the example Catalog service behind the "
            "sidecar, with injected faults"
        )
        p.line()
        p.line(f"  upstream  the Catalog service (idl/example.thrift) on {upstream.address}")
        p.line(f"  faults    a fault injector in front of it, on {proxy.address}")
        p.line(
            f"  sidecar   {listen} (pid {sidecar.proc.pid}), config/demo.yaml's settings: the "
            f"breaker opens"
        )
        p.line(
            f"            after {fail_max} failed calls and probes again after {reset_timeout:g}s"
        )
        p.line(
            f"  metrics   {p.style(admin_url + '/metrics', '4')}   (also /state /healthz /readyz)"
        )
        p.line(
            f"  clients   {o.clients} threads, {o.rate:g} calls/s: reads of 40 hot items, "
            "some never-seen ids, 10% writes"
        )
        p.line("  phases    " + ", ".join(f"{ph.name} {ph.seconds}s" for ph in phases))
        p.line()
        p.line("  Per second: calls the clients made and what they got back (answered; errors =")
        p.line("  TApplicationException, reads/writes; dropped = connection lost), faults the")
        p.line("  injector caused, and from the sidecar's /metrics: retries, fallback replies")
        p.line("  from the cache and static, breaker state, median latency.")

    def _summary(self, upstream: CatalogServer, fail_max: int) -> list[str]:
        """Print the summary; returns what did not go as the story says."""
        p = self.p
        o = self.options
        by_name = {r.phase.name: r for r in self.results}
        failures: list[str] = []
        p.line()
        p.line(p.style("Summary", "1") + " (the clients' own counts, and the sidecar's /metrics)")
        for r in self.results:
            i, t = r.interval, r.interval.traffic
            latency = f", p50 {i.p50 * 1000:.2f} ms" if i.p50 is not None else ""
            if r.phase.name == "healthy" or not o.faults:
                text = (
                    f"{t.calls:,} calls, {t.answered:,} answered, {t.errors} errors, "
                    f"{t.dropped} dropped connections{latency}."
                )
            elif r.phase.name == "flaky":
                text = (
                    f"{t.calls:,} calls; the fault injector reset {i.faults_injected:,} of them "
                    f"and the sidecar retried {i.retries:,.0f} times. Client-visible errors: "
                    f"{t.read_errors} on reads, {t.write_errors} on writes (a write is never "
                    f"retried once sent); {t.dropped} dropped connections."
                )
            elif r.phase.name == "outage":
                opened = (
                    f"the breaker opened (after {fail_max} failed calls)"
                    if r.opened
                    else "the breaker did NOT open"
                )
                text = (
                    f"{t.calls:,} calls; {opened}: {i.cache:,.0f} reads answered from the "
                    f"cache, {i.static:,.0f} with the static reply; {t.read_errors} uncached "
                    f"reads and {t.write_errors} writes got a TApplicationException saying "
                    f"why; {t.dropped} dropped connections."
                )
            else:
                if r.closed_after is not None:
                    after = r.after_close
                    within = math.ceil(r.closed_after - 0.1)  # ticks are a second apart
                    closed = (
                        f"a half-open probe closed the breaker within {within}s "
                        f"of the upstream's return ({t.errors - after.errors} errors until then, "
                        f"{after.errors} of {after.calls:,} calls after)"
                    )
                else:
                    closed = "the breaker did NOT close"
                text = f"{t.calls:,} calls; {closed}; {t.dropped} dropped connections{latency}."
            p.paragraph(f"{r.phase.name:<9} ", text)
        total = TrafficCounts()
        for r in self.results:
            total = total + r.interval.traffic
        placed = upstream.calls["placeOrder:placed"]
        reached = upstream.calls["placeOrder"]
        p.paragraph(
            "overall   ",
            f"{total.calls:,} calls, {total.dropped} dropped connections; placeOrder reached "
            f"the upstream {reached:,} times for {placed:,} distinct orders (none twice).",
        )
        if total.dropped:
            failures.append(f"{total.dropped} client connections were dropped")
        if reached != placed:
            failures.append(
                f"an order reached the upstream twice ({reached} calls, {placed} orders)"
            )
        if o.faults:
            flaky, outage, recovery = by_name["flaky"], by_name["outage"], by_name["recovery"]
            if flaky.interval.retries <= 0:
                failures.append("no retries in the flaky phase")
            if not outage.opened:
                failures.append(f"the breaker did not open in the outage (fail_max {fail_max})")
            if outage.interval.cache + outage.interval.static <= 0:
                failures.append("no fallback replies in the outage")
            if recovery.closed_after is None:
                failures.append("the breaker did not close in the recovery")
        elif any(r.interval.traffic.errors for r in self.results):
            failures.append("client-visible errors without injected faults")
        return failures

    def _keep_running(
        self,
        traffic: Traffic,
        snapshot: Callable[[], Snapshot],
        admin_url: str,
        sidecar: SidecarProcess,
        previous: Snapshot,
    ) -> None:
        p = self.p
        traffic.set_rate(LIGHT_RATE)
        p.line()
        p.line(
            f"Still running (--keep-running), with {LIGHT_RATE:g} calls/s: explore "
            f"{p.style(admin_url + '/metrics', '4')} and {admin_url}/state"
        )
        p.line(f"  (sidecar log: {sidecar.log_path}). Ctrl-C to stop.")
        p.header()
        clock = previous.at
        while True:
            clock += KEEP_RUNNING_ROW_EVERY
            delay = clock - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            current = snapshot()
            interval = Interval.between(previous, current)
            self.tick_number += KEEP_RUNNING_ROW_EVERY
            p.row(f"{self.tick_number}s", interval)
            previous = current


def _seconds(value: Any) -> float:
    from sidecar.config import parse_duration

    return parse_duration(value)


def _describe_exception(exc: Exception) -> str:
    from thriftpy2.thrift import TApplicationException

    if isinstance(exc, TApplicationException):
        names = {v: k for k, v in vars(TApplicationException).items() if k.isupper()}
        kind = names.get(exc.type, str(exc.type))
        return f"TApplicationException {kind}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def run_demo(options: DemoOptions, out: TextIO | None = None, color: bool | None = None) -> int:
    """Run the demo, printing to ``out`` (stdout); returns the exit status."""
    return Demo(options, out or sys.stdout, color).run()
