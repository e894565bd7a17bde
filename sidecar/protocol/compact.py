"""The Thrift compact protocol's envelope and integers: read, write, patch the seqid.

Wire format (Apache Thrift doc/specs/thrift-compact-protocol.md):

    0x82  (type << 5 | version 1)  varint seqid  varint name_len  name  struct...

Integers are unsigned LEB128 varints; i16/i32/i64 values are zigzag-encoded
first. The seqid is an i32 written as the varint of its unsigned 32-bit value
(1 to 5 bytes), so changing it can change the message's length: `replace_seqid`
returns the new bytes and the caller fixes any frame length.
"""

from __future__ import annotations

from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.envelope import (
    MAX_NAME_LENGTH,
    NAME_ERRORS,
    TYPE_BY_VALUE,
    MessageHeader,
    MessageType,
    NameCache,
    Protocol,
    decode_name,
)

PROTOCOL_ID: Final = 0x82
VERSION: Final = 1
VERSION_MASK: Final = 0x1F
TYPE_SHIFT: Final = 5
# Longest varint of a 32-bit and of a 64-bit value.
MAX_VARINT32: Final = 5
MAX_VARINT64: Final = 10


def read_varint(
    data: bytes | bytearray | memoryview, pos: int, end: int, max_bytes: int = MAX_VARINT64
) -> tuple[int, int] | None:
    """Read an unsigned varint at ``data[pos]``: (value, position after it), or None if cut short.

    Raises:
        RemoteProtocolError: longer than ``max_bytes``.
    """
    value = 0
    shift = 0
    for at in range(pos, pos + max_bytes):
        if at >= end:
            return None
        byte = data[at]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at + 1
        shift += 7
    raise RemoteProtocolError(f"varint longer than {max_bytes} bytes", kind="garbage")


def encode_varint(value: int) -> bytes:
    """An unsigned varint (``value`` >= 0)."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def zigzag(value: int, bits: int) -> int:
    """Signed to zigzag (``bits`` is 16, 32 or 64)."""
    return ((value << 1) ^ (value >> (bits - 1))) & ((1 << bits) - 1)


def unzigzag(value: int) -> int:
    """Zigzag to signed."""
    return (value >> 1) ^ -(value & 1)


def encode_seqid(seqid: int) -> bytes:
    """The varint of a seqid (an i32, written as its unsigned 32-bit value)."""
    return encode_varint(seqid & 0xFFFFFFFF)


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


def parse_compact_header(
    data: bytes | bytearray | memoryview, start: int = 0, names: NameCache | None = None
) -> MessageHeader | None:
    """Read the compact envelope of the message that begins at ``data[start]``.

    ``names``: the reading connection's last name (`NameCache`), or None.

    Returns:
        The header (offsets relative to ``start``, ``protocol`` COMPACT, ``strict``
        True), or None when more bytes are needed.

    Raises:
        RemoteProtocolError: the bytes cannot be a compact envelope.
    """
    end = len(data)
    if end - start < 2:
        return None
    if data[start] != PROTOCOL_ID:
        raise RemoteProtocolError(
            f"bad compact protocol id 0x{data[start]:02x}", kind="bad_version"
        )
    version_type = data[start + 1]
    if version_type & VERSION_MASK != VERSION:
        raise RemoteProtocolError(
            f"bad compact protocol version {version_type & VERSION_MASK}", kind="bad_version"
        )
    seqid_at = start + 2
    read = read_varint(data, seqid_at, end, MAX_VARINT32)
    if read is None:
        return None
    raw_seqid, name_len_at = read
    seqid = _signed32(raw_seqid)
    read = read_varint(data, name_len_at, end, MAX_VARINT32)
    if read is None:
        return None
    name_len, name_at = read
    if name_len > MAX_NAME_LENGTH:
        raise RemoteProtocolError(f"implausible method name length {name_len}", kind="garbage")
    body_at = name_at + name_len
    if end < body_at:
        return None
    # Any bytes, as `sidecar.protocol.envelope.parse_header` reads them (its docstring).
    raw = data[name_at:body_at]
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    name = decode_name(raw) if names is None else names.decode(raw)
    message_type = TYPE_BY_VALUE[version_type >> TYPE_SHIFT]
    if message_type is None:
        raise RemoteProtocolError(
            f"unknown message type {version_type >> TYPE_SHIFT}",
            kind="bad_type",
            seqid=seqid,
            name=name,
        )
    return MessageHeader(
        name,
        message_type,
        seqid,
        True,
        seqid_at - start,
        body_at - start,
        Protocol.COMPACT,
        name_len_at - seqid_at,
    )


def encode_compact_header(name: str, mtype: MessageType, seqid: int) -> bytes:
    """Encode a compact envelope; the struct bytes go right after it (``name`` as
    `sidecar.protocol.envelope.name_bytes` gives it: the bytes that came)."""
    raw = name.encode("utf-8", NAME_ERRORS)
    return b"".join(
        (
            bytes((PROTOCOL_ID, (int(mtype) << TYPE_SHIFT) | VERSION)),
            encode_seqid(seqid),
            encode_varint(len(raw)),
            raw,
        )
    )


def replace_seqid(buf: bytearray, header: MessageHeader, start: int, seqid: int) -> int:
    """Write ``seqid`` over the compact seqid of the message at ``buf[start]``, in place.

    The varint may grow or shrink; the bytes after it move.

    Returns:
        The change in length (new size minus old size of the seqid varint).
    """
    new = encode_seqid(seqid)
    at = start + header.seqid_offset
    buf[at : at + header.seqid_size] = new
    return len(new) - header.seqid_size
