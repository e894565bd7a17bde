"""The interop matrix and the two tables that decide what each cell expects.

A cell is library x protocol x transport x TLS, run twice: straight to the
upstream (does the client itself work?) and through a sidecar (does the
sidecar keep it working?).

- `LIBRARY_LACKS`: what a library cannot do at all. Such a cell is skipped
  on both paths with the reason given.
- Every other cell must pass on both paths: the sidecar has no gap of its own
  in this matrix (compact, THeader, TLS and Go's oneway-as-CALL included).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import pytest

Language = Literal["cpp", "java", "go", "node", "ruby"]
ProtocolName = Literal["binary", "compact"]
WireTransport = Literal["framed", "buffered", "header"]

LANGUAGES: tuple[Language, ...] = ("cpp", "java", "go", "node", "ruby")
PROTOCOLS: tuple[ProtocolName, ...] = ("binary", "compact")
WIRE_TRANSPORTS: tuple[WireTransport, ...] = ("framed", "buffered", "header")


@dataclass(frozen=True)
class Wire:
    """What goes over one connection."""

    protocol: ProtocolName
    transport: WireTransport
    tls: bool

    def __str__(self) -> str:
        return f"{self.protocol}-{self.transport}-{'tls' if self.tls else 'plain'}"


@dataclass(frozen=True)
class Cell:
    """One client library speaking one wire."""

    language: Language
    wire: Wire

    def __str__(self) -> str:
        return f"{self.language}-{self.wire}"


# (language, protocol, transport) -> why the library cannot run such a cell;
# "*" matches any protocol or transport. The first match gives the reason.
LIBRARY_LACKS: tuple[tuple[Language, str, str, str], ...] = (
    ("java", "*", "header", "Java libthrift 0.16 (Debian) has no THeader transport"),
    ("ruby", "*", "header", "Ruby thrift 0.14 (Debian) has no THeader transport"),
    (
        "node",
        "*",
        "header",
        "npm thrift 0.17: generated clients flush the transport, not THeaderProtocol, so no "
        "header is ever written (calls go out as unframed binary)",
    ),
    (
        "node",
        "compact",
        "*",
        "npm thrift 0.17: TCompactProtocol.readBool decodes every bool inside a list, set or "
        "map as false (it reads `.value` of the plain number readByte returns)",
    ),
)


def library_lacks(cell: Cell) -> str | None:
    """Why ``cell``'s library cannot run it at all (None: it can)."""
    for language, protocol, transport, reason in LIBRARY_LACKS:
        if (
            language == cell.language
            and protocol in ("*", cell.wire.protocol)
            and transport in ("*", cell.wire.transport)
        ):
            return reason
    return None


WIRES = [
    Wire(p, t, tls) for tls, p, t in itertools.product((False, True), PROTOCOLS, WIRE_TRANSPORTS)
]
CELLS = [Cell(lang, wire) for lang, wire in itertools.product(LANGUAGES, WIRES)]


def _library_skip(cell: Cell) -> list[pytest.MarkDecorator]:
    reason = library_lacks(cell)
    return [] if reason is None else [pytest.mark.skip(reason=reason)]


def direct_params() -> list[Any]:
    """Every cell, as straight to the upstream: only the library's gaps are skipped."""
    return [pytest.param(cell, id=str(cell), marks=_library_skip(cell)) for cell in CELLS]


def sidecar_params() -> list[Any]:
    """Every cell, through a sidecar: only the library's gaps are skipped."""
    return [pytest.param(cell, id=str(cell), marks=_library_skip(cell)) for cell in CELLS]
