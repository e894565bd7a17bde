"""Which protocol and transport a client speaks, from its first bytes; the auto decoder.

Rules of this file (`detect`), in order, on the first bytes of a connection:

| first bytes                               | result                                   |
|-------------------------------------------|------------------------------------------|
| ``0x82``, version 1                       | compact, buffered                        |
| ``0x80 0x01``                             | binary strict, buffered                  |
| ``[1,"``                                  | JSON, buffered: refused, kind ``json``   |
| an HTTP method                            | refused, kind ``http``                   |
| L, then ``0x80 0x01``                     | binary strict, framed                    |
| L, then ``0x82``, version 1               | compact, framed                          |
| L, then ``0x0F 0xFF``                     | THeader                                  |
| L, then L-4, then ``0x0F 0xFF``           | THeader inside a frame                   |
| L, then ``[1,"``                          | JSON, framed: refused, kind ``json``     |
| L, then a non-strict CALL/ONEWAY envelope | binary non-strict, framed                |
| a non-strict CALL/ONEWAY envelope         | binary non-strict, buffered              |
| anything else                             | refused, kind ``garbage``                |

(L is a 4-byte frame length.) A JSON client is refused only once its envelope
is read, so that the error carries the seqid it can be answered with. The
decoder that acts on the result is in auto.py.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import PROTOCOL_ID as COMPACT_ID
from sidecar.protocol.compact import VERSION as COMPACT_VERSION
from sidecar.protocol.compact import VERSION_MASK as COMPACT_VERSION_MASK
from sidecar.protocol.envelope import MAX_NAME_LENGTH, MessageType, Protocol
from sidecar.protocol.message import Transport
from sidecar.protocol.theader import MAGIC_BYTES, PROTOCOL_IDS
from sidecar.protocol.tjson import JSON_START, parse_json_envelope, unsupported_json

_I32: Final = struct.Struct(">i")
_HTTP_METHODS: Final = (
    b"GET ",
    b"POST",
    b"PUT ",
    b"HEAD",
    b"DELE",
    b"OPTI",
    b"PATC",
    b"PRI ",
    b"CONN",
)
# Message types a non-strict envelope may carry: every valid one, so that a client
# whose first message is a REPLY is answered (INVALID_MESSAGE_TYPE), not cut off.
_NONSTRICT_TYPES: Final = frozenset(int(t) for t in MessageType)
# Bytes kept while deciding, at most (a non-strict name, or a JSON envelope).
MAX_PREFIX: Final = MAX_NAME_LENGTH + 16


class Detected(NamedTuple):
    """What a connection speaks."""

    transport: Transport
    protocol: Protocol


def detect(prefix: bytes | bytearray) -> Detected | None:
    """Tell from the first bytes of a client connection its transport and protocol.

    Returns:
        What the client speaks, or None when more bytes are needed to decide.

    Raises:
        RemoteProtocolError: the client does not speak a protocol the sidecar
            proxies (kind ``json`` for the JSON protocol: an
            `tjson.UnsupportedProtocolError` that can answer it).
    """
    n = len(prefix)
    if n == 0:
        return None
    first = prefix[0]
    if first == COMPACT_ID:
        return _compact_at(prefix, 0, Transport.BUFFERED)
    if first == 0x80:
        if n < 2:
            return None
        if prefix[1] == 0x01:
            return Detected(Transport.BUFFERED, Protocol.BINARY)
        raise RemoteProtocolError("not Thrift binary protocol (bad version bytes)", kind="garbage")
    if _starts(prefix, 0, JSON_START):
        return _json_at(prefix, 0)
    if n < 2:
        return None
    if n >= 4 and bytes(prefix[:4]) in _HTTP_METHODS:
        raise RemoteProtocolError(
            "an HTTP request arrived on the Thrift port (use the admin port for HTTP)",
            kind="http",
        )
    if first & 0x80:
        raise RemoteProtocolError("not Thrift binary protocol", kind="garbage")
    if n < 6:
        return None
    length = _I32.unpack_from(prefix, 0)[0]
    marker = bytes(prefix[4:6])
    if marker == b"\x80\x01":
        return Detected(Transport.FRAMED, Protocol.BINARY)
    if prefix[4] == COMPACT_ID:
        return _compact_at(prefix, 4, Transport.FRAMED)
    if marker == MAGIC_BYTES:
        return _theader_at(prefix, 4)
    if _starts(prefix, 4, JSON_START):
        return _json_at(prefix, 4)
    if n >= 8 and _I32.unpack_from(prefix, 4)[0] == length - 4:
        # A frame whose content starts with its own length: THeader inside a frame?
        if n < 10:
            return None
        if prefix[8:10] == MAGIC_BYTES:
            return _theader_at(prefix, 8)
    framed = _nonstrict_call_at(prefix, 4, length)
    if framed is None:
        return None
    if framed:
        return Detected(Transport.FRAMED, Protocol.BINARY)
    buffered = _nonstrict_call_at(prefix, 0, None)
    if buffered is None:
        return None
    if buffered:
        return Detected(Transport.BUFFERED, Protocol.BINARY)
    raise RemoteProtocolError("not Thrift binary protocol", kind="garbage")


def detect_transport(prefix: bytes | bytearray) -> Transport | None:
    """The transport part of `detect`, for binary-protocol connections only.

    Raises:
        RemoteProtocolError: as `detect`; also kind ``compact`` for the compact
            protocol and ``unsupported`` for THeader.
    """
    found = detect(prefix)
    if found is None:
        return None
    return binary_only(found).transport


def binary_only(found: Detected) -> Detected:
    """``found`` when it is binary framed/buffered; else the error today's proxy counts."""
    if found.transport is Transport.THEADER:
        raise RemoteProtocolError("THeader transport is not supported", kind="unsupported")
    if found.protocol is Protocol.COMPACT:
        raise RemoteProtocolError("compact protocol is not supported", kind="compact")
    return found


def _starts(prefix: bytes | bytearray, at: int, magic: bytes) -> bool:
    """Do the bytes at ``at`` begin with ``magic``, as far as they go (at least one byte)?"""
    seen = bytes(prefix[at : at + len(magic)])
    return bool(seen) and magic.startswith(seen)


def _compact_at(prefix: bytes | bytearray, at: int, transport: Transport) -> Detected | None:
    if len(prefix) < at + 2:
        return None
    if prefix[at + 1] & COMPACT_VERSION_MASK != COMPACT_VERSION:
        raise RemoteProtocolError("not Thrift compact protocol (bad version)", kind="garbage")
    return Detected(transport, Protocol.COMPACT)


def _theader_at(prefix: bytes | bytearray, at: int) -> Detected | None:
    """A THeader frame's magic is at ``at``: its payload protocol is the first header byte."""
    id_at = at + 10
    if _I32.unpack_from(prefix, at - 4)[0] < 11:
        raise RemoteProtocolError("THeader frame too short for its header", kind="garbage")
    if len(prefix) <= id_at:
        return None
    protocol = PROTOCOL_IDS.get(prefix[id_at])
    if protocol is None:
        raise RemoteProtocolError(
            f"THeader payload protocol {prefix[id_at]} is not supported", kind="unsupported"
        )
    return Detected(Transport.THEADER, protocol)


def _json_at(prefix: bytes | bytearray, at: int) -> Detected | None:
    if len(prefix) < at + len(JSON_START):
        return None
    envelope = parse_json_envelope(prefix, at)
    if envelope is None:
        frame_end = 4 + _I32.unpack_from(prefix, 0)[0] if at == 4 else None
        if frame_end is None or len(prefix) < frame_end:
            return None
    raise unsupported_json(envelope, framed=at == 4)


def _nonstrict_call_at(prefix: bytes | bytearray, at: int, frame_length: int | None) -> bool | None:
    """Does a non-strict envelope start at ``at``? None: too few bytes to say."""
    if len(prefix) < at + 4:
        return None
    name_len = _I32.unpack_from(prefix, at)[0]
    if not 0 <= name_len <= MAX_NAME_LENGTH:  # an empty name is legal, and answered
        return False
    if frame_length is not None and name_len + 9 > frame_length:
        return False  # the envelope would not fit in the frame
    type_at = at + 4 + name_len
    if len(prefix) <= type_at:
        return None
    return prefix[type_at] in _NONSTRICT_TYPES


def may_be_json(prefix: bytes | bytearray) -> bool:
    """Could these be the first bytes of a JSON-protocol message, buffered or framed?"""
    return _starts(prefix, 0, JSON_START) or _starts(prefix, 4, JSON_START)
