"""What the fault proxy does with each connection and call: actions, and the plan that picks them.

Per accepted connection: ``ok``, or ``refuse`` (accept, then reset at once).
Per call: ``ok`` (forward, relay the reply), ``reset_before`` (reset without
forwarding: never executed), ``reset_after`` (forward, then reset instead of
relaying: executed, reply lost), ``delay`` (wait, then forward and relay),
``internal_error`` (answer ``TApplicationException(INTERNAL_ERROR)`` without
forwarding), ``garbage`` (answer random bytes without forwarding),
``close_after`` (forward, relay the reply, then close the connection with a
FIN: a server that ends its connections after a call, whose next caller
finds the connection closed).

A plan holds deterministic schedules, consumed first, then per-action rates
drawn from a seeded ``random.Random``, so a run is reproducible. It may be
changed while the proxy runs, from any thread.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum


class Action(StrEnum):
    """What the proxy does with one connection or one call."""

    OK = "ok"
    REFUSE = "refuse"
    RESET_BEFORE = "reset_before"
    RESET_AFTER = "reset_after"
    DELAY = "delay"
    INTERNAL_ERROR = "internal_error"
    GARBAGE = "garbage"
    CLOSE_AFTER = "close_after"


# Actions that apply per connection and per call.
CONNECTION_ACTIONS = frozenset({Action.OK, Action.REFUSE})
CALL_ACTIONS = frozenset(Action) - {Action.REFUSE}
# The order in which call rates are laid out on [0, 1): fixed, so a seed replays.
_CALL_ORDER = tuple(a for a in Action if a in CALL_ACTIONS and a is not Action.OK)

# A schedule step: an action, or ("delay", seconds) for a delay of its own length.
Step = Action | str | tuple[Action | str, float]


@dataclass(frozen=True, slots=True)
class Fault:
    """One call's fate: an action, and for ``delay`` how many seconds."""

    action: Action
    delay: float = 0.0


class FaultPlan:
    """Which action each connection and call gets; thread-safe, changeable at run time.

    Args:
        rates: probability per action, e.g. ``{"reset_after": 0.15}``. The
            ``refuse`` rate applies to each new connection; the others to each
            call, and together they must not exceed 1 (the rest is ``ok``).
        schedule: call steps consumed in order, one per call, before the rates
            apply: actions, or ``("delay", seconds)``.
        connect_schedule: connection actions (``ok``/``refuse``) consumed in
            order, one per accepted connection, before the ``refuse`` rate applies.
        delay: seconds a ``delay`` waits unless its step says otherwise.
        seed: seed of the random source of the rates and of the garbage bytes.
    """

    def __init__(
        self,
        rates: Mapping[Action | str, float] | None = None,
        *,
        schedule: Iterable[Step] = (),
        connect_schedule: Iterable[Action | str] = (),
        delay: float = 1.0,
        seed: int | None = 0,
    ) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rates: dict[Action, float] = {}
        self._refuse_rate = 0.0
        self._schedule: list[Fault] = []
        self._connect_schedule: list[Action] = []
        self._delay = 0.0
        self.set_delay(delay)
        self.set_rates(rates or {})
        self.extend_schedule(schedule)
        self.extend_connect_schedule(connect_schedule)

    # changing the plan

    def set_rates(self, rates: Mapping[Action | str, float] | None = None, **more: float) -> None:
        """Replace every rate (actions not named get 0).

        Raises:
            ValueError: a rate outside [0, 1], call rates that add up to more than 1.
        """
        merged: dict[Action, float] = {}
        for key, value in {**(rates or {}), **more}.items():
            action = Action(key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"rate of {action} must be between 0 and 1, not {value}")
            merged[action] = float(value)
        refuse = merged.pop(Action.REFUSE, 0.0)
        merged.pop(Action.OK, None)
        if sum(merged.values()) > 1.0 + 1e-9:
            raise ValueError(f"call rates add up to more than 1: {merged}")
        with self._lock:
            self._rates = merged
            self._refuse_rate = refuse

    def extend_schedule(self, steps: Iterable[Step]) -> None:
        """Append call steps to the schedule."""
        faults = [self._fault(step) for step in steps]
        with self._lock:
            self._schedule.extend(faults)

    def extend_connect_schedule(self, actions: Iterable[Action | str]) -> None:
        """Append connection actions (``ok`` or ``refuse``)."""
        parsed = [Action(a) for a in actions]
        for action in parsed:
            if action not in CONNECTION_ACTIONS:
                raise ValueError(f"{action} is not a connection action (ok, refuse)")
        with self._lock:
            self._connect_schedule.extend(parsed)

    def set_delay(self, seconds: float) -> None:
        """Seconds a ``delay`` step without a length of its own waits."""
        if seconds < 0:
            raise ValueError("a delay cannot be negative")
        with self._lock:
            self._delay = float(seconds)

    def clear(self) -> None:
        """Every rate to 0 and both schedules emptied: everything is ``ok`` from now."""
        with self._lock:
            self._rates = {}
            self._refuse_rate = 0.0
            self._schedule = []
            self._connect_schedule = []

    @property
    def pending(self) -> int:
        """Call steps left in the schedule."""
        with self._lock:
            return len(self._schedule)

    # drawing

    def next_call(self) -> Fault:
        """The fault for the next call: the schedule's next step, else a draw."""
        with self._lock:
            if self._schedule:
                fault = self._schedule.pop(0)
                if fault.action is Action.DELAY and fault.delay < 0:
                    return Fault(Action.DELAY, self._delay)
                return fault
            if not self._rates:
                return Fault(Action.OK)
            draw = self._rng.random()
            for action in _CALL_ORDER:
                rate = self._rates.get(action, 0.0)
                if draw < rate:
                    return Fault(action, self._delay if action is Action.DELAY else 0.0)
                draw -= rate
            return Fault(Action.OK)

    def next_connection(self) -> Action:
        """The action for the next accepted connection."""
        with self._lock:
            if self._connect_schedule:
                return self._connect_schedule.pop(0)
            if self._refuse_rate and self._rng.random() < self._refuse_rate:
                return Action.REFUSE
            return Action.OK

    def garbage(self) -> bytes:
        """16 to 64 random bytes that begin with ``0xFF``.

        No reader can take ``0xFF`` for the start of a frame length or of an
        envelope and wait for more: the client fails at once.
        """
        with self._lock:
            n = self._rng.randint(15, 63)
            return b"\xff" + self._rng.randbytes(n)

    @staticmethod
    def _fault(step: Step) -> Fault:
        if isinstance(step, tuple):
            action, seconds = Action(step[0]), float(step[1])
            if action is not Action.DELAY or seconds < 0:
                raise ValueError(f"only delay steps take a length, as (delay, seconds): {step}")
            return Fault(action, seconds)
        action = Action(step)
        if action not in CALL_ACTIONS:
            raise ValueError(f"{action} is not a call action (refuse is per connection)")
        # -1: "the plan's delay at the time the step is used".
        return Fault(action, -1.0 if action is Action.DELAY else 0.0)
