"""``sidecar demo`` and ``sidecar top``: commands that show the sidecar at work rather than run it.

Each imports its package (`sidecar.demo`, `sidecar.top`) only when it runs,
so that ``sidecar run`` loads neither.
"""

from __future__ import annotations

import sys

import click


@click.command(short_help="Watch retries, the breaker and fallbacks at work, in under a minute.")
@click.option(
    "--duration",
    type=click.FloatRange(min=12),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Total length of the four phases (they scale with it; at least 12).",
)
@click.option(
    "--keep-running",
    is_flag=True,
    help="After the phases, keep the upstream, the sidecar and light traffic up until Ctrl-C.",
)
@click.option("--no-faults", is_flag=True, help="Inject no faults: every phase is healthy.")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="The sidecar's Thrift port on 127.0.0.1. [default: a free port]",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    help="The sidecar's admin port (/metrics) on 127.0.0.1. [default: a free port]",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=1, max=5000),
    default=120.0,
    show_default=True,
    help="Calls per second from all the demo's clients together.",
)
@click.option(
    "--overload",
    is_flag=True,
    help="The upstream serves one call at a time, and a fifth phase (8s) overloads it with "
    "more clients: the sidecar sheds the calls over upstream.max_in_flight.",
)
def demo(
    duration: float,
    keep_running: bool,
    no_faults: bool,
    port: int | None,
    metrics_port: int | None,
    rate: float,
    overload: bool,
) -> None:
    """Run the example Catalog service behind the sidecar, with injected faults.

    Starts the example upstream (idl/example.thrift), a fault injector in
    front of it, the sidecar with the demo settings (config/demo.yaml) and
    client threads, all on 127.0.0.1, then walks through four phases:
    healthy, flaky (retries absorb resets), outage (the breaker opens, cached
    and static fallbacks are served) and recovery (a half-open probe closes
    the breaker). Prints a table per second from the clients' counts and the
    sidecar's /metrics, then a summary. With --overload, a fifth phase
    overloads an upstream of fixed capacity and the sidecar sheds the calls
    over upstream.max_in_flight. Exit status 0 when every phase went as
    described, 1 when not, 2 when the demo could not start.
    """
    from sidecar.demo.phases import DemoOptions
    from sidecar.demo.runner import run_demo

    options = DemoOptions(
        duration=duration,
        keep_running=keep_running,
        faults=not no_faults,
        port=port,
        metrics_port=metrics_port,
        rate=rate,
        overload=overload,
    )
    sys.exit(run_demo(options))


@click.command(short_help="A live view of a running sidecar: calls, latency, breakers.")
@click.option(
    "--admin",
    metavar="URL",
    help="The sidecar's admin endpoint, http://HOST:PORT or HOST:PORT. [default: from "
    "SIDECAR_METRICS_LISTEN, else 127.0.0.1:9464]",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between two readings; the rates are over this interval.",
)
@click.option("--once", is_flag=True, help="Read twice, one interval apart, print one frame, exit.")
def top(admin: str | None, interval: float, once: bool) -> None:
    """Watch a running sidecar: per-method calls/s, success, errors/s, retries/s,
    fallbacks/s, p50 and p99 latency, breaker state and ejected upstream addresses.

    Reads /metrics and /state of the admin endpoint every interval; the rates and
    quantiles are over the interval between two readings. Ctrl-C exits (status 0).
    With --once, prints one frame and exits: 0, or 1 when the endpoint cannot be read.
    """
    from sidecar.top import live

    url = live.admin_url(admin) if admin else live.default_admin()
    show = live.once if once else live.watch
    sys.exit(show(url, interval, sys.stdout))
