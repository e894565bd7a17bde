"""The example Catalog service (``idl/example.thrift``) on thriftpy2: the demo's upstream.

A small shop catalog that answers like a real service: ``getItem`` and
``listItems`` read a fixed catalog of `CATALOG_SIZE` items, ``placeOrder``
checks an order and returns a receipt (an order sent again with the same
``idempotencyKey`` gets the first receipt back), ``ping`` answers. Unknown
ids raise the declared ``ItemNotFound``, bad orders ``InvalidOrder``.

`CatalogServer` serves it over TCP, framed or buffered binary protocol, one
thread per connection (`sidecar.testing.thrift_server`). It counts what it
executed (`CatalogServer.calls`), so a demo or a test can show that an order
lost to a reset was not placed twice.

With ``service_time``, one worker serves every call in turn
(`sidecar.testing.capacity.OneWorker`): an upstream with a fixed capacity,
whose latency grows with the calls it is given at once.

Limits: the IDL is the packaged copy (``sidecar/testing/example.thrift``); one
call at a time per connection; not built for throughput.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import itertools
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import thriftpy2
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TProcessor
from thriftpy2.transport import TCyBufferedTransportFactory, TCyFramedTransportFactory, TSocket

from sidecar.testing.call_counter import CallCounter
from sidecar.testing.capacity import OneWorker, WorkerHandler
from sidecar.testing.thrift_server import ThreadedServer

# Items with ids 1..CATALOG_SIZE exist; any other id is ItemNotFound.
CATALOG_SIZE = 1000
# listItems returns at most this many items, whatever the limit asked.
MAX_LIST = 100
# Receipts remembered for idempotency keys (oldest forgotten first).
MAX_REMEMBERED_ORDERS = 10_000
# Seconds an idle client connection is kept open.
IDLE_TIMEOUT = 300.0

_ADJECTIVES = ("Walnut", "Enamel", "Linen", "Copper", "Stoneware", "Cork", "Brass", "Oak")
_NOUNS = ("espresso cup", "teapot", "tea towel", "kettle", "serving bowl", "coaster", "tray")
_TAGS = ("kitchen", "gift", "bestseller", "handmade", "new")


@contextlib.contextmanager
def example_idl_path() -> Iterator[Path]:
    """A filesystem path of the packaged ``example.thrift``, valid inside the block."""
    resource = importlib.resources.files("sidecar.testing").joinpath("example.thrift")
    with importlib.resources.as_file(resource) as path:
        yield Path(path)


@functools.cache
def load_catalog_idl() -> ModuleType:
    """The thriftpy2 module of the packaged ``example.thrift`` (loaded once per process)."""
    with example_idl_path() as path:
        return thriftpy2.load(str(path), module_name="sidecar_example_thrift")


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


class CatalogHandler:
    """What the Catalog service does; thriftpy2 calls these with positional arguments.

    Every execution is counted in `calls` under the method's name; an order
    really placed (not a repeat of a known ``idempotencyKey``) also under
    ``placeOrder:placed``.
    """

    def __init__(self, idl: ModuleType | None = None) -> None:
        self.idl = idl or load_catalog_idl()
        self.calls = CallCounter()
        self._lock = threading.Lock()
        self._order_ids = itertools.count(1)
        self._receipts: OrderedDict[str, Any] = OrderedDict()
        self._items = {i: make_item(self.idl, i) for i in range(1, CATALOG_SIZE + 1)}

    def ping(self) -> None:
        self.calls.increment("ping")

    def getItem(self, item_id: int) -> Any:
        self.calls.increment("getItem")
        item = self._items.get(item_id)
        if item is None:
            raise self.idl.ItemNotFound(id=item_id, message=f"no item has id {item_id}")
        return item

    def listItems(self, limit: int) -> list[Any]:
        self.calls.increment("listItems")
        count = max(0, min(limit, MAX_LIST))
        return [self._items[i] for i in range(1, count + 1)]

    def placeOrder(self, order: Any) -> Any:
        self.calls.increment("placeOrder")
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
        self.calls.increment("placeOrder:placed")
        return receipt


class CatalogServer(ThreadedServer):
    """The Catalog service on a TCP port (see `ThreadedServer` for the life cycle).

    Args:
        host: where to listen.
        port: 0 for any free port.
        transport: ``"framed"`` or ``"buffered"``.
        service_time: None (each call on its own thread, at once), or the
            seconds one worker spends on each call, serving them in turn.

    Attributes:
        worker: the `OneWorker`, with ``service_time``.
    """

    name = "catalog"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: Literal["framed", "buffered"] | str = "framed",
        service_time: float | None = None,
    ) -> None:
        if transport not in ("framed", "buffered"):
            raise ValueError(f"transport must be framed or buffered, not {transport!r}")
        super().__init__(host=host, port=port, idle_timeout=IDLE_TIMEOUT)
        self.transport = transport
        self.handler = CatalogHandler()
        self.worker = OneWorker(service_time) if service_time is not None else None
        handler: Any = self.handler
        if self.worker is not None:
            handler = WorkerHandler(handler, self.worker)
        self._processor = TProcessor(self.handler.idl.Catalog, handler)
        self._transports = (
            TCyFramedTransportFactory() if transport == "framed" else TCyBufferedTransportFactory()
        )
        self._protocols: Any = TCyBinaryProtocolFactory()  # type: ignore[no-untyped-call]

    @property
    def calls(self) -> CallCounter:
        """Executions per method (``placeOrder:placed`` counts orders really placed)."""
        return self.handler.calls

    def start(self) -> CatalogServer:
        super().start()
        return self

    def __enter__(self) -> CatalogServer:
        super().__enter__()
        return self

    def _serve_connection(self, sock: socket.socket) -> None:
        trans = self._transports.get_transport(TSocket(sock=sock))  # type: ignore[no-untyped-call]
        proto = self._protocols.get_protocol(trans)
        while not self._closing.is_set():
            self._processor.process(proto, proto)
