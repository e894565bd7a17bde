"""What one fuzz input is: bytes to send on one connection, how to end it, what must come back.

An input is a pure function of ``(seed, index)`` (see `tests.fuzz.mutations.generate`),
so a run is reproducible input by input, whatever the concurrency, and any
finding can be replayed alone from its seed and index.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from tests.fuzz.wire import Transport

End = Literal["half_close", "hold", "reset"]


@dataclass(frozen=True)
class Step:
    """Bytes written in one go, after waiting ``delay`` seconds."""

    data: bytes
    delay: float = 0.0


@dataclass(frozen=True)
class Expected:
    """What the sidecar must send back on the input's connection (empty: anything).

    Attributes:
        replies: ``(seqid, name)`` of the calls whose replies must come first, in
            this order (a reply or an EXCEPTION message, but with that seqid and name).
        error_seqid: after those, the sidecar's own refusal must come before the
            connection is closed: an EXCEPTION message with this seqid, of type
            PROTOCOL_ERROR or INVALID_MESSAGE_TYPE (not an upstream's failure).
        http_400: the answer must be an HTTP 400 response.
    """

    replies: tuple[tuple[int, str], ...] = ()
    error_seqid: int | None = None
    http_400: bool = False

    @property
    def anything(self) -> bool:
        return not self.replies and self.error_seqid is None and not self.http_400


@dataclass(frozen=True)
class FuzzInput:
    """One input: a connection's worth of bytes.

    Attributes:
        index: position in the seed's sequence.
        kind: the mutation kind that made it.
        transport: how its messages are framed, and so how answers are read back
            (kinds that write frame prefixes of their own, lying ones, ignore it).
        steps: writes, in order.
        end: after the last write: ``half_close`` (shut down our sending side
            and wait for the sidecar to close), ``hold`` (keep the connection
            open and wait for the sidecar to close it, at the latest after
            ``idle_timeout``), or ``reset`` (abort with a TCP RST, wait for nothing).
        expected: what must come back (checked unless ``end`` is ``reset``).
        oracle: the name under which a failed expectation is counted.
        drip: a slowloris input: its steps are single bytes spaced in time.
    """

    index: int
    kind: str
    transport: Transport
    steps: tuple[Step, ...]
    end: End
    expected: Expected = field(default_factory=Expected)
    oracle: str = ""
    drip: bool = False

    @property
    def data(self) -> bytes:
        return b"".join(step.data for step in self.steps)

    @property
    def duration(self) -> float:
        """Seconds spent waiting between writes."""
        return sum(step.delay for step in self.steps)

    def digest(self) -> str:
        """A short hash of everything that defines the input (for determinism checks)."""
        h = hashlib.sha256(f"{self.kind}|{self.transport}|{self.end}|{self.expected}".encode())
        for step in self.steps:
            h.update(f"|{step.delay}|{len(step.data)}|".encode())
            h.update(step.data)
        return h.hexdigest()[:16]

    def describe(self, limit: int = 256) -> str:
        """Kind, framing, end and the first bytes in hex: a reproducer for a report."""
        data = self.data
        shown = data[:limit].hex()
        more = f" ... ({len(data)} bytes)" if len(data) > limit else f" ({len(data)} bytes)"
        return (
            f"#{self.index} {self.kind} {self.transport} end={self.end} "
            f"writes={len(self.steps)} delay={self.duration:.1f}s data={shown}{more}"
        )


@dataclass(frozen=True)
class Limits:
    """What the generator must know about the sidecar under test."""

    max_frame_size: int
    max_depth: int
    idle_timeout: float
    # The largest half-sent frame the mix announces (a fraction of max_frame_size
    # keeps a long run's traffic sane; the memory test announces the maximum).
    big_frame_size: int = 1 << 20
