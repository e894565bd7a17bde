"""Circuit breaker: an asyncio-friendly adapter over ``pybreaker.CircuitBreaker``.

pybreaker is synchronous: ``call(func)`` runs ``func`` under an RLock and
updates its state machine from the result. A Thrift call is an awaitable that
must not run under a lock, so the adapter splits the work in two:

- `Breaker.admit` before the attempt decides from pybreaker's own state (read
  through its storage, so a shared storage is obeyed) whether the call may go;
  in the open state it applies pybreaker's own rule (``opened_at +
  reset_timeout``, on its wall clock) and, once the timeout has passed, moves
  pybreaker to half-open with its public ``half_open()``. pybreaker lets every
  caller through while half-open; the adapter admits at most
  ``half_open_max_calls`` probes at once and treats the rest as if the breaker
  were open.
- `Breaker.record` after the attempt replays the outcome through pybreaker's
  ``call`` with a function that returns (success) or raises (failure), so its
  counters, storage, state transitions and listeners stay authoritative. The
  replayed function does no I/O, so the lock is held for microseconds. One
  shortcut: a success while closed with no failures counted is not replayed,
  because it would change nothing (pybreaker would reset a counter that is
  already zero). A result of a call admitted while closed that arrives after
  the circuit left the closed state is dropped: replayed in the open state,
  pybreaker would move to half-open and count it as a probe, outside the
  ``half_open_max_calls`` slots.

Cancellation: an attempt cancelled before it produced an outcome (the client
went away, the sidecar is shutting down) counts as neither success nor
failure: it says nothing about the upstream. `Breaker.cancel` frees the probe
slot it may hold. Expired per-try timeouts are not cancellations; they are
recorded as ``timeout`` failures.

Two ways to open (``breaker.mode``): ``consecutive`` (the default) is
pybreaker's own rule, ``fail_max`` failures in a row. ``rate`` keeps results
of calls admitted while closed out of pybreaker and adds them to a sliding
window (`sidecar.resilience.window`) instead; when the window's failure rate
or slow-call rate crosses its threshold, the adapter opens pybreaker with its
public ``open()``, so the storage and listeners see an ordinary opening.
Half-open probes are replayed through pybreaker in both modes
(``success_threshold`` closes it, a failed probe opens it again). The window
is emptied whenever the circuit opens or is seen open; in fleet mode each
sidecar keeps its own window while the state is shared.

Health checks (``health_check``, `sidecar.proxy.health`): while they are on
(`Breaker.health_checked`), no client call is a probe. `Breaker.admit` treats
half-open like open, and the way back is `Breaker.probe_result`: once the
reset timeout has passed, a passing health check moves pybreaker to half-open
and is replayed as a success through its ``call``, so ``success_threshold``
passes close the circuit (one, by default: the first pass after the reset
timeout). While half-open, a failed health check is replayed as a failure
(pybreaker opens it again, for a new reset timeout) only when no address's
latest probe passed: with several addresses, one dead address is the health
checker's business, not a reason to keep the circuit open for all.

Time: the reset timeout is measured on the clock passed in (Unix seconds),
against pybreaker's ``opened_at``; tests pass a fake clock. The fleet's
shared storage (`sidecar.fleet`) is a pybreaker storage too; this module is
the only one that drives pybreaker's state machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Final, Literal

import pybreaker

from sidecar.resilience.window import RateSettings, RateWindow

STATE_CLOSED: Final = pybreaker.STATE_CLOSED
STATE_OPEN: Final = pybreaker.STATE_OPEN
STATE_HALF_OPEN: Final = pybreaker.STATE_HALF_OPEN

# Values of the breaker_state gauge (design §8).
STATE_VALUES: Final = {STATE_CLOSED: 0, STATE_HALF_OPEN: 1, STATE_OPEN: 2}

# (name, old state, new state, adopted): adopted is True when the change was
# another worker's, noticed in the storage they share (`adopting`).
TransitionCallback = Callable[[str, str, str, bool], None]
Clock = Callable[[], float]


class Admission(Enum):
    """Why a call was let through."""

    CLOSED = "closed"
    PROBE = "probe"


# Plain names for the members read on every call (reading Admission.PROBE costs a call).
_CLOSED: Final = Admission.CLOSED
_PROBE: Final = Admission.PROBE


class _AttemptFailed(Exception):
    """Raised inside pybreaker's ``call`` to replay a failed attempt."""


def _fail() -> None:
    raise _AttemptFailed


def _succeed() -> None:
    return None


class LocalStorage(pybreaker.CircuitBreakerStorage):
    """One breaker's pybreaker state in this process, in plain attributes.

    What ``pybreaker.CircuitMemoryStorage`` keeps, without its properties: a
    property is an interpreted call on every read, and `Breaker` reads the state
    and the failure counter on every call. The class attributes shadow the base
    class's properties, so pybreaker's reads and writes are attribute accesses.
    Nothing but this breaker's pybreaker changes it (unlike a shared storage).
    """

    state: str = STATE_CLOSED
    counter: int = 0
    success_counter: int = 0
    opened_at: datetime | None = None

    def __init__(self) -> None:
        super().__init__("memory")
        self.state = STATE_CLOSED
        self.counter = 0
        self.success_counter = 0
        self.opened_at = None

    def increment_counter(self) -> None:
        self.counter += 1

    def reset_counter(self) -> None:
        self.counter = 0

    def increment_success_counter(self) -> None:
        self.success_counter += 1

    def reset_success_counter(self) -> None:
        self.success_counter = 0


class _TransitionListener(pybreaker.CircuitBreakerListener):
    """Passes pybreaker's state changes on, saying which were adopted from the storage.

    A storage that one sidecar's workers share says ``adopting`` while a
    worker takes on a state another worker wrote: that change is the other
    worker's, counted there (one sidecar counts an opening once). The
    fleet's storage does not say it: each replica counts the changes it
    sees (docs/fleet.md), as it is its own target to Prometheus.
    """

    def __init__(self, callback: TransitionCallback, storage: pybreaker.CircuitBreakerStorage):
        self._callback = callback
        self._storage = storage

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else STATE_CLOSED
        if old != new_state.name:
            adopted = bool(getattr(self._storage, "adopting", False))
            self._callback(cb.name or "", old, new_state.name, adopted)


class _Unquiet(pybreaker.CircuitBreakerListener):
    """Tells its breaker that pybreaker changed its state or counted a failure: the
    breaker no longer takes itself for quiet (`Breaker._quiet`) until it has read the
    storage again. Any change counts, made through the breaker or straight on pybreaker."""

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        self._breaker._quiet = False

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self._breaker._quiet = False


class Breaker:
    """One circuit breaker, driven from asyncio.

    Args:
        name: what it guards, for metrics and logs (an upstream, or upstream+method).
        fail_max: consecutive failures that open it.
        reset_timeout: seconds it stays open before a probe is allowed.
        success_threshold: successful probes that close it again.
        half_open_max_calls: probes allowed at once while half-open.
        storage: a pybreaker storage; a fresh in-memory one by default.
        on_transition: called with (name, old_state, new_state, adopted) on every
            change; adopted says the change was another worker's (`_TransitionListener`).
        clock: Unix time in seconds (``time.time`` in production); when the reset
            timeout has passed is decided on it, and a time window's seconds.
        rate: the ``rate`` mode's window and thresholds; None for ``consecutive``
            (fail_max then opens it).
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout: float,
        success_threshold: int = 1,
        half_open_max_calls: int = 1,
        storage: pybreaker.CircuitBreakerStorage | None = None,
        on_transition: TransitionCallback | None = None,
        clock: Clock,
        rate: RateSettings | None = None,
    ) -> None:
        self.name = name
        self._clock = clock
        self._storage = storage or LocalStorage()
        # A shared storage may change in another process: `admit` then has pybreaker
        # catch up. A local one changes only through this breaker's pybreaker.
        self._shared = storage is not None and not isinstance(storage, LocalStorage)
        # Closed with no failure counted, in a storage only this breaker's pybreaker
        # changes: `admit` and `record` then read nothing of pybreaker's (`_settle`).
        self._quiet = False
        listeners: list[pybreaker.CircuitBreakerListener] = [_Unquiet(self)]
        if on_transition:
            listeners.append(_TransitionListener(on_transition, self._storage))
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            success_threshold=success_threshold,
            state_storage=self._storage,
            listeners=listeners,
            name=name,
        )
        self.half_open_max_calls = half_open_max_calls
        self.probes_in_flight = 0
        self.rejected = 0
        self._window = RateWindow(rate) if rate is not None else None
        self._window_stale = False
        self.health_checked = False  # health checks close it; no client call is a probe
        self._settle()

    @property
    def rate(self) -> RateSettings | None:
        """The ``rate`` mode's settings; None in ``consecutive`` mode."""
        return self._window.settings if self._window is not None else None

    def rates(self) -> tuple[float, float] | None:
        """(failure rate, slow-call rate) in percent over the window now; None in
        ``consecutive`` mode. 0 while the window is empty."""
        if self._window is None:
            return None
        totals = self._window.totals(self._clock())
        return totals.failure_rate, totals.slow_rate

    def configure(
        self,
        *,
        fail_max: int,
        reset_timeout: float,
        success_threshold: int,
        half_open_max_calls: int,
        rate: RateSettings | Literal["keep"] | None = "keep",
    ) -> None:
        """Change the settings, keeping the state (used by a config reload).

        ``rate``: new ``rate`` mode settings, None for ``consecutive``, or
        ``"keep"``; a change starts from an empty window.
        """
        self._cb.fail_max = fail_max
        self._cb.reset_timeout = reset_timeout
        self._cb.success_threshold = success_threshold
        self.half_open_max_calls = half_open_max_calls
        if rate != "keep" and rate != self.rate:
            self._window = RateWindow(rate) if isinstance(rate, RateSettings) else None

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``, as pybreaker's storage says."""
        return str(self._cb.state.name)

    @property
    def fail_counter(self) -> int:
        """Consecutive failures counted by pybreaker."""
        return int(self._cb.fail_counter)

    @property
    def success_counter(self) -> int:
        """Consecutive successes counted by pybreaker while half-open."""
        return int(self._cb.success_counter)

    @property
    def reset_timeout(self) -> float:
        """Seconds the circuit stays open before a probe is let through."""
        return float(self._cb.reset_timeout)

    @property
    def fail_max(self) -> int:
        """Consecutive failures that open the circuit."""
        return int(self._cb.fail_max)

    def probe_in(self) -> float | None:
        """Seconds until a probe may go while open (0 when one may go now); None otherwise."""
        opened_at = self.opened_at
        if self.state != STATE_OPEN or opened_at is None:
            return None
        return max(0.0, opened_at.timestamp() + self._cb.reset_timeout - self._clock())

    @property
    def opened_at(self) -> datetime | None:
        """When pybreaker last opened the circuit (UTC)."""
        value = self._storage.opened_at
        return value if isinstance(value, datetime) else None

    def admit(self) -> Admission | None:
        """May a call go to the upstream now? None means no: treat the circuit as open."""
        if self._quiet:
            return _CLOSED
        cb = self._cb
        state = self._storage.state  # the storage pybreaker reads (``state_storage``)
        if self._shared and state != cb._state.name:
            # Changed elsewhere (a shared storage): pybreaker's ``state`` catches up
            # and tells its listeners. Otherwise it would return the cached state as is.
            state = cb.state.name
        if state == STATE_CLOSED:
            return _CLOSED
        self._window_stale = True  # a window from before this opening must not reopen it
        if self.health_checked:  # only health checks may close it: no client call probes
            self.rejected += 1
            return None
        if state == STATE_OPEN:
            opened_at = self.opened_at
            if (
                opened_at is not None
                and self._clock() < opened_at.timestamp() + self._cb.reset_timeout
            ):
                self.rejected += 1
                return None
            self._cb.half_open()
        if self.probes_in_flight >= self.half_open_max_calls:
            self.rejected += 1
            return None
        self.probes_in_flight += 1
        return Admission.PROBE

    def record(self, admission: Admission, failed: bool, duration: float | None = None) -> None:
        """Replay a call's result through pybreaker, or add it to the rate window
        (see the module docstring). ``duration``: the call's seconds (slow calls)."""
        if admission is _PROBE:
            self.probes_in_flight -= 1
        elif self._quiet:  # closed, nothing counted: only a failure changes anything
            if self._window is not None:
                self._record_rate(failed, duration)
                return
            if not failed:
                return
        else:
            state = self._storage.state
            if state != STATE_CLOSED:
                # Admitted while closed, finished after the circuit opened: a stale
                # result must not act as a probe (pybreaker would half-open on it).
                return
            if self._window is not None:
                self._record_rate(failed, duration)
                return
            if not failed and self._storage.counter == 0:
                self._quiet = not self._shared  # closed, nothing counted: read just now
                return
        before = self._storage.state
        with contextlib.suppress(_AttemptFailed, pybreaker.CircuitBreakerError):
            self._cb.call(_fail if failed else _succeed)
        self._opened_now(before)
        self._settle()

    def _settle(self) -> None:
        """Read from the storage whether the circuit is quiet (`_quiet`)."""
        storage = self._storage
        self._quiet = not self._shared and storage.state == STATE_CLOSED and storage.counter == 0

    def _record_rate(self, failed: bool, duration: float | None) -> None:
        """Rate mode, closed: add the result to the window; open when it says so."""
        window = self._window
        assert window is not None
        if self._window_stale:
            window.reset()
            self._window_stale = False
        if window.record(failed, duration, self._clock()):
            self.force_open()

    def _opened_now(self, before: str) -> None:
        """Date an opening this breaker just caused on its own clock (pybreaker uses the wall's)."""
        if before != STATE_OPEN and self._storage.state == STATE_OPEN:
            self._storage.opened_at = datetime.fromtimestamp(self._clock(), UTC)
            if self._window is not None:
                self._window.reset()

    def probe_result(self, passed: bool, upstream_down: bool) -> None:
        """A health check's result, with health checks on (see the module docstring).

        Args:
            passed: the probe passed.
            upstream_down: no address's latest probe passed.
        """
        state = self._storage.state
        if state == STATE_CLOSED:
            return
        self._window_stale = True
        if state == STATE_OPEN:
            opened_at = self.opened_at
            if not passed or (
                opened_at is not None
                and self._clock() < opened_at.timestamp() + self._cb.reset_timeout
            ):
                return
            self._cb.half_open()
        elif not passed and not upstream_down:
            return
        before = self._storage.state
        with contextlib.suppress(_AttemptFailed, pybreaker.CircuitBreakerError):
            self._cb.call(_succeed if passed else _fail)
        self._opened_now(before)
        self._settle()

    def cancel(self, admission: Admission) -> None:
        """The admitted call was cancelled: it counts as nothing."""
        if admission is Admission.PROBE:
            self.probes_in_flight -= 1

    def force_open(self) -> None:
        """Open the circuit now (operators, tests, and the rate window)."""
        before = self._storage.state
        self._cb.open()
        self._opened_now(before)

    def force_close(self) -> None:
        """Close the circuit now (operators and tests); a rate window starts empty."""
        self._cb.close()
        self._window_stale = True
        self._settle()
