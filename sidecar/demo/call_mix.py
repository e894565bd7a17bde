"""The calls the demo's clients make: a shop front end's mix of Catalog calls.

Mostly reads of a small working set of items (so a fallback cache warms up),
a few "cold" reads of ids and limits never asked before (so nothing is cached
for them), pings, and 10% ``placeOrder`` writes.
"""

from __future__ import annotations

import itertools
import random
import threading
import uuid
from collections.abc import Callable
from types import ModuleType
from typing import Any

from sidecar.testing.catalog import CATALOG_SIZE

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
