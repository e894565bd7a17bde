"""``python -m sidecar.testing.upstream``: the example Catalog service as a program.

What docker-compose and the Kubernetes example run. ``--faults cycle`` puts a
`FaultProxy` on the public port and the service behind it on a private one,
and cycles through healthy, flaky and down phases (`FAULT_CYCLE`) until
stopped, so a dashboard has something to show. SIGTERM or SIGINT stops it
(exit status 0).
"""

from __future__ import annotations

import itertools
import logging
import signal
import threading
from types import FrameType

import click

from sidecar.testing.catalog import CatalogServer
from sidecar.testing.faults import FaultPlan, FaultProxyThread

log = logging.getLogger("sidecar.testing.upstream")

# A flaky upstream: the share of calls whose connection is reset before the
# call reaches the service (not executed) or after (executed, reply lost).
FLAKY_RATES: dict[str, float] = {"reset_before": 0.08, "reset_after": 0.06}

# --faults cycle: what the upstream does, phase after phase, forever.
# (name, seconds, call fault rates or None for down)
FAULT_CYCLE: tuple[tuple[str, float, dict[str, float] | None], ...] = (
    ("healthy", 60.0, {}),
    ("flaky", 30.0, FLAKY_RATES),
    ("healthy", 30.0, {}),
    ("down", 20.0, None),
)


def run_fault_cycle(
    public_host: str, public_port: int, upstream: str, stop: threading.Event
) -> None:
    """Run a FaultProxy on the public port and cycle `FAULT_CYCLE` until ``stop``."""
    plan = FaultPlan(seed=None)
    proxy = FaultProxyThread(upstream, "framed", plan, host=public_host, port=public_port)
    proxy.start()
    try:
        for name, seconds, rates in itertools.cycle(FAULT_CYCLE):
            log.info("fault cycle: %s for %gs", name, seconds)
            proxy.set_down(rates is None)
            proxy.plan.set_rates(rates or {})
            if stop.wait(seconds):
                return
    finally:
        proxy.stop()


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (handlers installed for the rest of the process)."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="The example Catalog service of thrift-sidecar's demo (binary protocol).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=9091, show_default=True, help="Port."
)
@click.option(
    "--transport", type=click.Choice(["framed", "buffered"]), default="framed", show_default=True
)
@click.option(
    "--faults",
    type=click.Choice(["none", "cycle"]),
    default="none",
    show_default=True,
    help="cycle: misbehave on a schedule (healthy 60s, flaky 30s, healthy 30s, down 20s).",
)
@click.option(
    "--service-time",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Milliseconds one worker spends on each call, serving calls in turn: an upstream "
    "whose latency grows with load (default: every call at once, no wait).",
)
def main(host: str, port: int, transport: str, faults: str, service_time: float | None) -> None:
    """Serve the Catalog until SIGTERM or SIGINT."""
    if faults == "cycle" and transport != "framed":
        raise click.UsageError("--faults cycle needs --transport framed")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = stop_event_on_signals()
    seconds = service_time / 1000 if service_time is not None else None
    if faults == "none":
        with CatalogServer(host, port, transport, service_time=seconds) as server:
            log.info("Catalog service on %s:%d (%s)", host, server.port, transport)
            stop.wait()
        return
    with CatalogServer("127.0.0.1", 0, transport, service_time=seconds) as server:
        log.info(
            "Catalog service on %s:%d behind a fault injector (real service on %s)",
            host,
            port,
            server.address,
        )
        run_fault_cycle(host, port, server.address, stop)


if __name__ == "__main__":
    main(prog_name="python -m sidecar.testing.upstream")
