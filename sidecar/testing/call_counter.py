"""`CallCounter`: how often a test upstream executed each method, safe to read from any thread."""

from __future__ import annotations

import threading


class CallCounter:
    """Thread-safe count of executions per method; ``counter["m"]`` is 0 until m runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def increment(self, method: str) -> int:
        """Count one execution; return the new count."""
        with self._lock:
            count = self._counts.get(method, 0) + 1
            self._counts[method] = count
            return count

    def __getitem__(self, method: str) -> int:
        with self._lock:
            return self._counts.get(method, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy of every count."""
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        """Executions of all methods together."""
        with self._lock:
            return sum(self._counts.values())

    def __repr__(self) -> str:
        return f"CallCounter({self.snapshot()!r})"
