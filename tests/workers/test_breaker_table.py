"""The breaker table: one file, many mappings, the same breaker state in every worker.

Real files in ``tmp_path``, real mappings, real processes (``spawn``). Two
`BreakerTable.open` mappings in one process stand for two workers where a
process is not needed: they are two open files and two mappings, so they see
each other only through the file's pages and lock each other out through
``flock``, as two workers do.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pybreaker
import pytest

from sidecar.errors import ConfigError
from sidecar.resilience.breaker import (
    STATE_CLOSED,
    STATE_HALF_OPEN,
    STATE_OPEN,
    Admission,
    Breaker,
)
from sidecar.workers.breaker_table import (
    HEADER,
    MAGIC,
    NAME_BYTES,
    SLOT_SIZE,
    BreakerTable,
    SlotStorage,
)
from tests.resilience.test_breaker import FakeClock

DEADLINE = 60.0  # seconds any wait here may take before the test fails
RESET = 30.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "breakers"


@pytest.fixture
def table(path: Path) -> Iterator[BreakerTable]:
    """A new table (as the supervisor makes it), closed after the test."""
    made = BreakerTable.create(path, 64)
    yield made
    made.close()


@pytest.fixture
def mapping(path: Path, table: BreakerTable) -> Iterator[Callable[[], BreakerTable]]:
    """Further mappings of ``table``'s file (as workers open it), closed after the test."""
    opened: list[BreakerTable] = []

    def open_one() -> BreakerTable:
        opened.append(BreakerTable.open(path))
        return opened[-1]

    yield open_one
    for t in opened:
        t.close()


def slot_of(storage: pybreaker.CircuitBreakerStorage) -> int:
    assert isinstance(storage, SlotStorage)
    return storage.slot


# -- one file, two mappings -------------------------------------------------------------


def test_a_change_through_one_mapping_is_seen_through_the_other(
    mapping: Callable[[], BreakerTable],
) -> None:
    one, two = mapping(), mapping()
    a, b = one.storage("up"), two.storage("up")
    assert slot_of(a) == slot_of(b)
    assert (b.state, b.counter, b.success_counter, b.opened_at) == (STATE_CLOSED, 0, 0, None)

    a.increment_counter()
    a.increment_counter()
    a.increment_success_counter()
    assert (b.counter, b.success_counter) == (2, 1)
    b.increment_counter()
    assert a.counter == 3

    opened = datetime(2026, 12, 6, 19, 5, 7, 123456, tzinfo=UTC)
    a.opened_at = opened
    a.state = STATE_OPEN
    assert b.state == STATE_OPEN
    assert b.opened_at == opened
    b.state = STATE_HALF_OPEN
    assert a.state == STATE_HALF_OPEN

    b.reset_counter()
    a.reset_success_counter()
    assert (a.counter, b.success_counter) == (0, 0)
    b.opened_at = None  # type: ignore[assignment]  # pybreaker's setter takes a datetime
    assert a.opened_at is None


def test_an_observer_hears_of_states_others_wrote_with_resets_muted(
    mapping: Callable[[], BreakerTable],
) -> None:
    one, two = mapping(), mapping()
    mine, theirs = one.storage("up"), two.storage("up")
    assert isinstance(mine, SlotStorage)
    heard: list[str] = []

    def observer() -> None:
        heard.append(mine.state)  # the adapter reads the state again: no second call
        mine.reset_counter()  # pybreaker's adoption reset: muted
        if len(heard) == 1:
            theirs.state = STATE_HALF_OPEN  # changed again meanwhile
            heard.append(mine.state)

    mine.observe(observer)
    theirs.increment_counter()
    mine.state = STATE_OPEN  # its own writes are not news
    assert mine.state == STATE_OPEN
    assert heard == []
    theirs.state = STATE_CLOSED
    assert mine.state == STATE_HALF_OPEN  # the latest, as the observer last read it
    assert heard == [STATE_CLOSED, STATE_HALF_OPEN]
    assert mine.counter == 1
    assert mine.state == STATE_HALF_OPEN
    assert len(heard) == 2
    mine.reset_counter()
    assert theirs.counter == 0


def test_an_unknown_state_is_refused(table: BreakerTable) -> None:
    storage = table.storage("up")
    with pytest.raises(ValueError, match="unknown breaker state"):
        storage.state = "ajar"
    assert storage.state == STATE_CLOSED


def test_reads_and_resets_at_zero_take_no_lock(path: Path, table: BreakerTable) -> None:
    """With another open file holding the lock, the lock-free operations still finish."""
    storage = table.storage("up")
    done = threading.Event()

    def lock_free() -> None:
        storage.reset_counter()
        storage.reset_success_counter()
        storage.state = STATE_OPEN
        storage.opened_at = datetime.now(UTC)
        assert (storage.state, storage.counter, storage.success_counter) == (STATE_OPEN, 0, 0)
        done.set()

    with path.open("rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        worker = threading.Thread(target=lock_free, daemon=True)
        worker.start()
        finished = done.wait(DEADLINE)
        fcntl.flock(holder, fcntl.LOCK_UN)
    worker.join(DEADLINE)
    assert finished


# -- Breakers over two mappings -----------------------------------------------------------


def two_breakers(
    mapping: Callable[[], BreakerTable],
    clock: FakeClock,
    *,
    observed: bool = True,
    success_threshold: int = 1,
) -> tuple[Breaker, Breaker, list[tuple[str, str, str, bool]]]:
    """Two workers' breakers of one name, wired as the app wires them (``observed``);
    the transitions the first one reports: (name, old, new, adopted from the second)."""
    seen_by_first: list[tuple[str, str, str, bool]] = []
    breakers = []
    for listener in (lambda *t: seen_by_first.append(t), None):
        storage = mapping().storage("up")
        assert isinstance(storage, SlotStorage)
        breaker = Breaker(
            "up",
            fail_max=5,
            reset_timeout=RESET,
            success_threshold=success_threshold,
            storage=storage,
            clock=clock,
            on_transition=listener,
        )
        if observed:
            storage.observe(lambda b=breaker: b.state)
        breakers.append(breaker)
    return breakers[0], breakers[1], seen_by_first


def fail(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        admission = breaker.admit()
        assert admission is Admission.CLOSED
        breaker.record(admission, failed=True)


def test_failures_through_two_breakers_add_up(mapping: Callable[[], BreakerTable]) -> None:
    first, second, seen_by_first = two_breakers(mapping, FakeClock())
    fail(first, 3)
    assert (first.state, second.fail_counter) == (STATE_CLOSED, 3)
    fail(second, 1)
    assert second.state == STATE_CLOSED
    fail(second, 1)
    assert second.state == STATE_OPEN
    assert first.state == STATE_OPEN
    assert seen_by_first == [("up", STATE_CLOSED, STATE_OPEN, True)]  # the second's opening
    assert first.admit() is None
    assert second.admit() is None


def test_a_success_in_between_starts_the_count_again(
    mapping: Callable[[], BreakerTable],
) -> None:
    first, second, _ = two_breakers(mapping, FakeClock())
    fail(first, 3)
    admission = second.admit()
    assert admission is Admission.CLOSED
    second.record(admission, failed=False)
    assert first.fail_counter == 0
    fail(second, 2)
    fail(first, 2)
    assert (first.state, second.state, first.fail_counter) == (STATE_CLOSED, STATE_CLOSED, 4)
    fail(first, 1)
    assert (first.state, second.state) == (STATE_OPEN, STATE_OPEN)


def test_a_probe_after_the_reset_timeout_closes_it_for_both(
    mapping: Callable[[], BreakerTable],
) -> None:
    clock = FakeClock()
    first, second, seen_by_first = two_breakers(mapping, clock)
    fail(first, 3)
    fail(second, 2)
    opened_at = second.opened_at
    assert opened_at is not None
    assert opened_at.timestamp() == clock.now  # dated on the breakers' clock, seen by both
    assert first.opened_at == opened_at

    clock.advance(RESET - 0.001)
    assert first.admit() is None
    assert second.admit() is None
    clock.advance(0.001)
    probe = first.admit()
    assert probe is Admission.PROBE
    assert second.state == STATE_HALF_OPEN
    first.record(probe, failed=False)
    assert first.state == STATE_CLOSED
    assert second.state == STATE_CLOSED
    assert (second.fail_counter, second.success_counter) == (0, 0)
    assert second.admit() is Admission.CLOSED
    assert seen_by_first == [
        ("up", STATE_CLOSED, STATE_OPEN, True),  # the second opened it
        ("up", STATE_OPEN, STATE_HALF_OPEN, False),  # the first's probe
        ("up", STATE_HALF_OPEN, STATE_CLOSED, False),
    ]


def test_a_failed_probe_opens_it_again_for_both(mapping: Callable[[], BreakerTable]) -> None:
    clock = FakeClock()
    first, second, _ = two_breakers(mapping, clock)
    fail(second, 5)
    clock.advance(RESET)
    probe = first.admit()
    assert probe is Admission.PROBE
    first.record(probe, failed=True)
    assert second.state == STATE_OPEN
    assert second.opened_at is not None
    assert second.opened_at.timestamp() == clock.now
    assert second.admit() is None


def close_then_fail_twice(first: Breaker, second: Breaker, clock: FakeClock) -> None:
    """The second opens it, the first closes it and counts 2 failures; the second has not looked."""
    fail(second, 5)
    clock.advance(RESET)
    probe = first.admit()
    assert probe is Admission.PROBE
    first.record(probe, failed=False)
    fail(first, 2)
    assert first.fail_counter == 2


def test_failures_after_a_closing_survive_another_worker_noticing_it(
    mapping: Callable[[], BreakerTable],
) -> None:
    clock = FakeClock()
    first, second, _ = two_breakers(mapping, clock)
    close_then_fail_twice(first, second, clock)
    assert second.admit() is Admission.CLOSED  # adopts "closed", resets muted
    assert second.fail_counter == 2
    fail(second, 3)
    assert first.state == STATE_OPEN


def test_without_observe_pybreaker_wipes_them(mapping: Callable[[], BreakerTable]) -> None:
    """Why the storage must be observed: pybreaker adopting "closed" resets the shared counter.

    If pybreaker stops doing that, this fails, and `SlotStorage.observe` may go.
    """
    clock = FakeClock()
    first, second, _ = two_breakers(mapping, clock, observed=False)
    close_then_fail_twice(first, second, clock)
    assert second.admit() is Admission.CLOSED
    assert second.fail_counter == 0


def test_half_open_successes_survive_another_worker_noticing_it(
    mapping: Callable[[], BreakerTable],
) -> None:
    clock = FakeClock()
    first, second, seen_by_first = two_breakers(mapping, clock, success_threshold=2)
    fail(first, 5)
    clock.advance(RESET)
    probe = first.admit()
    assert probe is Admission.PROBE
    first.record(probe, failed=False)
    assert (first.state, first.success_counter) == (STATE_HALF_OPEN, 1)
    probe = second.admit()  # adopts "half-open", resets muted; its own probe slot
    assert probe is Admission.PROBE
    assert second.success_counter == 1
    second.record(probe, failed=False)
    assert (first.state, second.state) == (STATE_CLOSED, STATE_CLOSED)
    assert seen_by_first == [
        ("up", STATE_CLOSED, STATE_OPEN, False),
        ("up", STATE_OPEN, STATE_HALF_OPEN, False),
        ("up", STATE_HALF_OPEN, STATE_CLOSED, True),  # the second's success closed it
    ]


# -- processes ----------------------------------------------------------------------------


def count_in_child(path: str, name: str, times: int, start: Any, out: Any) -> None:
    """A worker: open the table, wait for the start, count ``times`` failures and successes.

    Says when it counted, on the machine's monotonic clock, so the test can
    tell that the workers counted at the same time.
    """
    table = BreakerTable.open(path)
    storage = table.storage(name)
    out.put(("ready", slot_of(storage)))
    began = ended = 0.0
    if start.wait(DEADLINE):
        began = time.monotonic()
        for _ in range(times):
            storage.increment_counter()
            storage.increment_success_counter()
        ended = time.monotonic()
    table.close()
    out.put(("done", began, ended))


def test_increments_from_processes_are_atomic(path: Path, table: BreakerTable) -> None:
    """Two workers count the same slot at once; not one count is lost.

    100,000 of each counter per worker: enough that without the lock (a read
    and a write) the workers' counting overlaps and loses counts.
    """
    times, children = 100_000, 2
    slot = slot_of(table.storage("up"))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=count_in_child, args=(str(path), "up", times, start, out))
        for _ in range(children)
    ]
    for p in procs:
        p.start()
    try:
        ready = [out.get(timeout=DEADLINE) for _ in procs]
        assert ready == [("ready", slot)] * children  # the same name, the same slot
        start.set()
        done = [out.get(timeout=DEADLINE) for _ in procs]
    finally:
        start.set()
        for p in procs:
            p.join(DEADLINE)
            if p.is_alive():
                p.kill()
                p.join(DEADLINE)
    assert [p.exitcode for p in procs] == [0] * children
    assert max(began for _, began, _ in done) < min(ended for _, _, ended in done)  # at once
    storage = table.storage("up")
    assert storage.counter == times * children
    assert storage.success_counter == times * children


def test_a_table_inherited_through_fork_refuses_to_lock(table: BreakerTable) -> None:
    storage = table.storage("up")
    pid = os.fork()
    if pid == 0:  # the child: the flock would be the parent's; it must say so
        code = 1
        try:
            storage.increment_counter()
        except RuntimeError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert storage.counter == 0
    storage.increment_counter()  # the parent still may
    assert storage.counter == 1


# -- names and slots ----------------------------------------------------------------------


def test_names_get_their_own_slots_and_keep_their_state(
    table: BreakerTable, mapping: Callable[[], BreakerTable]
) -> None:
    long = "Service:" + "x" * 200
    names = [f"upstream-{i}/method" for i in range(40)]  # more than half of 64 slots
    names += [long + "a", long + "b", "é" * NAME_BYTES]  # same first 80 bytes; cut in a character
    storages = {name: table.storage(name) for name in names}
    assert len({slot_of(s) for s in storages.values()}) == len(names)
    for i, storage in enumerate(storages.values()):
        storage.state = (STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN)[i % 3]
        for _ in range(i):
            storage.increment_counter()
        storage.opened_at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)

    other = mapping()
    for i, name in enumerate(names):
        again = other.storage(name)
        assert slot_of(again) == slot_of(storages[name])
        assert again.state == (STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN)[i % 3]
        assert again.counter == i
        assert again.opened_at == datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i)
    listed = other.names()
    assert len(listed) == len(names)
    assert set(names[:40]) <= set(listed)
    assert all(len(n.encode()) <= NAME_BYTES for n in listed)
    assert "é" * (NAME_BYTES // 2) in listed


def test_a_full_table_gives_a_local_storage_and_warns(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = BreakerTable.create(path, 4)
    try:
        shared = [table.storage(f"up/{i}") for i in range(4)]
        assert sorted(slot_of(s) for s in shared) == [0, 1, 2, 3]
        with caplog.at_level(logging.WARNING, logger="sidecar.breaker"):
            extra = table.storage("up/4")
            again = table.storage("up/4")
        assert isinstance(extra, pybreaker.CircuitMemoryStorage)
        assert again is extra  # one breaker state per name in this process
        assert [r.getMessage() for r in caplog.records] == [
            f"breaker table {path} is full (4 slots): breaker 'up/4' counts in this worker only"
        ]
        assert slot_of(table.storage("up/2")) == slot_of(shared[2])  # taken names still found
    finally:
        table.close()


# -- the file ---------------------------------------------------------------------------


def header(
    magic: bytes = MAGIC, version: int = 1, slot_size: int = SLOT_SIZE, slots: int = 4
) -> bytes:
    return HEADER.pack(magic, version, slot_size, slots).ljust(64, b"\0")


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"", "too short"),
        (MAGIC, "too short"),
        (random.Random(7).randbytes(64 + 4 * SLOT_SIZE), "not a breaker table: magic"),
        (b"[breaker]\nfail_max = 5\n" * 40, "not a breaker table: magic"),
        (header(version=2) + bytes(4 * SLOT_SIZE), "version 2"),
        (header(slot_size=64) + bytes(4 * SLOT_SIZE), "64-byte slots"),
        (header() + bytes(3 * SLOT_SIZE), "damaged breaker table: 4 slots in 448 bytes"),
        (header(slots=0), "damaged breaker table: 0 slots"),
    ],
    ids=["empty", "magic-only", "random", "text", "version", "slot-size", "short", "no-slots"],
)
def test_open_refuses_a_file_that_is_not_a_table(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    wrong = tmp_path / "not-a-table"
    wrong.write_bytes(content)
    with pytest.raises(ConfigError, match=complaint) as caught:
        BreakerTable.open(wrong)
    assert str(wrong) in str(caught.value)


def test_open_of_a_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        BreakerTable.open(tmp_path / "nothing-here")


def test_create_replaces_a_table_without_pulling_it_from_under_its_mappings(
    path: Path, table: BreakerTable, mapping: Callable[[], BreakerTable]
) -> None:
    old = mapping().storage("up")
    old.increment_counter()
    fresh = BreakerTable.create(path, 8)
    try:
        assert fresh.storage("up").counter == 0
        assert mapping().slots == 8
        assert old.counter == 1  # the old file's pages are still there
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    finally:
        fresh.close()


def test_create_checks_the_slot_count(path: Path) -> None:
    with pytest.raises(ValueError, match="slots must be between"):
        BreakerTable.create(path, 0)
    assert not path.exists()


def test_a_closed_table_is_closed(path: Path) -> None:
    table = BreakerTable.create(path, 4)
    storage = table.storage("up")
    table.close()
    table.close()
    with pytest.raises(ValueError, match="released"):
        _ = storage.state
