"""``sidecar demo``: the example upstream, a fault injector, the real sidecar, and clients.

What runs (all on 127.0.0.1, free ports unless given):

    clients (threads) ──► sidecar (``sidecar run``, a subprocess) ──► FaultProxy ──► Catalog

the Catalog service and the `FaultProxy` (`sidecar.testing`, threads), the
sidecar with the demo settings (`sidecar.demo.sidecar_process`), and
`Traffic` (`sidecar.demo.traffic`). The phases (`sidecar.demo.phases`) tell
the fault injector what to do; with ``--overload`` the Catalog serves one
call at a time and the last phase adds a crowd of clients (a second
`Traffic`). Every second a table row shows what the clients saw next to
what the sidecar did (read from its ``/metrics``); a summary per phase
follows (`sidecar.demo.report`). Exit status 0 when the
story held, 1 when not, 2 when the demo could not start.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

from sidecar.demo.phases import (
    OVERLOAD_CLIENTS,
    OVERLOAD_FACTOR,
    OVERLOAD_SERVICE_TIME,
    DemoOptions,
    Phase,
    plan_phases,
)
from sidecar.demo.printer import Printer
from sidecar.demo.readings import Interval, Snapshot
from sidecar.demo.report import PhaseResult, Setup, print_banner, print_summary
from sidecar.demo.sidecar_process import (
    DemoError,
    SidecarProcess,
    demo_config,
    free_port,
    packaged_demo_settings,
    stop_on_sigterm,
)
from sidecar.demo.traffic import Traffic
from sidecar.testing.catalog import CatalogServer, example_idl_path, make_item
from sidecar.testing.faults import FaultPlan, FaultProxyThread

# Calls per second with --keep-running once the phases are over.
LIGHT_RATE = 20.0
# Seconds between table rows with --keep-running once the phases are over.
KEEP_RUNNING_ROW_EVERY = 10
# Seconds to wait for the sidecar's /readyz.
READY_TIMEOUT = 30.0
# Calls of the demo's own (the "what a client sees" examples): never asked by the traffic.
UNCACHED_ID = 999
UNCACHED_LIMIT = 999
CACHED_ID = 7


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
        self.reset_timeout = 0.0

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
        service_time = OVERLOAD_SERVICE_TIME if o.overload else None
        upstream = CatalogServer(service_time=service_time).start()
        stack.callback(upstream.stop)
        proxy = FaultProxyThread(upstream.address, "framed", FaultPlan(seed=o.seed)).start()
        stack.callback(proxy.stop)
        listen = f"127.0.0.1:{o.port or free_port()}"
        admin = f"127.0.0.1:{o.metrics_port or free_port()}"
        config = demo_config(settings, listen=listen, admin=admin, upstream=proxy.address, idl=idl)
        reset_timeout = self.reset_timeout = _seconds(
            config.get("breaker", {}).get("reset_timeout", "30s")
        )
        fail_max = int(config.get("breaker", {}).get("fail_max", 5))
        max_in_flight = (config.get("upstream") or {}).get("max_in_flight")
        config_path = workdir / "demo.yaml"
        config_path.write_text(
            "# sidecar demo: config/demo.yaml with the demo's ports and the packaged IDL\n"
            + yaml.safe_dump(config, sort_keys=False)
        )
        self._check_config(config_path)
        phases = plan_phases(o.duration, o.faults, reset_timeout, o.overload)
        admin_url = f"http://{admin}"
        sidecar = SidecarProcess(config_path, workdir / "sidecar.log", admin_url)
        stack.callback(sidecar.stop)
        setup = Setup(
            upstream.address, proxy.address, listen, admin_url, sidecar.proc.pid, fail_max,
            reset_timeout, max_in_flight,
        )  # fmt: skip
        print_banner(self.p, o, setup, phases)
        sidecar.wait_ready(READY_TIMEOUT)
        traffic = Traffic([listen], clients=o.clients, rate=o.rate, seed=o.seed).start()
        stack.callback(traffic.stop)
        crowds: list[Traffic] = []  # the overload phase's extra clients

        def snapshot() -> Snapshot:
            counts = traffic.snapshot()
            for crowd in crowds:
                counts = counts + crowd.snapshot()
            return Snapshot(time.monotonic(), counts, sidecar.scrape(), proxy.stats)

        self.p.line()
        self.p.header()
        previous = snapshot()
        clock = previous.at
        for number, phase in enumerate(phases, 1):
            proxy.plan.set_rates(phase.rates)
            proxy.set_down(phase.down)
            self.p.phase(phase, number)
            if phase.crowd:
                seed = None if o.seed is None else o.seed + 1000
                rate = OVERLOAD_FACTOR / OVERLOAD_SERVICE_TIME
                crowd = Traffic([listen], clients=OVERLOAD_CLIENTS, rate=rate, seed=seed)
                crowds.append(crowd.start())
                stack.callback(crowd.stop)
            result, previous, clock = self._play(phase, previous, clock, snapshot, traffic)
            for crowd in crowds:
                crowd.stop()
            self.results.append(result)
            self.p.row("total", result.interval, down=phase.down, total=True)
        failures = self.failures = print_summary(
            self.p,
            o,
            self.results,
            reached=upstream.calls["placeOrder"],
            placed=upstream.calls["placeOrder:placed"],
            fail_max=fail_max,
            max_in_flight=max_in_flight,
            upstream_peak=upstream.worker.max_in_flight if upstream.worker else None,
        )
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

    def _play(
        self,
        phase: Phase,
        start: Snapshot,
        clock: float,
        snapshot: Callable[[], Snapshot],
        traffic: Traffic,
    ) -> tuple[PhaseResult, Snapshot, float]:
        """One phase, a row per second of ``clock`` from ``start`` on.

        Returns:
            What happened, the phase's last snapshot and the clock at its end.
        """
        result = PhaseResult(phase, Interval.between(start, start))
        previous = start
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
                result.closed_after = current.at - start.at
            previous = current
        if phase.name == "recovery" and self.options.faults:
            # The breaker may still wait for its probe; give it one reset_timeout more.
            extra = 0
            while previous.metrics.breaker_state() != "closed" and extra < self.reset_timeout + 2:
                clock += 1.0
                extra += 1
                previous = self._tick(clock, snapshot, previous, False)
                if previous.metrics.breaker_state() == "closed":
                    result.closed_after = previous.at - start.at
        result.interval = Interval.between(start, previous)
        return result, previous, clock

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
        """What a client sees while the circuit is open: calls of our own."""
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
