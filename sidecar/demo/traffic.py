"""The demo's clients: paced Catalog traffic from several threads, counted as a client sees it.

`Traffic` runs ``clients`` threads, each with its own thriftpy2 connection
(framed, binary) to one of the targets, making calls at an even pace that
adds up to ``rate`` calls per second. The mix (`MIX`) is what a shop's
front end might send: mostly reads of a small working set of items (so a
fallback cache warms up), a few "cold" reads of ids and limits never asked
before (so nothing is cached for them), pings, and 10% ``placeOrder`` writes.

What is counted (`TrafficCounts`) is only what the client can see: an
answer (a value, or a declared exception such as ``ItemNotFound``), a
``TApplicationException`` (the sidecar or the server said why it could not
answer), or a dropped connection (a transport error: the connection is gone
and is opened again). A client cannot tell a cached fallback from a fresh
answer; the sidecar's metrics can.

Run alone, as docker-compose's traffic service does::

    python -m sidecar.demo.traffic --target sidecar:9090 --rate 50

Limits: thriftpy2's synchronous client, one call in flight per connection; the
pace is kept by each thread on its own (a slow answer delays that thread's
next calls, and a thread that falls more than a second behind skips ahead).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import random
import signal
import statistics
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from types import FrameType, ModuleType
from typing import Any

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
from sidecar.demo.upstream import CATALOG_SIZE, load_catalog_idl

log = logging.getLogger("sidecar.demo.traffic")

# The call mix: (kind, share of calls). Hot reads use `HOT_IDS` and `HOT_LIMITS`;
# cold reads use ids and limits never asked before.
MIX: tuple[tuple[str, float], ...] = (
    ("getItem", 0.55),
    ("listItems", 0.20),
    ("ping", 0.05),
    ("getItem:cold", 0.05),
    ("listItems:cold", 0.05),
    ("placeOrder", 0.10),
)
WRITES = frozenset({"placeOrder"})
HOT_IDS = range(1, 41)
HOT_LIMITS = (5, 10, 20)
# Cold ids run through the catalog from here (hot ids are below it).
COLD_ID_START = 101
# Cold limits count up from here: listItems answers at most 100 items, but
# each limit is a different call, so a new limit is never in a cache.
COLD_LIMIT_START = 1000
# Latencies kept between two `Traffic.take_latencies` calls (oldest dropped).
MAX_LATENCIES = 50_000
# Seconds between attempts to (re)connect, doubling up to the maximum.
_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 1.0


@dataclass(frozen=True)
class TrafficCounts:
    """What the clients have seen so far (cumulative).

    Attributes:
        calls: calls made (answered or not).
        reads, writes: calls by kind (``placeOrder`` is the only write).
        answered: calls that got an answer: a value or a declared exception.
        declared: answers that were a declared exception (``ItemNotFound``...).
        read_errors, write_errors: calls answered with a ``TApplicationException``.
        dropped: calls that lost their connection (a transport or protocol error).
        connect_failures: attempts to open a connection that failed.
        last_error: the latest ``TApplicationException`` message per method.
    """

    calls: int = 0
    reads: int = 0
    writes: int = 0
    answered: int = 0
    declared: int = 0
    read_errors: int = 0
    write_errors: int = 0
    dropped: int = 0
    connect_failures: int = 0
    last_error: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Calls that got a ``TApplicationException`` instead of an answer."""
        return self.read_errors + self.write_errors

    def __sub__(self, other: TrafficCounts) -> TrafficCounts:
        """The counts between two snapshots (``last_error`` is the later one's)."""
        return self._combine(other, -1)

    def __add__(self, other: TrafficCounts) -> TrafficCounts:
        """The counts of two intervals together (``last_error`` is the second one's)."""
        return other._combine(self, 1)

    def _combine(self, other: TrafficCounts, sign: int) -> TrafficCounts:
        return TrafficCounts(
            **{name: getattr(self, name) + sign * getattr(other, name) for name in _NUMBERS},
            last_error=dict(self.last_error),
        )


_NUMBERS = tuple(f.name for f in fields(TrafficCounts) if f.name != "last_error")


class _Counter:
    """Thread-safe `TrafficCounts` under construction."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = TrafficCounts()
        self._values: dict[str, int] = {}
        self._last_error: dict[str, str] = {}
        self._latencies: deque[float] = deque(maxlen=MAX_LATENCIES)

    def add(self, *keys: str, latency: float | None = None) -> None:
        with self._lock:
            for key in keys:
                self._values[key] = self._values.get(key, 0) + 1
            if latency is not None:
                self._latencies.append(latency)

    def error(self, method: str, message: str) -> None:
        with self._lock:
            self._last_error[method] = message

    def snapshot(self) -> TrafficCounts:
        with self._lock:
            return replace(self._counts, **self._values, last_error=dict(self._last_error))

    def take_latencies(self) -> list[float]:
        with self._lock:
            taken = list(self._latencies)
            self._latencies.clear()
            return taken


class CatalogCalls:
    """Builds the calls of the mix; the cold-id and cold-limit sequences are shared."""

    def __init__(self, idl: ModuleType) -> None:
        self.idl = idl
        self._lock = threading.Lock()
        self._cold_ids = itertools.cycle(range(COLD_ID_START, CATALOG_SIZE + 1))
        self._cold_limits = itertools.count(COLD_LIMIT_START)
        self._kinds = [kind for kind, _ in MIX]
        self._weights = [share for _, share in MIX]

    def pick(self, rng: random.Random) -> str:
        """A call kind drawn from the mix."""
        return rng.choices(self._kinds, self._weights)[0]

    def make(self, kind: str, rng: random.Random, customer: str) -> Callable[[Any], Any]:
        """A function that makes one call of ``kind`` on a client."""
        idl = self.idl
        if kind == "getItem":
            item_id = rng.choice(HOT_IDS)
            return lambda client: client.getItem(item_id)
        if kind == "listItems":
            limit = rng.choice(HOT_LIMITS)
            return lambda client: client.listItems(limit)
        if kind == "ping":
            return lambda client: client.ping()
        if kind == "getItem:cold":
            with self._lock:
                cold_id = next(self._cold_ids)
            return lambda client: client.getItem(cold_id)
        if kind == "listItems:cold":
            with self._lock:
                cold_limit = next(self._cold_limits)
            return lambda client: client.listItems(cold_limit)
        if kind == "placeOrder":
            order = idl.Order(
                customer=customer,
                lines=[idl.OrderLine(itemId=rng.choice(HOT_IDS), quantity=rng.randint(1, 3))],
                idempotencyKey=uuid.UUID(int=rng.getrandbits(128)).hex,
            )
            return lambda client: client.placeOrder(order)
        raise ValueError(f"unknown call kind {kind!r}")


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
        self._counter = _Counter()
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

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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
            self._counter.add("calls", side, f"{side[:-1]}_errors")
            self._counter.error(method, exc.message or str(exc))
            return True
        except (self.idl.ItemNotFound, self.idl.InvalidOrder):
            latency = time.monotonic() - started
            self._counter.add("calls", side, "answered", "declared", latency=latency)
            return True
        except (TTransportException, TProtocolException, OSError) as exc:
            log.debug("call %s lost its connection: %s", kind, exc)
            self._counter.add("calls", side, "dropped")
            return False
        self._counter.add("calls", side, "answered", latency=time.monotonic() - started)
        return True


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values``, or None when there are none."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, round(q * 100) - 1)]


def main(argv: list[str] | None = None) -> int:
    """``python -m sidecar.demo.traffic``: call until SIGTERM, SIGINT or --duration."""
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo.traffic",
        description="Paced Catalog traffic (the demo's clients), with a summary line "
        "every --report-every seconds.",
    )
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="HOST:PORT",
        help="the sidecar (or the Catalog service) to call; repeat for several",
    )
    parser.add_argument("--clients", type=int, default=4, help="client threads (default 4)")
    parser.add_argument(
        "--rate", type=float, default=50.0, help="calls per second in all (default 50)"
    )
    parser.add_argument("--transport", choices=("framed", "buffered"), default="framed")
    parser.add_argument(
        "--duration", type=float, default=0.0, help="seconds to run; 0 runs until stopped"
    )
    parser.add_argument(
        "--report-every", type=float, default=10.0, help="seconds between summary lines"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    traffic = Traffic(
        args.target, clients=args.clients, rate=args.rate, transport=args.transport
    ).start()
    log.info("calling %s: %d clients, %g calls/s", ", ".join(args.target), args.clients, args.rate)
    started = time.monotonic()
    end = started + args.duration if args.duration > 0 else float("inf")
    before = traffic.snapshot()
    try:
        while not stop.is_set() and time.monotonic() < end:
            stop.wait(min(args.report_every, max(0.0, end - time.monotonic())))
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
