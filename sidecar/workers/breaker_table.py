"""Every breaker's state of one sidecar, shared by its workers: `BreakerTable`.

The supervisor makes the file with `BreakerTable.create` before it starts the
workers; each worker maps it with `BreakerTable.open`, and
`BreakerTable.storage` gives each breaker a ``pybreaker.CircuitBreakerStorage``
over one slot, found by the breaker's name (`SlotStorage`; observe it with
the breaker's state getter, as the fleet's storage is observed).

Layout (this machine's byte order; the file never leaves it): a 64-byte
header (magic ``SCBRKTAB``, version, slot size, slot count), then ``slots``
slots of 128 bytes each:

    0  taken (u8)    1  state (u8: closed, open, half-open)    2  name length (u8)
    8  failure counter (u64)    16  success counter (u64)
    24 opened_at (f64, Unix seconds; NaN for None)
    32 BLAKE2b-128 digest of the name (the key)    48  up to 80 bytes of the name

Rules: a slot is found by linear probing from its digest. Taking a slot,
incrementing a counter and resetting a counter that is not already 0 happen
under the table's lock (a thread lock and an exclusive ``flock`` on the
file). State, counters and opened_at are read without a lock, each one load
of one aligned field; state and opened_at are written without it, one store
each. A state another worker wrote is adopted, when first read, with counter
resets muted (`SlotStorage.observe`). A full table gives a breaker a
process-local ``CircuitMemoryStorage`` and logs a warning: the sidecar keeps
serving, that breaker counts per worker.
Why mmap and flock, and the races this leaves: docs/workers.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mmap
import os
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pybreaker

from sidecar.errors import ConfigError
from sidecar.resilience.breaker import STATE_CLOSED, STATE_HALF_OPEN, STATE_OPEN
from sidecar.workers.mapped import FileLock, create_file, owning

log = logging.getLogger("sidecar.breaker")

MAGIC = b"SCBRKTAB"
VERSION = 1
HEADER = struct.Struct("=8sIII")  # magic, version, slot size, slots
HEADER_SIZE = 64
SLOT_SIZE = 128  # two cache lines of 64 bytes: no slot shares a line with another's counters
NAME_BYTES = 80  # SLOT_SIZE - 48: the rest of the slot
DIGEST_BYTES = 16
# Per-method breakers are capped by metrics.max_method_labels (200 by default)
# plus `other` and the upstream's own: 1024 keeps the table under a quarter
# full, so probes stay short.
DEFAULT_SLOTS = 1024
MAX_SLOTS = 1 << 20  # 128 MiB; far beyond any sidecar's breakers

# Offsets inside a slot.
_TAKEN, _STATE, _NAME_LEN = 0, 1, 2
_FAIL, _SUCCESS, _OPENED_AT, _DIGEST, _NAME = 8, 16, 24, 32, 48

STATES = (STATE_CLOSED, STATE_OPEN, STATE_HALF_OPEN)
STATE_CODES = {state: code for code, state in enumerate(STATES)}
STORAGE_NAME = "table"  # pybreaker's storage name: which kind of storage


def _digest(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=DIGEST_BYTES).digest()


def _short_name(name: str) -> bytes:
    """The name's utf-8, cut to NAME_BYTES at a character boundary."""
    return name.encode()[:NAME_BYTES].decode(errors="ignore").encode()


class BreakerTable:
    """Every breaker's state of one sidecar, in a file mapped by all its workers.

    Not inherited across ``fork``: a child opens the table itself (the
    ``flock`` belongs to the open file, which a forked child would share with
    its parent, so the lock would not keep them apart). The locked operations
    of a table used in a forked child raise RuntimeError.
    """

    def __init__(self, path: Path, fd: int, slots: int) -> None:
        self.path = path
        self.slots = slots
        self._fd = fd
        self.lock = FileLock(fd, f"breaker table {path}")
        self._map = mmap.mmap(fd, HEADER_SIZE + slots * SLOT_SIZE)
        self._bytes = memoryview(self._map)
        self._u64 = self._bytes.cast("Q")
        self._f64 = self._bytes.cast("d")
        self._local: dict[str, pybreaker.CircuitMemoryStorage] = {}

    @classmethod
    def create(cls, path: str | os.PathLike[str], slots: int = DEFAULT_SLOTS) -> BreakerTable:
        """A new, empty table at ``path`` (the supervisor, before workers start).

        The file is written beside ``path`` and renamed over it, so an `open`
        never sees half a table, and workers still mapping an old table at
        ``path`` keep their file instead of losing its pages.

        Raises:
            ValueError: ``slots`` is not between 1 and MAX_SLOTS.
            OSError: the file cannot be written.
        """
        if not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be between 1 and {MAX_SLOTS}, not {slots}")
        target = Path(path)
        header = HEADER.pack(MAGIC, VERSION, SLOT_SIZE, slots)
        fd = create_file(target, HEADER_SIZE + slots * SLOT_SIZE, header)  # zeros: slots free
        return owning(fd, lambda: cls(target, fd, slots))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BreakerTable:
        """The table at ``path``, as `create` made it (a worker).

        Raises:
            ConfigError: the file is not a breaker table of this version.
            OSError: it cannot be opened (missing, not readable and writable).
        """
        target = Path(path)
        fd = os.open(target, os.O_RDWR)
        return owning(fd, lambda: cls(target, fd, _check_header(target, fd)))

    def storage(self, name: str) -> SlotStorage | pybreaker.CircuitMemoryStorage:
        """The storage of the breaker called ``name``.

        The same name gives the same slot in every process that maps this
        file (the first caller takes it). When every slot is taken by other
        names, a process-local ``CircuitMemoryStorage`` (the same one for the
        same name in this process) and a warning in the log.
        """
        digest = _digest(name)
        start = int.from_bytes(digest[:8], "little") % self.slots
        self.lock.acquire()
        try:
            for i in range(self.slots):
                slot = (start + i) % self.slots
                base = HEADER_SIZE + slot * SLOT_SIZE
                if not self._bytes[base + _TAKEN]:
                    self._take(base, digest, name)
                    return SlotStorage(self, slot, name)
                if self._bytes[base + _DIGEST : base + _DIGEST + DIGEST_BYTES] == digest:
                    return SlotStorage(self, slot, name)
        finally:
            self.lock.release()
        local = self._local.get(name)
        if local is None:
            log.warning(
                "breaker table %s is full (%d slots): breaker %r counts in this worker only",
                self.path,
                self.slots,
                name,
            )
            local = self._local[name] = pybreaker.CircuitMemoryStorage(STATE_CLOSED)
        return local

    def names(self) -> list[str]:
        """The (possibly shortened) names of the taken slots, in slot order."""
        found = []
        for slot in range(self.slots):
            base = HEADER_SIZE + slot * SLOT_SIZE
            if self._bytes[base + _TAKEN]:
                length = self._bytes[base + _NAME_LEN]
                found.append(bytes(self._bytes[base + _NAME : base + _NAME + length]).decode())
        return found

    def close(self) -> None:
        """Unmap the file; storages from this table must not be used after."""
        if self._map.closed:
            return
        for view in (self._u64, self._f64, self._bytes):
            view.release()
        self._map.close()
        os.close(self._fd)

    def _take(self, base: int, digest: bytes, name: str) -> None:
        short = _short_name(name)
        self._bytes[base + _STATE] = STATE_CODES[STATE_CLOSED]
        self._u64[(base + _FAIL) // 8] = 0
        self._u64[(base + _SUCCESS) // 8] = 0
        self._f64[(base + _OPENED_AT) // 8] = math.nan
        self._bytes[base + _DIGEST : base + _DIGEST + DIGEST_BYTES] = digest
        self._bytes[base + _NAME : base + _NAME + len(short)] = short
        self._bytes[base + _NAME_LEN] = len(short)
        self._bytes[base + _TAKEN] = 1  # last: a taken slot is a whole slot


def _check_header(path: Path, fd: int) -> int:
    """The slot count of the table open on ``fd``; ConfigError if it is not one."""
    size = os.fstat(fd).st_size
    header = os.pread(fd, HEADER.size, 0)
    if len(header) < HEADER.size or size < HEADER_SIZE:
        raise ConfigError(f"{path} is not a breaker table: {size} bytes, too short")
    magic, version, slot_size, slots = HEADER.unpack(header)
    if magic != MAGIC:
        raise ConfigError(f"{path} is not a breaker table: magic {magic!r}, not {MAGIC!r}")
    if version != VERSION or slot_size != SLOT_SIZE:
        raise ConfigError(
            f"{path} is a breaker table of version {version} with {slot_size}-byte slots; "
            f"this sidecar reads version {VERSION} with {SLOT_SIZE}-byte slots"
        )
    if not 1 <= slots <= MAX_SLOTS or size != HEADER_SIZE + slots * SLOT_SIZE:
        raise ConfigError(f"{path} is a damaged breaker table: {slots} slots in {size} bytes")
    return int(slots)


class SlotStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker storage over one slot of a `BreakerTable` (made by `BreakerTable.storage`).

    Reads and the state and opened_at writes take no lock; counter increments
    and resets of a counter that is not 0 take the table's lock. One storage
    per ``Breaker``: call `observe` with the adapter's state getter (as with
    the fleet's storage), so that a state another worker wrote is adopted at
    once, without the counter resets pybreaker makes when it adopts one.
    """

    def __init__(self, table: BreakerTable, slot: int, name: str) -> None:
        super().__init__(STORAGE_NAME)
        self.breaker_name = name
        self.slot = slot
        self._table = table
        self._bytes = table._bytes
        self._u64 = table._u64
        self._f64 = table._f64
        base = HEADER_SIZE + slot * SLOT_SIZE
        self._state_at = base + _STATE
        self._fail_at = (base + _FAIL) // 8
        self._success_at = (base + _SUCCESS) // 8
        self._opened_at_at = (base + _OPENED_AT) // 8
        self._seen = STATES[self._bytes[self._state_at]]  # the state last read or written here
        self._observer: Callable[[], object] | None = None
        self._muted = False

    @property
    def adopting(self) -> bool:
        """True while the observer takes on a state another worker wrote: the
        transition pybreaker reports then is that worker's (counted there)."""
        return self._muted

    def observe(self, observer: Callable[[], object]) -> None:
        """Call ``observer`` (the adapter's ``state``) on reading a state another process wrote.

        Counter resets are muted while it runs: pybreaker, adopting a state
        it did not set, resets the failure counter (closed) or the success
        counter (open, half-open), which would wipe what other workers
        counted since; the worker that made the change has reset them already.
        """
        self._observer = observer

    @property
    def state(self) -> str:
        state = STATES[self._bytes[self._state_at]]
        if state != self._seen:
            self._seen = state
            if self._observer is not None and not self._muted:
                self._muted = True
                try:
                    self._observer()
                finally:
                    self._muted = False
                state = self._seen  # what the observer adopted, if it changed again
        return state

    @state.setter
    def state(self, state: str) -> None:
        code = STATE_CODES.get(state)
        if code is None:
            raise ValueError(f"unknown breaker state {state!r}; valid states: {STATES}")
        self._bytes[self._state_at] = code
        self._seen = state

    def increment_counter(self) -> None:
        self._add(self._fail_at)

    def reset_counter(self) -> None:
        self._zero(self._fail_at)

    def increment_success_counter(self) -> None:
        self._add(self._success_at)

    def reset_success_counter(self) -> None:
        self._zero(self._success_at)

    @property
    def counter(self) -> int:
        return self._u64[self._fail_at]

    @property
    def success_counter(self) -> int:
        return self._u64[self._success_at]

    @property
    def opened_at(self) -> datetime | None:
        value = self._f64[self._opened_at_at]
        return None if math.isnan(value) else datetime.fromtimestamp(value, UTC)

    @opened_at.setter
    def opened_at(self, value: datetime | None) -> None:
        self._f64[self._opened_at_at] = math.nan if value is None else value.timestamp()

    def _add(self, index: int) -> None:
        lock = self._table.lock
        lock.acquire()
        try:
            self._u64[index] += 1
        finally:
            lock.release()

    def _zero(self, index: int) -> None:
        if self._muted or self._u64[index] == 0:
            return  # muted: see observe; at 0: as if it came before any increment running now
        lock = self._table.lock
        lock.acquire()
        try:
            self._u64[index] = 0
        finally:
            lock.release()
