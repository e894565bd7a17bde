"""A well-behaved client that writes: ``placeOrder`` calls, each with a customer of its own.

`OrderClient` is a `tests.fuzz.good_client.GoodClient` whose calls are
``placeOrder``: same connections, same checks (seqid, name, value), same
counts of drops, hangs and wrong replies. Each order names a fresh customer
(``<client>-<n>``); a receipt is right when it names that customer and the
item count and total of that order, and its customer is then kept in
``receipts``. The upstream writes down what it executed
(`tests.soak.upstream_process`): a customer executed twice is a write the
sidecar sent twice; a receipt without an execution is a reply that was made up.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Any

from tests.fuzz.good_client import GoodClient
from tests.support.handler import item_price
from tests.support.idl import load_thriftpy2_interop

_IDL = load_thriftpy2_interop()


class ExpectedReceipt(_IDL.OrderReceipt):  # type: ignore[misc,name-defined]
    """What a receipt must say; compares equal to a right one, and notes it.

    A subclass of the receipt class, so that ``receipt == expected`` asks this
    class's ``__eq__`` first (the order id is the server's, not known ahead).
    """

    def __init__(self, customer: str, item_count: int, total: float, seen: OrderClient) -> None:
        super().__init__(customer=customer, itemCount=item_count, total=total)
        self._seen = seen

    def __eq__(self, other: object) -> bool:
        right = (
            getattr(other, "customer", None) == self.customer
            and getattr(other, "itemCount", None) == self.itemCount
            and getattr(other, "total", None) == self.total
            and isinstance(getattr(other, "orderId", None), int)
        )
        if right:
            self._seen.add_receipt(self.customer)
        return right

    __hash__ = None  # type: ignore[assignment]


class OrderClient(GoodClient):
    """``placeOrder`` calls on each connection, one after the other (see `GoodClient`).

    Args:
        name: prefix of the customers (unique per client in a run).
        (the rest: as `GoodClient`)
    """

    def __init__(self, address: str, *args: Any, name: str, **kwargs: Any) -> None:
        super().__init__(address, *args, **kwargs)
        self.name = name
        self.receipts: set[str] = set()
        self._numbers = itertools.count(1)
        self._receipts_lock = threading.Lock()

    def add_receipt(self, customer: str) -> None:
        with self._receipts_lock:
            self.receipts.add(customer)

    def _pick(self, rng: random.Random) -> tuple[str, dict[str, Any], Any]:
        customer = f"{self.name}-{next(self._numbers)}"
        item_id, quantity = rng.randrange(1, 500), rng.randrange(1, 5)
        order = _IDL.Order(
            customer=customer, lines=[_IDL.OrderLine(itemId=item_id, quantity=quantity)]
        )
        expected = ExpectedReceipt(customer, quantity, quantity * item_price(item_id), self)
        return "placeOrder", {"order": order}, expected
