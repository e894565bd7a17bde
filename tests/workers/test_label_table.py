"""The label table: method label values given once for all of a sidecar's workers.

Real files in ``tmp_path``, real mappings, real processes (``spawn``). Two
`LabelTable.open` mappings in one process stand for two workers, as in
test_breaker_table.py: they see each other only through the file's pages
and lock each other out through ``flock``.
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.metrics.labels import (
    ANSWERED,
    NOT_GRANTED,
    OTHER,
    UNANSWERED,
    LocalGrants,
    MethodLabels,
)
from sidecar.proxy.policy import PolicyTable
from sidecar.resilience.outcome import Outcome
from sidecar.workers.label_table import HEADER, HEADER_SIZE, MAGIC, SLOT_SIZE, LabelTable

DEADLINE = 60.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "labels"


@pytest.fixture
def mapping(path: Path) -> Iterator[Callable[[int], LabelTable]]:
    """Makes the table (limit as given, once) and opens one more mapping of it per call."""
    opened: list[LabelTable] = []

    def open_one(limit: int = 6) -> LabelTable:
        if not opened:
            opened.append(LabelTable.create(path, limit))
        table = LabelTable.open(path)
        opened.append(table)
        return table

    yield open_one
    for table in opened:
        table.close()


def test_a_value_given_through_one_mapping_is_seen_through_the_other(
    mapping: Callable[[int], LabelTable],
) -> None:
    one, two = mapping(6), mapping(6)
    assert two.state("getItem") == NOT_GRANTED
    assert one.grant("getItem", False, 0)
    assert two.state("getItem") == UNANSWERED
    assert two.grant("getItem", True, 0)  # answered through the other worker
    assert one.state("getItem") == ANSWERED
    assert one.counts() == two.counts() == (1, 0)
    assert one.grant("getItem", False, 0)  # it has its value: nothing changes
    assert two.counts() == (1, 0)


def test_the_bounds_hold_for_all_the_mappings_together(
    mapping: Callable[[int], LabelTable],
) -> None:
    """limit 6: names not yet answered get 3 values at most, all names 6, across both."""
    one, two = mapping(6), mapping(6)
    assert one.grant("a", False, 0)
    assert two.grant("b", False, 0)
    assert one.grant("c", False, 0)
    assert not two.grant("d", False, 0)  # the unanswered half is full
    assert not one.grant("d", False, 0)
    assert two.grant("d", True, 0)  # answered names take the other half
    assert one.grant("a", True, 0)  # a is answered: a new name may take its share
    assert two.grant("e", False, 0)
    assert one.counts() == (5, 3)
    assert one.has_room(0)
    assert not one.has_room(1)  # a configured name holds the last value
    assert not two.grant("f", True, 1)
    assert one.grant("f", True, 0)
    assert not two.grant("g", True, 0)  # six given: never more, never taken back
    assert not two.has_room(0)
    assert two.counts() == (6, 3)


def test_many_names_never_fill_the_slots(mapping: Callable[[int], LabelTable]) -> None:
    one = mapping(4)
    assert one.slots == 8
    given = [n for n in range(1000) if one.grant(f"name{n}", True, 0)]
    assert given == [0, 1, 2, 3]
    assert [one.state(f"name{n}") for n in range(6)] == [ANSWERED] * 4 + [NOT_GRANTED] * 2


def _grant_in_child(path: str, names: list[str], start: Any, out: Any) -> None:
    table = LabelTable.open(path)
    out.put("ready")
    start.wait(DEADLINE)
    out.put([name for name in names if table.grant(name, True, 0)])
    table.close()


def test_grants_from_processes_never_pass_the_limit(path: Path) -> None:
    """Two workers give values at once, 300 names each for a limit of 200: the lock
    keeps the count exact, and no value is given twice."""
    limit, per_child = 200, 300
    table = LabelTable.create(path, limit)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    names = [[f"w{child}n{n}" for n in range(per_child)] for child in range(2)]
    procs = [
        ctx.Process(target=_grant_in_child, args=(str(path), own, start, out)) for own in names
    ]
    for p in procs:
        p.start()
    try:
        assert [out.get(timeout=DEADLINE) for _ in procs] == ["ready", "ready"]
        start.set()
        given = [out.get(timeout=DEADLINE) for _ in procs]
    finally:
        start.set()
        for p in procs:
            p.join(DEADLINE)
            if p.is_alive():
                p.kill()
                p.join(DEADLINE)
    assert [p.exitcode for p in procs] == [0, 0]
    every = given[0] + given[1]
    assert len(every) == len(set(every)) == limit
    assert table.counts() == (limit, 0)
    assert all(table.state(name) == ANSWERED for name in every)
    table.close()


def test_method_labels_of_two_workers_agree(mapping: Callable[[int], LabelTable]) -> None:
    """The same `MethodLabels` logic over the shared table: a name invented in one
    worker takes the unanswered share of both, and a method answered in one worker
    has its value in the other from its first call."""
    limit = 4
    one, two = MethodLabels([], limit), MethodLabels([], limit)
    one.use(mapping(limit))
    two.use(mapping(limit))
    assert one.label("madeUp1") == "madeUp1"
    assert two.label("madeUp2") == "madeUp2"
    assert one.label("madeUp3") == two.label("madeUp3") == OTHER  # the half is full
    assert one.label("getItem") == OTHER
    assert one.awaits_answer("getItem", OTHER)
    assert one.confirm("getItem")
    assert two.label("getItem") == "getItem"  # answered through the first
    assert not two.awaits_answer("getItem", "getItem")
    assert two.label("madeUp1") == "madeUp1"  # given through the first, not answered yet
    assert two.awaits_answer("madeUp1", "madeUp1")
    assert one.awaits_answer("madeUp1", "madeUp1")


def test_a_worker_that_said_other_takes_the_value_another_worker_got(
    mapping: Callable[[int], LabelTable],
) -> None:
    """A name one worker resolved to `other` (the unanswered half was full) gets its
    own value there as soon as another worker has got it one, without this worker
    seeing the upstream answer it: its calls count in the method's breaker, not in
    `other`'s. Before, it kept `other` until this worker saw an answer itself."""
    limit = 4
    labels_one, labels_two = MethodLabels([], limit), MethodLabels([], limit)
    labels_one.use(mapping(limit))
    labels_two.use(mapping(limit))
    one = PolicyTable(SidecarConfig.model_validate({}), labels_one)
    two = PolicyTable(SidecarConfig.model_validate({}), labels_two)
    assert [one.for_name(n).label for n in ("madeUp1", "madeUp2")] == ["madeUp1", "madeUp2"]
    assert one.for_name("getItem").label == OTHER  # the unanswered half is full
    assert one.for_name("getItem").label == OTHER  # still: nothing was given meanwhile
    seen_by_two = two.for_name("getItem")
    assert seen_by_two.label == OTHER
    two.answered(seen_by_two, Outcome.OK, None)  # the upstream answered it in worker two
    assert two.for_name("getItem").label == "getItem"
    assert one.for_name("getItem").label == "getItem"  # no answer seen in worker one
    assert not one.for_name("getItem").label_awaits_answer
    # A name still refused stays `other` in both, and the bounds hold.
    assert one.for_name("madeUp3").label == two.for_name("madeUp3").label == OTHER


def test_use_hands_the_values_given_so_far_to_the_table(
    mapping: Callable[[int], LabelTable],
) -> None:
    """A worker's values from before the table (and back: stop hands them to its
    own grants again), answered or not as they were."""
    labels = MethodLabels(["configured"], 6)
    assert labels.label("early") == "early"
    assert labels.confirm("answered")
    table = mapping(6)
    labels.use(table)
    assert table.state("early") == UNANSWERED
    assert table.state("answered") == ANSWERED
    assert table.state("configured") == NOT_GRANTED  # configured names need no grant
    assert table.counts() == (2, 1)
    local = LocalGrants(6)
    labels.use(local)
    assert local.state("early") == UNANSWERED
    assert local.state("answered") == ANSWERED


def _header(**fields: Any) -> bytes:
    values = {"magic": MAGIC, "version": 1, "slot_size": SLOT_SIZE, "slots": 8, "limit": 4}
    values.update(fields)
    packed = HEADER.pack(*values.values())
    return packed + bytes(HEADER_SIZE - len(packed))


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (b"", "not a label table: 0 bytes"),
        (b"SCBRKTAB" + bytes(56), "magic b'SCBRKTAB'"),
        (_header(version=2) + bytes(8 * SLOT_SIZE), "version 2"),
        (_header(slot_size=64) + bytes(8 * SLOT_SIZE), "64-byte slots"),
        (_header() + bytes(7 * SLOT_SIZE), "damaged label table: 8 slots for limit 4"),
        (_header(slots=6) + bytes(6 * SLOT_SIZE), "damaged label table: 6 slots"),
        (_header(limit=0, slots=0), "damaged label table"),
    ],
    ids=["empty", "breaker-table", "version", "slot-size", "short", "slots", "no-limit"],
)
def test_open_refuses_a_file_that_is_not_a_table(
    tmp_path: Path, content: bytes, complaint: str
) -> None:
    wrong = tmp_path / "not-a-table"
    wrong.write_bytes(content)
    with pytest.raises(ConfigError, match=complaint) as caught:
        LabelTable.open(wrong)
    assert str(wrong) in str(caught.value)


def test_create_checks_the_limit(path: Path) -> None:
    with pytest.raises(ValueError, match="limit must be between"):
        LabelTable.create(path, 0)
    assert not path.exists()


def test_a_table_inherited_through_fork_refuses_to_lock(
    mapping: Callable[[int], LabelTable],
) -> None:
    table = mapping(4)
    pid = os.fork()
    if pid == 0:  # the child: the flock would be the parent's; it must say so
        code = 1
        try:
            table.grant("x", True, 0)
        except RuntimeError:
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.state("x") == NOT_GRANTED
    assert table.grant("x", True, 0)  # the parent still may


def test_the_header_is_what_the_layout_says(path: Path) -> None:
    LabelTable.create(path, 5).close()
    raw = path.read_bytes()
    assert len(raw) == HEADER_SIZE + 10 * SLOT_SIZE
    assert struct.unpack_from("=8sIIII", raw) == (MAGIC, 1, SLOT_SIZE, 10, 5)


def test_a_refusal_the_counts_show_takes_no_lock(
    path: Path, mapping: Callable[[int], LabelTable]
) -> None:
    """Past the bounds, a new name is refused while another process holds the lock;
    a name with a value is still settled under it."""
    one = mapping(2)
    assert one.grant("a", False, 0)  # the unanswered half (1) is full
    assert one.grant("b", True, 0)  # all values given
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another worker holds the lock
        refusals: list[bool] = []

        def refuse() -> None:  # in a thread: a grant that took the lock would wait
            refusals.extend((one.grant("c", False, 0), one.grant("c", True, 0)))

        thread = threading.Thread(target=refuse, daemon=True)
        thread.start()
        thread.join(DEADLINE / 4)
        assert refusals == [False, False], "the refusal waited for the lock"
        assert one.state("a") == UNANSWERED
    finally:
        os.close(fd)
    assert one.grant("a", True, 0)
    assert one.counts() == (2, 0)
