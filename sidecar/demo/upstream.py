"""The demo's upstream: the example Catalog service (``idl/example.thrift``) on thriftpy2.

A small shop catalog that answers like a real service: ``getItem`` and
``listItems`` read a fixed catalog of `CATALOG_SIZE` items, ``placeOrder``
checks an order and returns a receipt (an order sent again with the same
``idempotencyKey`` gets the first receipt back), ``ping`` answers. Unknown
ids raise the declared ``ItemNotFound``, bad orders ``InvalidOrder``.

`CatalogServer` serves it over TCP, framed or buffered binary protocol, one
thread per connection, and can be stopped (thriftpy2's own servers cannot).
It counts what it executed (`CatalogServer.calls`), so a demo can show that
an order lost to a reset was not placed twice.

Run alone: ``python -m sidecar.demo.upstream --port 9091`` (what
docker-compose runs). ``--faults cycle`` puts a `FaultProxy` on the public
port and the service behind it on a private one, and cycles through healthy,
flaky and down phases forever, so a dashboard has something to show.

Limits: the IDL is the packaged copy (``sidecar/demo/example.thrift``); one
call at a time per connection; not built for throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.resources
import itertools
import logging
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import thriftpy2
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TProcessor
from thriftpy2.transport import (
    TCyBufferedTransportFactory,
    TCyFramedTransportFactory,
    TSocket,
    TTransportException,
)

log = logging.getLogger("sidecar.demo.upstream")

# Items with ids 1..CATALOG_SIZE exist; any other id is ItemNotFound.
CATALOG_SIZE = 1000
# listItems returns at most this many items, whatever the limit asked.
MAX_LIST = 100
# Receipts remembered for idempotency keys (oldest forgotten first).
MAX_REMEMBERED_ORDERS = 10_000
# How long the accept loop blocks before it looks at the stop flag again.
_ACCEPT_POLL_SECONDS = 0.2
# Seconds an idle client connection is kept open.
_IDLE_TIMEOUT = 300.0

_ADJECTIVES = ("Walnut", "Enamel", "Linen", "Copper", "Stoneware", "Cork", "Brass", "Oak")
_NOUNS = ("espresso cup", "teapot", "tea towel", "kettle", "serving bowl", "coaster", "tray")
_TAGS = ("kitchen", "gift", "bestseller", "handmade", "new")


@contextlib.contextmanager
def example_idl_path() -> Iterator[Path]:
    """A filesystem path of the packaged ``example.thrift``, valid inside the block."""
    resource = importlib.resources.files("sidecar.demo").joinpath("example.thrift")
    with importlib.resources.as_file(resource) as path:
        yield Path(path)


@functools.cache
def load_catalog_idl() -> ModuleType:
    """The thriftpy2 module of the packaged ``example.thrift`` (loaded once per process)."""
    with example_idl_path() as path:
        return thriftpy2.load(str(path), module_name="sidecar_demo_example_thrift")


def make_item(idl: ModuleType, item_id: int) -> Any:
    """The catalog's item ``item_id`` (1..CATALOG_SIZE), always the same for the same id."""
    adjective = _ADJECTIVES[item_id % len(_ADJECTIVES)]
    noun = _NOUNS[(item_id // len(_ADJECTIVES)) % len(_NOUNS)]
    if item_id % 50 == 0:
        status = idl.ItemStatus.DISCONTINUED
    elif item_id % 17 == 0:
        status = idl.ItemStatus.OUT_OF_STOCK
    else:
        status = idl.ItemStatus.IN_STOCK
    tags = [_TAGS[item_id % len(_TAGS)]]
    if item_id % 3 == 0:
        tags.append(_TAGS[(item_id + 1) % len(_TAGS)])
    return idl.Item(
        id=item_id,
        name=f"{adjective} {noun} no. {item_id}",
        priceCents=199 + (item_id * 37) % 5000,
        status=status,
        tags=tags,
        description=f"Item {item_id} of the demo catalog." if item_id % 4 == 0 else None,
    )


class CallCounter:
    """Thread-safe executions per method."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, method: str) -> None:
        with self._lock:
            self._counts[method] = self._counts.get(method, 0) + 1

    def __getitem__(self, method: str) -> int:
        with self._lock:
            return self._counts.get(method, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class CatalogHandler:
    """What the Catalog service does; thriftpy2 calls these with positional arguments."""

    def __init__(self, idl: ModuleType | None = None) -> None:
        self.idl = idl or load_catalog_idl()
        self.calls = CallCounter()
        self._lock = threading.Lock()
        self._order_ids = itertools.count(1)
        self._receipts: OrderedDict[str, Any] = OrderedDict()
        self._items = {i: make_item(self.idl, i) for i in range(1, CATALOG_SIZE + 1)}

    def ping(self) -> None:
        self.calls.add("ping")

    def getItem(self, item_id: int) -> Any:
        self.calls.add("getItem")
        item = self._items.get(item_id)
        if item is None:
            raise self.idl.ItemNotFound(id=item_id, message=f"no item has id {item_id}")
        return item

    def listItems(self, limit: int) -> list[Any]:
        self.calls.add("listItems")
        count = max(0, min(limit, MAX_LIST))
        return [self._items[i] for i in range(1, count + 1)]

    def placeOrder(self, order: Any) -> Any:
        self.calls.add("placeOrder")
        if not order.lines:
            raise self.idl.InvalidOrder(reason="an order needs at least one line")
        total = 0
        for line in order.lines:
            if line.quantity is None or line.quantity < 1:
                raise self.idl.InvalidOrder(reason=f"quantity {line.quantity} is below 1")
            item = self._items.get(line.itemId)
            if item is None:
                raise self.idl.ItemNotFound(id=line.itemId, message=f"no item has id {line.itemId}")
            total += item.priceCents * line.quantity
        key = order.idempotencyKey
        with self._lock:
            if key is not None and key in self._receipts:
                self._receipts.move_to_end(key)
                return self._receipts[key]
            receipt = self.idl.Receipt(
                orderId=next(self._order_ids),
                totalCents=total,
                placedAtMs=int(time.time() * 1000),
            )
            if key is not None:
                self._receipts[key] = receipt
                while len(self._receipts) > MAX_REMEMBERED_ORDERS:
                    self._receipts.popitem(last=False)
        self.calls.add("placeOrder:placed")
        return receipt


class CatalogServer:
    """The Catalog service on a TCP port, one thread per connection.

    Use as a context manager, or `start()` and `stop()`.

    Args:
        host: where to listen.
        port: 0 for any free port.
        transport: ``"framed"`` or ``"buffered"``.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, transport: str = "framed") -> None:
        if transport not in ("framed", "buffered"):
            raise ValueError(f"transport must be framed or buffered, not {transport!r}")
        self.host = host
        self.transport = transport
        self.handler = CatalogHandler()
        self._processor = TProcessor(self.handler.idl.Catalog, self.handler)
        self._transports = (
            TCyFramedTransportFactory() if transport == "framed" else TCyBufferedTransportFactory()
        )
        self._protocols: Any = TCyBinaryProtocolFactory()  # type: ignore[no-untyped-call]
        self._requested_port = port
        self._port = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("server not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` (the loopback address when listening on every interface)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"{host}:{self.port}"

    @property
    def calls(self) -> CallCounter:
        """Executions per method (``placeOrder:placed`` counts orders really placed)."""
        return self.handler.calls

    def start(self) -> CatalogServer:
        """Listen and start accepting; returns self."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        listener = socket.create_server((self.host, self._requested_port), backlog=128)
        listener.settimeout(_ACCEPT_POLL_SECONDS)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"catalog-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, wait for the threads; safe to call twice."""
        deadline = time.monotonic() + timeout
        self._stopping.set()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._accept_thread is not None:
            threads.append(self._accept_thread)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> CatalogServer:
        if self._listener is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    log.warning("catalog server: accept failed: %s", exc)
                    return
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.settimeout(_IDLE_TIMEOUT)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name="catalog-conn", daemon=True
                )
                with self._lock:
                    self._conns.add(conn)
                    self._threads.add(thread)
                thread.start()
        finally:
            listener.close()

    def _serve(self, conn: socket.socket) -> None:
        sock = TSocket(sock=conn)  # type: ignore[no-untyped-call]
        trans = self._transports.get_transport(sock)
        proto = self._protocols.get_protocol(trans)
        try:
            while not self._stopping.is_set():
                self._processor.process(proto, proto)
        except (TTransportException, OSError):
            pass  # the client went away
        except Exception:
            log.exception("catalog server: a connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                conn.close()


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


def _run_fault_cycle(
    public_host: str, public_port: int, upstream: str, stop: threading.Event
) -> None:
    """Run a FaultProxy on the public port and cycle `FAULT_CYCLE` until ``stop``."""
    from sidecar.demo.faults import FaultPlan, FaultProxyThread

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


def main(argv: list[str] | None = None) -> int:
    """``python -m sidecar.demo.upstream``: serve the Catalog until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo.upstream",
        description="The example Catalog service of thrift-sidecar's demo (binary protocol).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9091, help="port to listen on (default 9091)")
    parser.add_argument("--transport", choices=("framed", "buffered"), default="framed")
    parser.add_argument(
        "--faults",
        choices=("none", "cycle"),
        default="none",
        help="cycle: misbehave on a schedule (healthy 60s, flaky 30s, healthy 30s, down 20s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if args.faults == "none":
        with CatalogServer(args.host, args.port, args.transport) as server:
            log.info("Catalog service on %s:%d (%s)", args.host, server.port, args.transport)
            stop.wait()
        return 0
    if args.transport != "framed":
        parser.error("--faults cycle needs --transport framed")
    with CatalogServer("127.0.0.1", 0, args.transport) as server:
        log.info(
            "Catalog service on %s:%d behind a fault injector (real service on %s)",
            args.host,
            args.port,
            server.address,
        )
        _run_fault_cycle(args.host, args.port, server.address, stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
