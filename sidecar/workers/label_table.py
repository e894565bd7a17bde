"""The method label values of one sidecar, given out once for all its workers: `LabelTable`.

Method names arrive on the wire, so the values of the ``method`` label are
capped (`sidecar.metrics.labels.MethodLabels`): ``metrics.max_method_labels``
in all, half of them at most to names the upstream has not answered. Given
out by each worker on its own, one method could get its own value in one
worker and ``other`` in the next (and so count in two per-method breakers),
and the merged ``/metrics`` could hold the cap's worth of values from each
worker. This table gives them out once: the supervisor makes the file with
`LabelTable.create` before it starts the workers, each worker maps it with
`LabelTable.open` and hands it to its `MethodLabels` (`MethodLabels.use`),
which calls it as a `sidecar.metrics.labels.Grants`.

Layout (this machine's byte order; the file never leaves it): a 64-byte
header (magic ``SCLABTAB``, version, slot size, slot count, limit; at byte 32
the count of values given, at byte 36 the count of those not yet answered,
u32 each), then ``slots`` slots of 32 bytes:

    0  taken (u8)    1  answered (u8)    16  BLAKE2b-128 digest of the value (the key)

Rules: a value's slot is found by linear probing from its digest. Reading a
slot and the counts takes no lock (one load of one field each; a slot is
marked taken last, after its digest). Giving a value and marking it
answered happen under the table's lock (`sidecar.workers.mapped.FileLock`).
A value is given only while the given ones and the configured ones
(``reserved``) are fewer than the limit, so the slots (twice the limit)
never fill. Values are never taken back, as in one process.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from pathlib import Path

from sidecar.errors import ConfigError
from sidecar.metrics.labels import ANSWERED, NOT_GRANTED, UNANSWERED
from sidecar.workers.mapped import FileLock, create_file, owning

MAGIC = b"SCLABTAB"
VERSION = 1
HEADER = struct.Struct("=8sIIII")  # magic, version, slot size, slots, limit
HEADER_SIZE = 64
SLOT_SIZE = 32
DIGEST_BYTES = 16
MAX_LIMIT = 1 << 20

# Offsets: the counts (u32) in the header, the fields of a slot.
_GIVEN, _UNANSWERED = 32, 36
_TAKEN, _ANSWERED, _DIGEST = 0, 1, 16


def _digest(label: str) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=DIGEST_BYTES).digest()


class LabelTable:
    """The label values given to method names, in a file mapped by every worker.

    Not inherited across ``fork``: a child opens the table itself
    (`sidecar.workers.mapped.FileLock`).
    """

    def __init__(self, path: Path, fd: int, slots: int, limit: int) -> None:
        self.path = path
        self.slots = slots
        self.limit = limit
        self._fd = fd
        self._lock = FileLock(fd, f"label table {path}")
        self._map = mmap.mmap(fd, HEADER_SIZE + slots * SLOT_SIZE)
        self._bytes = memoryview(self._map)
        self._u32 = self._bytes.cast("I")

    @classmethod
    def create(cls, path: str | os.PathLike[str], limit: int) -> LabelTable:
        """A new, empty table at ``path`` for ``metrics.max_method_labels`` ``limit``
        (the supervisor, before workers start).

        Raises:
            ValueError: ``limit`` is not between 1 and MAX_LIMIT.
            OSError: the file cannot be written.
        """
        if not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {MAX_LIMIT}, not {limit}")
        slots = 2 * limit
        target = Path(path)
        header = HEADER.pack(MAGIC, VERSION, SLOT_SIZE, slots, limit)
        fd = create_file(target, HEADER_SIZE + slots * SLOT_SIZE, header)
        return owning(fd, lambda: cls(target, fd, slots, limit))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> LabelTable:
        """The table at ``path``, as `create` made it (a worker).

        Raises:
            ConfigError: the file is not a label table of this version.
            OSError: it cannot be opened (missing, not readable and writable).
        """
        target = Path(path)
        fd = os.open(target, os.O_RDWR)
        return owning(fd, lambda: cls(target, fd, *_check_header(target, fd)))

    # `sidecar.metrics.labels.Grants`

    def state(self, label: str) -> int:
        """`NOT_GRANTED`, `UNANSWERED` or `ANSWERED` (no lock)."""
        base = self._find(_digest(label))
        if base is None or not self._bytes[base + _TAKEN]:
            return NOT_GRANTED
        return ANSWERED if self._bytes[base + _ANSWERED] else UNANSWERED

    def grant(self, label: str, answered: bool, reserved: int) -> bool:
        """Give ``label`` a value if the limits allow, or settle the one it has.

        A refusal the counts already show takes no lock: a client calling
        invented names past the bounds costs the workers no lock per name.
        """
        digest = _digest(label)
        given, unanswered = self.counts()
        if reserved + given >= self.limit or (not answered and unanswered >= self.limit // 2):
            base = self._find(digest)
            if base is None or not self._bytes[base + _TAKEN]:
                return False
        self._lock.acquire()
        try:
            base = self._find(digest)
            if base is None:  # every slot taken: cannot happen (twice the limit)
                return False
            if self._bytes[base + _TAKEN]:
                if answered and not self._bytes[base + _ANSWERED]:
                    self._bytes[base + _ANSWERED] = 1
                    self._u32[_UNANSWERED // 4] -= 1
                return True
            given = self._u32[_GIVEN // 4]
            if reserved + given >= self.limit:
                return False
            if not answered:
                if self._u32[_UNANSWERED // 4] >= self.limit // 2:
                    return False
                self._u32[_UNANSWERED // 4] += 1
            self._bytes[base + _DIGEST : base + _DIGEST + DIGEST_BYTES] = digest
            self._bytes[base + _ANSWERED] = 1 if answered else 0
            self._bytes[base + _TAKEN] = 1  # last: a taken slot is a whole slot
            self._u32[_GIVEN // 4] = given + 1
            return True
        finally:
            self._lock.release()

    def has_room(self, reserved: int) -> bool:
        """Whether an answered name could still get a value (no lock)."""
        return reserved + self._u32[_GIVEN // 4] < self.limit

    def given(self) -> int:
        """How many values have been given, by every worker (no lock)."""
        return self._u32[_GIVEN // 4]

    # the rest

    def counts(self) -> tuple[int, int]:
        """(values given, of which not yet answered)."""
        return self._u32[_GIVEN // 4], self._u32[_UNANSWERED // 4]

    def close(self) -> None:
        """Unmap the file; the table must not be used after."""
        if self._map.closed:
            return
        for view in (self._u32, self._bytes):
            view.release()
        self._map.close()
        os.close(self._fd)

    def _find(self, digest: bytes) -> int | None:
        """The offset of ``digest``'s slot, or of the free slot it would take; None
        when every slot holds another value."""
        start = int.from_bytes(digest[:8], "little") % self.slots
        for i in range(self.slots):
            base = HEADER_SIZE + ((start + i) % self.slots) * SLOT_SIZE
            if not self._bytes[base + _TAKEN]:
                return base
            if self._bytes[base + _DIGEST : base + _DIGEST + DIGEST_BYTES] == digest:
                return base
        return None


def _check_header(path: Path, fd: int) -> tuple[int, int]:
    """(slots, limit) of the table open on ``fd``; ConfigError if it is not one."""
    size = os.fstat(fd).st_size
    header = os.pread(fd, HEADER.size, 0)
    if len(header) < HEADER.size or size < HEADER_SIZE:
        raise ConfigError(f"{path} is not a label table: {size} bytes, too short")
    magic, version, slot_size, slots, limit = HEADER.unpack(header)
    if magic != MAGIC:
        raise ConfigError(f"{path} is not a label table: magic {magic!r}, not {MAGIC!r}")
    if version != VERSION or slot_size != SLOT_SIZE:
        raise ConfigError(
            f"{path} is a label table of version {version} with {slot_size}-byte slots; "
            f"this sidecar reads version {VERSION} with {SLOT_SIZE}-byte slots"
        )
    if not 1 <= limit <= MAX_LIMIT or slots != 2 * limit or size != HEADER_SIZE + slots * SLOT_SIZE:
        raise ConfigError(
            f"{path} is a damaged label table: {slots} slots for limit {limit} in {size} bytes"
        )
    return int(slots), int(limit)
