"""`Timeouts`: coarse per-try timeouts, on a hand-driven clock and on real loops."""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.proxy.timeouts import GRANULARITY, Bucket, Timeouts

G = GRANULARITY


class ManualHandle:
    """A timer of `ManualLoop`."""

    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """The part of an event loop `Timeouts` uses, on a clock that moves only when told.

    A timer runs at exactly its time, or ``early`` seconds before it (uvloop
    rounds a delay to whole milliseconds, so its timers can run up to 0.5 ms
    early). An exception in a callback goes to ``errors``, as an event loop
    hands it to its exception handler, and the loop carries on.
    """

    def __init__(self, now: float = 1000.0, early: float = 0.0) -> None:
        self.now = now
        self.early = early
        self.errors: list[BaseException] = []
        self.callbacks_run = 0
        self._timers: list[tuple[float, int, ManualHandle]] = []
        self._counter = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> ManualHandle:
        handle = ManualHandle(when, callback, args)
        self._counter += 1
        heapq.heappush(self._timers, (when, self._counter, handle))
        return handle

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> ManualHandle:
        return self.call_at(self.now + delay, callback, *args)

    def armed(self) -> list[float]:
        """When the live timers are due."""
        return sorted(h.when for _, _, h in self._timers if not h.cancelled)

    def advance_to(self, until: float, limit: int = 100_000) -> None:
        """Run every timer due by ``until``, in order, then set the clock to ``until``."""
        timers = self._timers
        for _ in range(limit):
            if not timers or timers[0][0] - self.early > until:
                break
            _, _, handle = heapq.heappop(timers)
            if handle.cancelled:
                continue
            self.now = max(self.now, handle.when - self.early)
            self.callbacks_run += 1
            try:
                handle.callback(*handle.args)
            except Exception as exc:
                self.errors.append(exc)
        else:
            raise AssertionError(f"more than {limit} timer callbacks before {until}")
        self.now = max(self.now, until)

    def advance(self, seconds: float) -> None:
        self.advance_to(self.now + seconds)


def make(loop: ManualLoop) -> Timeouts:
    return Timeouts(cast(asyncio.AbstractEventLoop, loop))


class Recorder:
    """Expire callbacks that note the clock when they run."""

    def __init__(self, loop: ManualLoop) -> None:
        self.loop = loop
        self.fired: dict[object, float] = {}

    def __call__(self, key: object) -> Callable[[], None]:
        def expire() -> None:
            assert key not in self.fired, f"{key!r} expired twice"
            self.fired[key] = self.loop.time()

        return expire


# when they fire


@pytest.mark.parametrize("early", [0.0, 0.0004])
@pytest.mark.parametrize("start", [0.0, 1000.0, 12345.678901, 2.0**20 + 0.1])
def test_a_timeout_fires_never_early_and_at_most_one_granularity_late(
    start: float, early: float
) -> None:
    loop = ManualLoop(start, early=early)
    timeouts = make(loop)
    record = Recorder(loop)
    # Deadlines all over a few buckets, filed at different moments.
    deadlines = {}
    for i in range(60):
        loop.advance(G * 0.37)
        expires = loop.time() + 0.0003 + (i * 0.00131) % (4 * G)
        deadlines[i] = expires
        timeouts.add(expires, i, record(i))
    loop.advance(10 * G)
    assert record.fired.keys() == deadlines.keys()
    for key, expires in deadlines.items():
        late = record.fired[key] - expires
        # A loop whose timers run early is answered with a short second wait.
        assert 0 <= late <= G + (0.001 if early else 0), (key, expires, record.fired[key])


@settings(max_examples=300, deadline=None)
@given(
    start=st.floats(min_value=0.0, max_value=1e6, allow_nan=False),
    delays=st.lists(st.floats(min_value=0.0, max_value=0.05), min_size=1, max_size=8),
    gap=st.floats(min_value=0.0, max_value=0.02),
)
def test_property_never_early_at_most_one_granularity_late(
    start: float, delays: list[float], gap: float
) -> None:
    loop = ManualLoop(start)
    timeouts = make(loop)
    record = Recorder(loop)
    deadlines = {}
    for i, delay in enumerate(delays):
        expires = loop.time() + delay
        deadlines[i] = expires
        timeouts.add(expires, i, record(i))
        loop.advance(gap)
    loop.advance(0.1)
    for key, expires in deadlines.items():
        assert expires <= record.fired[key] <= expires + G


def test_a_deadline_exactly_on_a_bucket_edge_fires_at_it() -> None:
    loop = ManualLoop(100 * G)
    timeouts = make(loop)
    record = Recorder(loop)
    expires = 103 * G
    timeouts.add(expires, "edge", record("edge"))
    loop.advance_to(expires)
    assert record.fired["edge"] >= expires
    assert record.fired["edge"] - expires <= G


def test_a_deadline_already_past_fires_on_the_next_tick_not_at_once() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    timeouts.add(999.0, "past", record("past"))
    assert record.fired == {}  # add() never calls back
    loop.advance(G)
    assert "past" in record.fired


def test_timeouts_of_one_bucket_share_one_timer_and_fire_together() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    for i in range(10):
        timeouts.add(1000.0 + 2 * G + (i + 1) * G / 20, i, record(i))
    assert len(timeouts) == 10
    assert len(loop.armed()) == 1
    loop.advance(5 * G)
    assert len(set(record.fired.values())) == 1
    assert len(record.fired) == 10
    assert len(timeouts) == 0


def test_no_timer_runs_while_nothing_is_filed() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    assert loop.armed() == []
    timeouts.add(1000.0 + 3 * G, "a", record("a"))
    loop.advance(1.0)
    assert "a" in record.fired
    assert loop.armed() == []
    ticks = loop.callbacks_run
    loop.advance(1.0)
    assert loop.callbacks_run == ticks
    # And it starts again for the next one.
    timeouts.add(loop.time() + 2 * G, "b", record("b"))
    loop.advance(1.0)
    assert "b" in record.fired


def test_a_far_deadline_does_not_tick_every_granularity_until_then() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    timeouts.add(1030.0, "far", record("far"))
    loop.advance(31.0)
    assert "far" in record.fired
    assert loop.callbacks_run <= 3


def test_an_earlier_deadline_filed_later_is_not_held_up_by_a_far_one() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    timeouts.add(1010.0, "far", record("far"))
    loop.advance(1.0)
    timeouts.add(1001.0 + 0.0001, "near", record("near"))
    loop.advance(1.0)
    assert 1001.0001 <= record.fired["near"] <= 1001.0001 + G
    assert "far" not in record.fired


# remove


def test_a_removed_timeout_never_fires() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    bucket = timeouts.add(1000.0 + 2 * G, "gone", record("gone"))
    timeouts.add(1000.0 + 2 * G, "kept", record("kept"))
    timeouts.remove(bucket, "gone")
    assert len(timeouts) == 1
    loop.advance(1.0)
    assert set(record.fired) == {"kept"}


def test_remove_of_something_not_filed_is_harmless() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    bucket = timeouts.add(1000.0 + G, "a", record("a"))
    other = timeouts.add(1000.0 + 5 * G, "b", record("b"))
    timeouts.remove(bucket, "not filed")
    timeouts.remove(other, "a")  # filed elsewhere
    loop.advance(1.0)
    timeouts.remove(bucket, "a")  # after it fired
    assert set(record.fired) == {"a", "b"}


def test_the_bucket_of_a_timeout_that_fired_removes_nothing_filed_later() -> None:
    """A bucket handed out before it expired is the old one: the same key filed
    again later, even for the same moment, is in a bucket of its own."""
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    old = timeouts.add(1000.0 + G, "k", record("first"))
    loop.advance(1.0)
    timeouts.add(1000.0 + G, "k", record("again"))  # due already: the same bucket number
    timeouts.remove(old, "k")
    loop.advance(1.0)
    assert set(record.fired) == {"first", "again"}


def test_the_same_key_filed_again_replaces_its_callback_in_that_bucket() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    fired: list[str] = []
    timeouts.add(1000.0 + G, "k", lambda: fired.append("first"))
    timeouts.add(1000.0 + G, "k", lambda: fired.append("second"))
    loop.advance(1.0)
    assert fired == ["second"]


def test_a_timeout_removed_by_an_earlier_callback_of_the_same_tick_does_not_fire() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    expires = 1000.0 + 2 * G
    numbers: dict[str, Bucket] = {}

    def expire_a() -> None:
        record("a")()
        timeouts.remove(numbers["b"], "b")

    timeouts.add(expires, "a", expire_a)
    numbers["b"] = timeouts.add(expires, "b", record("b"))
    loop.advance(1.0)
    assert set(record.fired) == {"a"}


def test_a_callback_may_file_a_new_timeout_and_it_fires() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)

    def retry() -> None:
        record("first")()
        # A retry files its own timeout, already due, and one later.
        timeouts.add(loop.time(), "due", record("due"))
        timeouts.add(loop.time() + 3 * G, "later", record("later"))

    timeouts.add(1000.0 + G, "first", retry)
    loop.advance(1.0)
    assert set(record.fired) == {"first", "due", "later"}
    assert record.fired["due"] - record.fired["first"] <= G
    assert loop.armed() == []


# close


def test_close_cancels_everything_pending() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    for i in range(5):
        timeouts.add(1000.0 + i * G, i, record(i))
    timeouts.close()
    assert len(timeouts) == 0
    assert loop.armed() == []
    loop.advance(1.0)
    assert record.fired == {}


def test_close_from_inside_a_callback_stops_the_rest_of_that_tick() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)

    def closer() -> None:
        record("closer")()
        timeouts.close()

    timeouts.add(1000.0 + G, "closer", closer)
    timeouts.add(1000.0 + G, "same bucket", record("same bucket"))
    timeouts.add(1000.0 + 4 * G, "later", record("later"))
    loop.advance(1.0)
    assert set(record.fired) == {"closer"}
    assert loop.armed() == []


def test_timeouts_filed_after_close_work() -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)
    timeouts.add(1000.0 + G, "before", record("before"))
    timeouts.close()
    timeouts.add(1000.0 + 2 * G, "after", record("after"))
    loop.advance(1.0)
    assert set(record.fired) == {"after"}


# a callback that raises


def test_a_raising_callback_is_logged_and_every_other_timeout_still_fires(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)
    record = Recorder(loop)

    def broken() -> None:
        raise RuntimeError("a bug in one call")

    # The broken callback shares its bucket with others, before and after it.
    timeouts.add(1000.0 + G, "before", record("before"))
    timeouts.add(1000.0 + G, "broken", broken)
    timeouts.add(1000.0 + G, "after", record("after"))
    timeouts.add(1000.0 + 3 * G, "next bucket", record("next bucket"))
    with caplog.at_level(logging.ERROR):
        loop.advance(1.0)
        # Filed after the failure: the timer must still be working.
        timeouts.add(loop.time() + G, "filed later", record("filed later"))
        loop.advance(1.0)
    assert set(record.fired) == {"before", "after", "next bucket", "filed later"}
    assert loop.errors == []  # nothing escaped into the event loop
    failures = [r for r in caplog.records if r.exc_info]
    assert len(failures) == 1
    exc_info = failures[0].exc_info
    assert exc_info is not None
    assert isinstance(exc_info[1], RuntimeError)
    assert failures[0].levelno == logging.ERROR
    assert loop.armed() == []


def test_two_raising_callbacks_are_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    loop = ManualLoop(1000.0)
    timeouts = make(loop)

    def broken(n: int) -> Callable[[], None]:
        def expire() -> None:
            raise ValueError(f"bug {n}")

        return expire

    timeouts.add(1000.0 + G, 1, broken(1))
    timeouts.add(1000.0 + 2 * G, 2, broken(2))
    with caplog.at_level(logging.ERROR):
        loop.advance(1.0)
    messages = sorted(str(r.exc_info[1]) for r in caplog.records if r.exc_info)
    assert messages == ["bug 1", "bug 2"]


# on real event loops


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_on_a_real_loop_timeouts_fire_not_early_and_survive_a_raising_callback(
    new_loop: Callable[[], asyncio.AbstractEventLoop], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> dict[str, float]:
        loop = asyncio.get_running_loop()
        timeouts = Timeouts(loop)
        fired: dict[str, float] = {}
        deadlines: dict[str, float] = {}
        done = loop.create_future()

        def expire(key: str) -> Callable[[], None]:
            def callback() -> None:
                fired[key] = loop.time()
                if len(fired) == len(deadlines) and not done.done():
                    done.set_result(None)

            return callback

        def broken() -> None:
            raise RuntimeError("a bug in one call")

        now = loop.time()
        timeouts.add(now + 0.01, "broken", broken)
        for i in range(20):
            key = f"t{i}"
            deadlines[key] = now + 0.002 * i
            timeouts.add(deadlines[key], key, expire(key))
        deadlines["late"] = now + 0.05
        timeouts.add(deadlines["late"], "late", expire("late"))
        await asyncio.wait_for(done, 5.0)
        timeouts.close()
        return {key: fired[key] - deadlines[key] for key in deadlines}

    loop = new_loop()
    try:
        with caplog.at_level(logging.ERROR):
            lateness = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert len(lateness) == 21
    assert min(lateness.values()) >= 0
    assert len([r for r in caplog.records if r.exc_info]) == 1


def test_a_timer_that_runs_early_is_set_again_once_not_spun_on() -> None:
    loop = ManualLoop(1000.0, early=0.0004)
    timeouts = make(loop)
    record = Recorder(loop)
    timeouts.add(1000.0 + 3 * G, "a", record("a"))
    loop.advance(1.0)
    assert record.fired["a"] >= 1000.0 + 3 * G
    assert loop.callbacks_run == 2
