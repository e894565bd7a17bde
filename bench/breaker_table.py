"""What a breaker's shared state costs: a `sidecar.workers.breaker_table` slot, and pybreaker's
memory storage for comparison.

Times per operation (the timer's floor, an empty lambda, is printed too:
subtract it), in one process, medians of the rounds, on the process's CPU
clock (other load on the machine does not count; a flock is a system call,
whose time is the process's too):

- reading ``state`` and ``counter`` (every call: ``Breaker.admit`` reads the
  state, ``Breaker.record`` the counter after a success), through a table slot
  and through ``pybreaker.CircuitMemoryStorage``;
- ``Breaker.admit`` while closed, over both;
- a locked ``increment_counter``, uncontended (a failure), and a
  ``reset_counter`` of a counter that is 0 (no lock) or not (lock);
- with ``--contended``, the wall time per increment while two processes
  increment the same slot at once.

Usage: python bench/breaker_table.py [--rounds 7] [--number 200000] [--contended]
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pybreaker

from sidecar.resilience.breaker import STATE_CLOSED, Breaker
from sidecar.workers.breaker_table import BreakerTable

NAME = "bench/echo"


def per_op_ns(fn: Callable[[], object], number: int, rounds: int) -> float:
    timer = timeit.Timer(fn, timer=time.process_time)
    return statistics.median(timer.timeit(number) / number * 1e9 for _ in range(rounds))


def _increments(path: str, count: int, start: multiprocessing.synchronize.Event) -> None:
    table = BreakerTable.open(path)
    storage = table.storage(NAME)
    start.wait(60)
    for _ in range(count):
        storage.increment_counter()
    table.close()


def contended_ns(path: str, count: int) -> float:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_increments, args=(path, count, start)) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let both children import and reach the start line (a bench, not a test)
    began = time.perf_counter()
    start.set()
    for p in procs:
        p.join(120)
    return (time.perf_counter() - began) / (2 * count) * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--contended", action="store_true")
    args = parser.parse_args()
    n, r = args.number, args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "breakers")
        table = BreakerTable.create(path)
        slot = table.storage(NAME)
        memory = pybreaker.CircuitMemoryStorage(STATE_CLOSED)
        on_slot = Breaker(NAME, fail_max=5, reset_timeout=30, storage=slot, clock=time.time)
        on_memory = Breaker(NAME, fail_max=5, reset_timeout=30, storage=memory, clock=time.time)
        rows = [
            ("an empty lambda (the timer's floor)", per_op_ns(lambda: None, n, r)),
            ("state read, table slot", per_op_ns(lambda: slot.state, n, r)),
            ("state read, memory storage", per_op_ns(lambda: memory.state, n, r)),
            ("counter read, table slot", per_op_ns(lambda: slot.counter, n, r)),
            ("counter read, memory storage", per_op_ns(lambda: memory.counter, n, r)),
            ("Breaker.admit closed, table slot", per_op_ns(on_slot.admit, n, r)),
            ("Breaker.admit closed, memory storage", per_op_ns(on_memory.admit, n, r)),
            ("reset_counter at 0 (no lock)", per_op_ns(slot.reset_counter, n, r)),
            ("increment_counter (lock)", per_op_ns(slot.increment_counter, n // 4, r)),
            ("increment_counter, memory storage", per_op_ns(memory.increment_counter, n, r)),
        ]

        def increment_and_reset() -> None:
            slot.increment_counter()
            slot.reset_counter()

        both = per_op_ns(increment_and_reset, n // 4, r)
        rows.append(("increment + reset from 1 (two locks)", both))
        for label, ns in rows:
            print(f"{label:40s} {ns:8.0f} ns")
        if args.contended:
            ns = contended_ns(path, n)
            print(f"{'increment, 2 processes at once (wall)':40s} {ns:8.0f} ns")
        table.close()


if __name__ == "__main__":
    main()
