"""TApplicationException: encode the ones we answer with, read the ones upstreams send.

On the wire it is a struct in an EXCEPTION message (Thrift spec, TApplicationException):

    field 1  message  string
    field 2  type     i32      (`ApplicationExceptionType`)

in the binary or the compact protocol, as the client speaks.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import encode_compact_header, encode_varint, read_varint, zigzag
from sidecar.protocol.compact_skip import CType, compact_struct_end
from sidecar.protocol.envelope import MessageType, Protocol, encode_header, shown_name
from sidecar.protocol.fields import iter_compact_fields
from sidecar.protocol.skip import TType, struct_end, value_end

_I16: Final = struct.Struct(">h")
_I32: Final = struct.Struct(">i")


class ApplicationExceptionType(IntEnum):
    """TApplicationException type codes (Apache Thrift lib/py/src/Thrift.py)."""

    UNKNOWN = 0
    UNKNOWN_METHOD = 1
    INVALID_MESSAGE_TYPE = 2
    WRONG_METHOD_NAME = 3
    BAD_SEQUENCE_ID = 4
    MISSING_RESULT = 5
    INTERNAL_ERROR = 6
    PROTOCOL_ERROR = 7
    INVALID_TRANSFORM = 8
    INVALID_PROTOCOL = 9
    UNSUPPORTED_CLIENT_TYPE = 10


def encode_exception_struct(
    exc_type: int, message: str, protocol: Protocol = Protocol.BINARY
) -> bytes:
    """The TApplicationException struct alone (no envelope).

    The message is text for the client: one that holds a method name that is
    not UTF-8 goes as `shown_name` writes it, never as bytes that are not UTF-8.
    """
    raw = shown_name(message).encode("utf-8")
    if protocol is Protocol.COMPACT:
        return b"".join(
            (
                bytes(((1 << 4) | CType.BINARY,)),
                encode_varint(len(raw)),
                raw,
                bytes(((1 << 4) | CType.I32,)),
                encode_varint(zigzag(int(exc_type), 32)),
                b"\x00",
            )
        )
    return b"".join(
        (
            bytes((TType.STRING,)),
            _I16.pack(1),
            _I32.pack(len(raw)),
            raw,
            bytes((TType.I32,)),
            _I16.pack(2),
            _I32.pack(int(exc_type)),
            b"\x00",
        )
    )


def encode_application_exception(
    name: str,
    seqid: int,
    exc_type: int,
    message: str,
    strict: bool = True,
    protocol: Protocol = Protocol.BINARY,
) -> bytes:
    """A whole EXCEPTION message (envelope + struct), unframed.

    Args:
        name: method name for the envelope (clients such as Go's check it
            against the bare method name they called).
        seqid: the client's sequence id.
        exc_type: an `ApplicationExceptionType`.
        message: human-readable text for the client.
        strict: strict or non-strict envelope, as the client used (binary only).
        protocol: the client's protocol.
    """
    if protocol is Protocol.COMPACT:
        envelope = encode_compact_header(name, MessageType.EXCEPTION, seqid)
    else:
        envelope = encode_header(name, MessageType.EXCEPTION, seqid, strict)
    return envelope + encode_exception_struct(exc_type, message, protocol)


def parse_application_exception(
    body: bytes | bytearray | memoryview, protocol: Protocol = Protocol.BINARY
) -> tuple[int, str]:
    """Read (type, message) from a TApplicationException struct.

    Unknown fields are skipped; a missing type reads as UNKNOWN, a missing
    message as "".

    Raises:
        RemoteProtocolError: the struct is malformed.
    """
    if protocol is Protocol.COMPACT:
        return _parse_compact(body)
    exc_type = int(ApplicationExceptionType.UNKNOWN)
    message = ""
    end = struct_end(body)
    pos = 0
    while pos < end:
        ftype = body[pos]
        if ftype == TType.STOP:
            break
        fid = _I16.unpack_from(body, pos + 1)[0]
        pos += 3
        if fid == 1 and ftype == TType.STRING:
            length = _I32.unpack_from(body, pos)[0]
            message = bytes(body[pos + 4 : pos + 4 + length]).decode("utf-8", "replace")
            pos += 4 + length
        elif fid == 2 and ftype == TType.I32:
            exc_type = _I32.unpack_from(body, pos)[0]
            pos += 4
        else:
            pos = value_end(body, pos, ftype)
    return exc_type, message


def _parse_compact(body: bytes | bytearray | memoryview) -> tuple[int, str]:
    """`parse_application_exception` for a compact struct: walk the fields with the skipper."""
    exc_type = int(ApplicationExceptionType.UNKNOWN)
    message = ""
    compact_struct_end(body)
    for fid, ctype, at in iter_compact_fields(body):
        if fid == 1 and ctype == CType.BINARY:
            read = read_varint(body, at, len(body), 5)
            if read is None:  # pragma: no cover - compact_struct_end saw the whole struct
                raise RemoteProtocolError("truncated string", kind="truncated")
            length, at = read
            message = bytes(body[at : at + length]).decode("utf-8", "replace")
        elif fid == 2 and ctype == CType.I32:
            read = read_varint(body, at, len(body), 5)
            if read is None:  # pragma: no cover - compact_struct_end saw the whole struct
                raise RemoteProtocolError("truncated i32", kind="truncated")
            exc_type = (read[0] >> 1) ^ -(read[0] & 1)
    return exc_type, message
