"""The SQLite fallback store's health: what is failing now, and errors counted by operation.

Both store threads report here. The store is healthy while its file is the
one at the path, the last write batch succeeded and the last read succeeded;
``errors`` counts each failure by operation for
``thrift_sidecar_fallback_store_errors_total``. Why each flag clears when it
does: docs/fallback-stores.md ("When the file is deleted or replaced").
"""

from __future__ import annotations

import threading

# What failed: a read, a write batch, a purge, the file found deleted or
# replaced, or a fresh file that could not be opened at the path.
OPERATIONS = ("read", "write", "purge", "file", "reopen")


class StoreHealth:
    """Failure flags and error counts of one SQLite store, set from either thread."""

    def __init__(self) -> None:
        self.file_lost = False
        self.read_failed = False
        self.write_failed = False
        self._errors = dict.fromkeys(OPERATIONS, 0)
        self._lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        """False while the file is lost, or the last read or write failed."""
        return not (self.file_lost or self.read_failed or self.write_failed)

    def failed(self, operation: str) -> None:
        """Count a failure of ``operation`` (one of `OPERATIONS`) and set its flag."""
        with self._lock:
            self._errors[operation] += 1
        if operation == "read":
            self.read_failed = True
        elif operation in ("write", "purge"):
            self.write_failed = True
        else:
            self.file_lost = True

    def errors(self) -> tuple[tuple[str, int], ...]:
        """(operation, failures so far) for each of `OPERATIONS`."""
        with self._lock:
            return tuple(self._errors.items())
