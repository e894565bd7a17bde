"""The demo's clients: paced Catalog traffic from several threads, counted as a client sees it.

`Traffic` runs ``clients`` threads, each with its own thriftpy2 connection
(framed, binary) to one of the targets, making calls of the mix
(`sidecar.demo.call_mix`) at an even pace that adds up to ``rate`` calls per
second, and counts what comes back (`sidecar.demo.traffic_counts`).

Run alone, as docker-compose's traffic service does::

    python -m sidecar.demo.traffic --target sidecar:9090 --rate 50

Limits: thriftpy2's synchronous client, one call in flight per connection; the
pace is kept by each thread on its own (a slow answer delays that thread's
next calls, and a thread that falls more than a second behind skips ahead).
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import click
import thriftpy2.rpc
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import (
    TCyBufferedTransportFactory,
    TCyFramedTransportFactory,
    TTransportException,
)

from sidecar.config import split_address
from sidecar.demo.call_mix import WRITES, CatalogCalls
from sidecar.demo.traffic_counts import TrafficCounter, TrafficCounts, percentile
from sidecar.testing.catalog import load_catalog_idl

log = logging.getLogger("sidecar.demo.traffic")

# Seconds between attempts to (re)connect, doubling up to the maximum.
_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 1.0


class Traffic:
    """Paced Catalog calls from ``clients`` threads.

    Args:
        targets: ``host:port`` of the sidecar (or sidecars: threads take them in turn).
        clients: threads, each with one connection.
        rate: calls per second, all threads together.
        transport: ``"framed"`` or ``"buffered"``.
        timeout: seconds a call may take before the client gives up (a dropped call).
        seed: seed of the threads' random sources (None: different every run).
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        clients: int = 4,
        rate: float = 120.0,
        transport: str = "framed",
        timeout: float = 5.0,
        seed: int | None = None,
    ) -> None:
        if not targets:
            raise ValueError("at least one target is needed")
        if clients < 1 or rate <= 0:
            raise ValueError("clients and rate must be positive")
        self.targets = [split_address(t) for t in targets]
        self.clients = clients
        self.idl = load_catalog_idl()
        self._transport_factory = (
            TCyFramedTransportFactory() if transport == "framed" else TCyBufferedTransportFactory()
        )
        self._timeout_ms = int(timeout * 1000)
        self._interval = clients / rate
        self._seed = seed
        self._calls = CatalogCalls(self.idl)
        self._counter = TrafficCounter()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def set_rate(self, rate: float) -> None:
        """Change the total calls per second (takes effect from each thread's next call)."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = self.clients / rate

    def start(self) -> Traffic:
        """Start the client threads; returns self."""
        for i in range(self.clients):
            seed = None if self._seed is None else self._seed + i
            thread = threading.Thread(
                target=self._run, args=(i, random.Random(seed)), name=f"traffic-{i}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every thread (each finishes its call in flight); safe to call twice."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def snapshot(self) -> TrafficCounts:
        """The counts so far."""
        return self._counter.snapshot()

    def take_latencies(self) -> list[float]:
        """Seconds per answered call since the last time this was called."""
        return self._counter.take_latencies()

    def client(self, target: int = 0) -> Any:
        """A new connected thriftpy2 Catalog client (close it when done)."""
        host, port = self.targets[target % len(self.targets)]
        return thriftpy2.rpc.make_client(
            self.idl.Catalog,
            host,
            port,
            proto_factory=TCyBinaryProtocolFactory(),  # type: ignore[no-untyped-call]
            trans_factory=self._transport_factory,
            timeout=self._timeout_ms,
        )

    # the threads

    def _connect(self, index: int) -> Any | None:
        """A connection, retried with backoff until it works or traffic stops."""
        wait = _RECONNECT_MIN
        while not self._stop.is_set():
            try:
                return self.client(index)
            except (TTransportException, OSError):
                self._counter.add("connect_failures")
                self._stop.wait(wait)
                wait = min(_RECONNECT_MAX, wait * 2)
        return None

    def _run(self, index: int, rng: random.Random) -> None:
        customer = f"demo-client-{index}"
        client = None
        next_at = time.monotonic() + rng.uniform(0, self._interval)
        try:
            while not self._stop.is_set():
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
                next_at = max(next_at + self._interval, time.monotonic() - 1.0)
                if client is None:
                    client = self._connect(index)
                    if client is None:
                        break
                kind = self._calls.pick(rng)
                if not self._one_call(client, kind, rng, customer):
                    with contextlib.suppress(Exception):
                        client.close()
                    client = None
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()

    def _one_call(self, client: Any, kind: str, rng: random.Random, customer: str) -> bool:
        """Make one call and count it; False when the connection is gone."""
        call = self._calls.make(kind, rng, customer)
        method = kind.partition(":")[0]
        side = "writes" if method in WRITES else "reads"
        started = time.monotonic()
        try:
            call(client)
        except TApplicationException as exc:
            log.debug("call %s: %s", kind, exc.message or exc)
            self._counter.add("calls", side, f"{side[:-1]}_errors")
            return True
        except (self.idl.ItemNotFound, self.idl.InvalidOrder):
            latency = time.monotonic() - started
            self._counter.add("calls", side, "answered", latency=latency)
            return True
        except (TTransportException, TProtocolException, OSError) as exc:
            log.debug("call %s lost its connection: %s", kind, exc)
            self._counter.add("calls", side, "dropped")
            return False
        self._counter.add("calls", side, "answered", latency=time.monotonic() - started)
        return True


@click.command(
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Paced Catalog traffic (the demo's clients), with a summary line every "
    "--report-every seconds, until SIGTERM, SIGINT or --duration.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    required=True,
    metavar="HOST:PORT",
    help="The sidecar (or the Catalog service) to call; repeat for several.",
)
@click.option(
    "--clients", type=click.IntRange(min=1), default=4, show_default=True, help="Client threads."
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=50.0,
    show_default=True,
    help="Calls per second in all.",
)
@click.option(
    "--transport", type=click.Choice(["framed", "buffered"]), default="framed", show_default=True
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds to run; 0 runs until stopped.",
)
@click.option(
    "--report-every",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds between summary lines.",
)
def main(
    targets: Sequence[str],
    clients: int,
    rate: float,
    transport: str,
    duration: float,
    report_every: float,
) -> None:
    """Call until SIGTERM, SIGINT or ``duration``; a summary line every ``report_every`` s."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    traffic = Traffic(list(targets), clients=clients, rate=rate, transport=transport).start()
    log.info("calling %s: %d clients, %g calls/s", ", ".join(targets), clients, rate)
    end = time.monotonic() + duration if duration > 0 else float("inf")
    before = traffic.snapshot()
    try:
        while not stop.is_set() and time.monotonic() < end:
            stop.wait(min(report_every, max(0.0, end - time.monotonic())))
            now = traffic.snapshot()
            delta = now - before
            before = now
            p50 = percentile(traffic.take_latencies(), 0.5)
            log.info(
                "%d calls: %d answered, %d read errors, %d write errors, %d dropped%s",
                delta.calls,
                delta.answered,
                delta.read_errors,
                delta.write_errors,
                delta.dropped,
                f", p50 {p50 * 1000:.1f} ms" if p50 is not None else "",
            )
    finally:
        traffic.stop()


if __name__ == "__main__":
    main(prog_name="python -m sidecar.demo.traffic")
