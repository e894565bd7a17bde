"""Re-encode a whole message between the binary and compact protocols, without an IDL.

Both protocols are self-describing: every field, element and key carries its
type, so a struct can be walked value by value and each value written in the
other encoding. The walk is a loop over an explicit stack (no recursion), with
the same limits as the skippers: ``max_depth`` levels of structs and
containers, and an output of at most ``max_size`` bytes.

What does not survive the trip: an empty map read from compact has no key and
value types (compact writes a lone 0), so the binary map says 0 and 0; readers
do not look at the types of an empty map. Bytes after the outermost STOP (a
frame may carry some) are dropped.
"""

from __future__ import annotations

import struct
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import (
    encode_compact_header,
    encode_varint,
    parse_compact_header,
    zigzag,
)
from sidecar.protocol.envelope import MessageHeader, Protocol, encode_header, identify, parse_header
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, TType
from sidecar.protocol.transcode_read import BinaryReader, CompactReader, Reader

# Binary type id <-> compact type id (bool is 1 inside containers; fields carry its value).
TO_COMPACT: Final[dict[int, int]] = {
    TType.BOOL: 1,
    TType.BYTE: 3,
    TType.I16: 4,
    TType.I32: 5,
    TType.I64: 6,
    TType.DOUBLE: 7,
    TType.STRING: 8,
    TType.LIST: 9,
    TType.SET: 10,
    TType.MAP: 11,
    TType.STRUCT: 12,
    TType.UUID: 13,
}
_STRUCT, _SEQ, _MAP = range(3)
_I16: Final = struct.Struct(">h")
_I32: Final = struct.Struct(">i")
_I64: Final = struct.Struct(">q")
_HEADERS: Final = {Protocol.BINARY: parse_header, Protocol.COMPACT: parse_compact_header}


def transcode_message(
    payload: bytes | bytearray | memoryview,
    source: Protocol,
    target: Protocol,
    *,
    strict: bool = True,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_size: int = 1 << 62,
) -> bytes:
    """One whole message (envelope and struct, unframed) re-encoded in ``target``.

    Args:
        payload: the message as it arrived, without frame prefix.
        source: its protocol.
        target: the protocol to write; the same as ``source`` copies the bytes.
        strict: the binary envelope form to write (the client's, for replies).
        max_depth: nesting limit.
        max_size: largest output accepted.

    Raises:
        RemoteProtocolError: the message is malformed, too deep, cut short
            (kind ``truncated``) or its re-encoding exceeds ``max_size``.
    """
    header = _HEADERS[source](payload, 0)
    if header is None:
        raise RemoteProtocolError("message shorter than its envelope", kind="truncated")
    if source is target and (source is Protocol.COMPACT or header.strict == strict):
        return bytes(payload)
    out = bytearray(envelope_in(header, target, strict))
    reader: Reader = (
        CompactReader(payload, header.body_offset)
        if source is Protocol.COMPACT
        else BinaryReader(payload, header.body_offset)
    )
    try:
        transcode_struct(reader, out, target, max_depth, max_size)
    except RemoteProtocolError as exc:
        identify(exc, header)
        raise
    return bytes(out)


def envelope_in(header: MessageHeader, target: Protocol, strict: bool = True) -> bytes:
    """The envelope of ``header`` written in ``target``."""
    if target is Protocol.COMPACT:
        return encode_compact_header(header.name, header.type, header.seqid)
    return encode_header(header.name, header.type, header.seqid, strict)


def transcode_struct(
    reader: Reader, out: bytearray, target: Protocol, max_depth: int, max_size: int
) -> None:
    """Walk one struct from ``reader`` and append it to ``out`` in ``target``."""
    compact = target is Protocol.COMPACT
    # Frames: [_STRUCT, last field id written], [_SEQ, type, left], [_MAP, ktype, vtype, left].
    stack: list[list[int]] = [[_STRUCT, 0]]
    reader.struct_begin()
    while stack:
        if len(out) > max_size:
            raise RemoteProtocolError(
                f"message larger than the {max_size}-byte limit", kind="oversized"
            )
        frame = stack[-1]
        kind = frame[0]
        if kind == _STRUCT:
            found = reader.field()
            if found is None:
                reader.struct_end()
                out.append(0)
                stack.pop()
                continue
            vtype, fid = found
            if compact:
                ctype = TO_COMPACT.get(vtype, 3)
                if vtype == TType.BOOL:
                    ctype = 1 if reader.bool() else 2
                delta = fid - frame[1]
                if 0 < delta <= 15:
                    out.append((delta << 4) | ctype)
                else:
                    out.append(ctype)
                    out += encode_varint(zigzag(fid, 16))
                frame[1] = fid
                if vtype == TType.BOOL:
                    continue
            else:
                out.append(vtype)
                out += _I16.pack(fid)
        elif kind == _SEQ:
            if frame[2] == 0:
                stack.pop()
                continue
            frame[2] -= 1
            vtype = frame[1]
        else:
            left = frame[3]
            if left == 0:
                stack.pop()
                continue
            frame[3] = left - 1
            vtype = frame[1] if left % 2 == 0 else frame[2]
        # One value of vtype.
        if vtype == TType.STRUCT:
            if len(stack) >= max_depth:
                raise _too_deep(max_depth)
            reader.struct_begin()
            stack.append([_STRUCT, 0])
        elif vtype == TType.LIST or vtype == TType.SET:
            if len(stack) >= max_depth:
                raise _too_deep(max_depth)
            etype, count = reader.seq_begin()
            if compact:
                ce = TO_COMPACT.get(etype, 3)  # an empty container of an unknown type
                if count < 15:
                    out.append((count << 4) | ce)
                else:
                    out.append(0xF0 | ce)
                    out += encode_varint(count)
            else:
                out.append(etype)
                out += _I32.pack(count)
            stack.append([_SEQ, etype, count])
        elif vtype == TType.MAP:
            if len(stack) >= max_depth:
                raise _too_deep(max_depth)
            ktype, vt, count = reader.map_begin()
            if compact:
                out += encode_varint(count)
                if count:
                    out.append((TO_COMPACT[ktype] << 4) | TO_COMPACT[vt])
            else:
                out.append(ktype)
                out.append(vt)
                out += _I32.pack(count)
            stack.append([_MAP, ktype, vt, 2 * count])
        else:
            _scalar(reader, out, vtype, compact)


def _scalar(reader: Reader, out: bytearray, vtype: int, compact: bool) -> None:
    """Copy one scalar value of binary type ``vtype``."""
    if vtype == TType.BOOL:
        truth = reader.bool()
        out.append((1 if truth else 2) if compact else (1 if truth else 0))
    elif vtype == TType.BYTE or vtype == TType.UUID:
        out += reader.raw(1 if vtype == TType.BYTE else 16)
    elif vtype == TType.DOUBLE:
        big_endian = reader.double_be()
        out += big_endian[::-1] if compact else big_endian
    elif vtype == TType.STRING:
        data = reader.string()
        out += encode_varint(len(data)) if compact else _I32.pack(len(data))
        out += data
    else:
        bits = {TType.I16: 16, TType.I32: 32, TType.I64: 64}[vtype]
        value = reader.integer(bits)
        if compact:
            out += encode_varint(zigzag(value, bits))
        else:
            out += (_I16 if bits == 16 else _I32 if bits == 32 else _I64).pack(value)


def _too_deep(max_depth: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        f"structs and containers nested deeper than {max_depth}", kind="too_deep"
    )
