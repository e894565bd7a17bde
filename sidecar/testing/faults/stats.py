"""What a fault proxy has seen and done: `FaultStats` snapshots of thread-safe counters.

How often the upstream executed a call is the upstream's business (tests read
the server's counters); these are the proxy's own counts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from sidecar.protocol.envelope import shown_name
from sidecar.testing.faults.plan import Action

# Method names counted separately; later names are counted as "other".
MAX_NAMES = 1000


@dataclass(frozen=True, slots=True)
class FaultStats:
    """A snapshot of what a proxy has seen and done.

    Attributes:
        connections: client connections accepted (refused ones included).
        refused: connections reset at once by a ``refuse`` action.
        calls: call messages received (CALL and ONEWAY).
        actions: calls per action taken.
        by_method: calls per envelope name.
        forwarded: calls written to the upstream.
        late_replies: replies from the upstream that came after the client had
            closed its side (written anyway if the socket was still open).
        upstream_failures: calls that could not be forwarded (upstream
            unreachable or gone); the client connection was reset.
        upstream_failure_kinds: the same calls by step and kind:
            ``connect: ECONNREFUSED`` (no upstream to connect to), ``first call:
            ConnectionError`` (a new upstream connection closed before the
            reply), ``later call: ...`` (one that had served calls before).
    """

    connections: int = 0
    refused: int = 0
    calls: int = 0
    actions: dict[str, int] = field(default_factory=dict)
    by_method: dict[str, int] = field(default_factory=dict)
    forwarded: int = 0
    late_replies: int = 0
    upstream_failures: int = 0
    upstream_failure_kinds: dict[str, int] = field(default_factory=dict)

    def action(self, action: Action | str) -> int:
        """Calls that got ``action``."""
        return self.actions.get(str(Action(action)), 0)


class FaultCounters:
    """What `FaultStats` snapshots; written on the proxy's loop, read from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}
        self._actions: dict[str, int] = {}
        self._names: dict[str, int] = {}
        self._failure_kinds: dict[str, int] = {}

    def add(self, key: str, amount: int = 1) -> None:
        """Count ``amount`` under ``key`` (a `FaultStats` integer field)."""
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def call(self, name: str, action: Action) -> None:
        """Count one call named ``name`` that got ``action``."""
        name = shown_name(name)
        with self._lock:
            self._values["calls"] = self._values.get("calls", 0) + 1
            self._actions[action.value] = self._actions.get(action.value, 0) + 1
            if name not in self._names and len(self._names) >= MAX_NAMES:
                name = "other"
            self._names[name] = self._names.get(name, 0) + 1

    def upstream_failure(self, kind: str) -> None:
        """Count one call that could not be forwarded, under ``kind`` (`FaultStats`)."""
        with self._lock:
            self._values["upstream_failures"] = self._values.get("upstream_failures", 0) + 1
            if kind not in self._failure_kinds and len(self._failure_kinds) >= MAX_NAMES:
                kind = "other"
            self._failure_kinds[kind] = self._failure_kinds.get(kind, 0) + 1

    def snapshot(self) -> FaultStats:
        """The counts so far."""
        with self._lock:
            v = self._values
            return FaultStats(
                connections=v.get("connections", 0),
                refused=v.get("refused", 0),
                calls=v.get("calls", 0),
                actions=dict(self._actions),
                by_method=dict(self._names),
                forwarded=v.get("forwarded", 0),
                late_replies=v.get("late_replies", 0),
                upstream_failures=v.get("upstream_failures", 0),
                upstream_failure_kinds=dict(self._failure_kinds),
            )
