"""What the Interop and Echo services do, written once for both servers.

thriftpy2 and the Apache generated processors both call the handler's methods
with positional arguments in IDL order, and both libraries' classes take
keyword arguments, so one handler class serves both: it is given the
namespace to build its return values and exceptions from (the thriftpy2
module, or the Apache ``ttypes`` module).

Every method execution is counted in `ServerState.calls` before the method
does anything (so a call that raises is counted too): Interop methods under
their bare name, Echo methods under ``"Echo:<name>"``. An optional
`ServerState.hook` runs next, for tests that inject faults.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from sidecar.testing.call_counter import CallCounter
from tests.support.idl import load_thriftpy2_interop

_IDL = load_thriftpy2_interop()
BUSY_ITEM_ID: int = _IDL.BUSY_ITEM_ID
# Caps that keep a hostile or mistaken argument from hanging a test run.
MAX_SLEEP_MS = 60_000
MAX_LIST_ITEMS = 1000


class ServerState:
    """What one server's handlers share: counters, notifications, the stop signal.

    Attributes:
        calls: executions per method.
        stopping: set when the server stops; interrupts ``sleepMs``.
        hook: when set, called as ``hook(counted_name)`` at the start of every
            method, after counting. Whatever it raises is what the method
            raises (a declared exception instance becomes a declared exception
            reply, anything else an INTERNAL_ERROR); it may also sleep.
    """

    def __init__(self) -> None:
        self.calls = CallCounter()
        self.stopping = threading.Event()
        self.hook: Callable[[str], None] | None = None
        self._lock = threading.Lock()
        self._notifications: list[str] = []
        self._last_order_id = 0

    def enter(self, name: str) -> None:
        """Count one execution of ``name`` and run the hook."""
        self.calls.increment(name)
        hook = self.hook
        if hook is not None:
            hook(name)

    def add_notification(self, tag: str) -> None:
        with self._lock:
            self._notifications.append(tag)

    @property
    def notifications(self) -> list[str]:
        """Tags received by ``notify``, oldest first (a copy)."""
        with self._lock:
            return list(self._notifications)

    def next_order_id(self) -> int:
        with self._lock:
            self._last_order_id += 1
            return self._last_order_id


def item_price(item_id: int) -> float:
    """The price getItem reports for an id."""
    return item_id * 1.5


class InteropHandler:
    """The Interop service.

    Args:
        state: counters and notifications of the server.
        ns: namespace of the generated classes (thriftpy2 module or Apache ttypes).
    """

    def __init__(self, state: ServerState, ns: Any) -> None:
        self._state = state
        self._ns = ns

    def ping(self) -> None:
        self._state.enter("ping")

    def echoAll(self, v: Any) -> Any:
        self._state.enter("echoAll")
        return v

    def echoBinary(self, data: bytes) -> bytes:
        self._state.enter("echoBinary")
        return data

    def _item(self, item_id: int) -> Any:
        ns = self._ns
        return ns.Item(
            id=item_id,
            name=f"item-{item_id}",
            price=item_price(item_id),
            tags={"even" if item_id % 2 == 0 else "odd"},
            attributes={"id": str(item_id)},
            status=ns.Status.AVAILABLE,
            description=f"the item numbered {item_id}" if item_id % 2 == 0 else None,
        )

    def getItem(self, id: int) -> Any:
        self._state.enter("getItem")
        if id < 0:
            raise self._ns.NotFound(id=id, message=f"no item {id}")
        if id == BUSY_ITEM_ID:
            raise self._ns.ServiceBusy(message="busy, try later", retryAfterMs=50)
        return self._item(id)

    def listItems(self, limit: int) -> list[Any]:
        self._state.enter("listItems")
        return [self._item(i) for i in range(1, min(limit, MAX_LIST_ITEMS) + 1)]

    def placeOrder(self, order: Any) -> Any:
        self._state.enter("placeOrder")
        lines = order.lines or []
        if not lines:
            raise self._ns.InvalidOrder(reason="an order needs at least one line")
        if any((line.quantity or 0) < 1 for line in lines):
            raise self._ns.InvalidOrder(reason="quantity below 1")
        return self._ns.OrderReceipt(
            orderId=self._state.next_order_id(),
            customer=order.customer,
            total=sum(line.quantity * item_price(line.itemId) for line in lines),
            itemCount=sum(line.quantity for line in lines),
        )

    def notify(self, tag: str) -> None:
        self._state.enter("notify")
        self._state.add_notification(tag)

    def notifications(self) -> list[str]:
        self._state.enter("notifications")
        return self._state.notifications

    def crash(self) -> None:
        self._state.enter("crash")
        raise RuntimeError("crash() called: an error the IDL does not declare")

    def sleepMs(self, ms: int) -> int:
        self._state.enter("sleepMs")
        self._state.stopping.wait(max(0, min(ms, MAX_SLEEP_MS)) / 1000)
        return ms

    def callCount(self, method: str) -> int:
        self._state.enter("callCount")
        return self._state.calls[method]

    def add(self, a: int, b: int) -> int:
        self._state.enter("add")
        return a + b

    def serviceName(self) -> str:
        self._state.enter("serviceName")
        return "Interop"


class EchoHandler:
    """The Echo service (counted under ``"Echo:<name>"``)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def ping(self) -> None:
        self._state.enter("Echo:ping")

    def echo(self, message: str) -> str:
        self._state.enter("Echo:echo")
        return message

    def serviceName(self) -> str:
        self._state.enter("Echo:serviceName")
        return "Echo"
