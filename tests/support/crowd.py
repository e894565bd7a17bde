"""Many Catalog clients at once, each making calls back to back: a crowd that overloads.

`crowd` starts ``clients`` threads, each with its own framed binary
connection, lets them go together (a barrier), and has each make ``calls``
calls in a row (or as many as it can in ``seconds``), recording what came
back and how long it took (`Answer`). Bounded: ``calls`` per thread, a
client timeout per call, one join deadline for all.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import thriftpy2.rpc
from thriftpy2.protocol import TCyBinaryProtocolFactory
from thriftpy2.thrift import TApplicationException
from thriftpy2.transport import TCyFramedTransportFactory

from sidecar.config import split_address
from sidecar.testing.catalog import load_catalog_idl

# Seconds a client waits for one reply before it counts the call as lost.
CLIENT_TIMEOUT = 20.0


@dataclass(frozen=True)
class Answer:
    """One call as its client saw it: ``ok`` or ``error`` (a TApplicationException)."""

    kind: str
    seconds: float
    message: str = ""
    exc_type: int | None = None


def catalog_client(address: str, timeout: float = CLIENT_TIMEOUT) -> Any:
    """A connected thriftpy2 Catalog client (framed, binary); close it when done."""
    host, port = split_address(address)
    return thriftpy2.rpc.make_client(
        load_catalog_idl().Catalog,
        host,
        port,
        proto_factory=TCyBinaryProtocolFactory(),  # type: ignore[no-untyped-call]
        trans_factory=TCyFramedTransportFactory(),
        timeout=int(timeout * 1000),
    )


def crowd(
    address: str,
    *,
    clients: int,
    calls: int,
    call: Callable[[Any, int], Any],
    seconds: float | None = None,
    timeout: float = 120.0,
) -> list[Answer]:
    """``clients`` threads make ``calls`` calls each, all starting together.

    Args:
        address: where the clients connect (a sidecar).
        call: makes one call on a client; gets the client and the call's
            number (unique across threads).
        seconds: if given, each thread stops calling once this many seconds
            have passed since the start (or after ``calls`` calls).
        timeout: seconds for the whole crowd.

    Returns:
        Every call's `Answer`.

    Raises:
        TimeoutError: a thread was still calling after ``timeout``.
        AssertionError: a call failed in another way than a TApplicationException.
    """
    answers: list[Answer] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    ready = threading.Barrier(clients, timeout=30)

    def run(index: int) -> None:
        mine: list[Answer] = []
        try:
            client = catalog_client(address)
            try:
                ready.wait()
                until = time.monotonic() + seconds if seconds is not None else math.inf
                for n in range(calls):
                    if time.monotonic() >= until:
                        break
                    started = time.perf_counter()
                    try:
                        call(client, index * calls + n)
                    except TApplicationException as exc:
                        took = time.perf_counter() - started
                        mine.append(Answer("error", took, exc.message or "", exc.type))
                    else:
                        mine.append(Answer("ok", time.perf_counter() - started))
            finally:
                client.close()
        except BaseException as exc:  # reported to the caller below
            with lock:
                failures.append(exc)
        with lock:
            answers.extend(mine)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(f"the crowd was still calling after {timeout}s")
    assert not failures, failures
    return answers


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` (at least one)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, round(q * 100) - 1)]
