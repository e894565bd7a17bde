"""The text around the demo's table: the banner before it, the summary and its checks after.

The summary states each phase's story in numbers (the clients' own counts and
the sidecar's ``/metrics``) and checks it: retries in the flaky phase, the
breaker opening and fallbacks served in the outage, the breaker closed at the
end, no dropped client connection, no order placed twice; with
``--overload``, calls shed, the upstream never given more than
``upstream.max_in_flight`` calls at once, the breaker left closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sidecar.demo.phases import OVERLOAD_SERVICE_TIME, DemoOptions, Phase
from sidecar.demo.printer import Printer
from sidecar.demo.readings import Interval
from sidecar.demo.traffic_counts import TrafficCounts


@dataclass
class PhaseResult:
    """How one phase went.

    Attributes:
        interval: the phase from its first snapshot to its last.
        opened: the breaker was seen open.
        closed_after: seconds into the phase when the breaker was seen closed again.
        after_close: the traffic from then on.
    """

    phase: Phase
    interval: Interval
    opened: bool = False
    closed_after: float | None = None
    after_close: TrafficCounts = field(default_factory=TrafficCounts)


@dataclass(frozen=True)
class Setup:
    """Where the demo's parts run, for the banner."""

    upstream: str
    faults: str
    listen: str
    admin_url: str
    sidecar_pid: int
    fail_max: int
    reset_timeout: float
    max_in_flight: int | None = None


def print_banner(p: Printer, o: DemoOptions, setup: Setup, phases: list[Phase]) -> None:
    """What runs where, and how to read the table."""
    p.line(
        p.style("thrift-sidecar demo", "1") + ": the example Catalog service behind the "
        "sidecar, with injected faults"
    )
    p.line()
    p.line(f"  upstream  the Catalog service (idl/example.thrift) on {setup.upstream}")
    if o.overload:
        p.line(
            f"            one call at a time, {OVERLOAD_SERVICE_TIME * 1000:g} ms each "
            f"(--overload); the sidecar lets {setup.max_in_flight} through at once"
        )
    p.line(f"  faults    a fault injector in front of it, on {setup.faults}")
    p.line(
        f"  sidecar   {setup.listen} (pid {setup.sidecar_pid}), config/demo.yaml's settings: "
        f"the breaker opens"
    )
    p.line(
        f"            after {setup.fail_max} failed calls and probes again after "
        f"{setup.reset_timeout:g}s"
    )
    p.line(
        f"  metrics   {p.style(setup.admin_url + '/metrics', '4')}   (also /state /healthz /readyz)"
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
    p.line("  from the cache and static, calls shed over the concurrency limit, breaker state,")
    p.line("  median latency.")


def print_summary(
    p: Printer,
    o: DemoOptions,
    results: list[PhaseResult],
    *,
    reached: int,
    placed: int,
    fail_max: int,
    max_in_flight: int | None = None,
    upstream_peak: int | None = None,
) -> list[str]:
    """Print the summary; returns what did not go as the story says.

    Args:
        reached: ``placeOrder`` calls the upstream executed.
        placed: distinct orders it placed.
        max_in_flight: the sidecar's ``upstream.max_in_flight``.
        upstream_peak: the most calls the upstream had at once (``--overload``).
    """
    by_name = {r.phase.name: r for r in results}
    failures: list[str] = []
    p.line()
    p.line(p.style("Summary", "1") + " (the clients' own counts, and the sidecar's /metrics)")
    for r in results:
        i, t = r.interval, r.interval.traffic
        latency = f", p50 {i.p50 * 1000:.2f} ms" if i.p50 is not None else ""
        if r.phase.crowd:
            text = (
                f"{t.calls:,} calls; the sidecar shed {i.shed:,.0f} at once ({i.cache:,.0f} "
                f"reads answered from the cache, {i.static:,.0f} with the static reply; "
                f"{t.read_errors} reads and {t.write_errors} writes got an error saying they "
                f"were shed); the upstream had at most "
                f"{upstream_peak} calls at once (upstream.max_in_flight {max_in_flight}); the "
                f"breaker was {'seen open' if r.opened else 'closed throughout'}; "
                f"{t.dropped} dropped connections{latency}."
            )
        elif r.phase.name == "healthy" or not o.faults:
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
    for r in results:
        total = total + r.interval.traffic
    p.paragraph(
        "overall   ",
        f"{total.calls:,} calls, {total.dropped} dropped connections; placeOrder reached "
        f"the upstream {reached:,} times for {placed:,} distinct orders (none twice).",
    )
    if total.dropped:
        failures.append(f"{total.dropped} client connections were dropped")
    if reached != placed:
        failures.append(f"an order reached the upstream twice ({reached} calls, {placed} orders)")
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
    elif any(r.interval.traffic.errors for r in results if not r.phase.crowd):
        failures.append("client-visible errors without injected faults")
    for r in results:
        if not r.phase.crowd:
            continue
        if r.interval.shed <= 0:
            failures.append("no call was shed in the overload phase")
        if r.opened:
            failures.append("the breaker opened in the overload phase (shed calls are no failures)")
        if max_in_flight is not None and (upstream_peak or 0) > max_in_flight:
            failures.append(
                f"the upstream had {upstream_peak} calls at once, over max_in_flight "
                f"{max_in_flight}"
            )
    return failures
