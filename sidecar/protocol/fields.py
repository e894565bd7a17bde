"""The top-level fields of a struct, in either protocol, without decoding their values.

What the proxy reads of a reply is the id of the result struct's first field
(design §2): 0 is success, >= 1 a declared exception, no field at all a void
success. `first_field_id` answers that for binary and compact bodies;
`iter_compact_fields` walks a compact struct's fields for readers such as the
TApplicationException parser; `mistyped_field` compares a struct's top-level
field types with those an IDL declares (a call's arguments, after it failed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import read_varint, unzigzag
from sidecar.protocol.compact_skip import CType, compact_value_end
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.skip import FIXED_SIZE, TType, value_end

_I16: Final = struct.Struct(">h")
# Type ids a binary field may have on the wire (skip.py's table); any other first byte
# of a struct is garbage.
BINARY_FIELD_TYPES: Final = frozenset(FIXED_SIZE) | {
    TType.STRING,
    TType.STRUCT,
    TType.MAP,
    TType.SET,
    TType.LIST,
}
_COMPACT_FIELD_TYPES: Final = frozenset(range(1, 14))
# The binary type id of each compact one (both bool ids are a bool).
_TTYPE_OF_COMPACT: Final[dict[int, int]] = {
    CType.BOOL_TRUE: TType.BOOL,
    CType.BOOL_FALSE: TType.BOOL,
    CType.BYTE: TType.BYTE,
    CType.I16: TType.I16,
    CType.I32: TType.I32,
    CType.I64: TType.I64,
    CType.DOUBLE: TType.DOUBLE,
    CType.BINARY: TType.STRING,
    CType.LIST: TType.LIST,
    CType.SET: TType.SET,
    CType.MAP: TType.MAP,
    CType.STRUCT: TType.STRUCT,
    CType.UUID: TType.UUID,
}
TYPE_NAMES: Final[dict[int, str]] = {
    TType.BOOL: "bool",
    TType.BYTE: "byte",
    TType.DOUBLE: "double",
    TType.I16: "i16",
    TType.I32: "i32",
    TType.I64: "i64",
    TType.STRING: "string",
    TType.STRUCT: "struct",
    TType.MAP: "map",
    TType.SET: "set",
    TType.LIST: "list",
    TType.UUID: "uuid",
}


def _compact_field_header(
    data: bytes | bytearray | memoryview, pos: int, last_id: int
) -> tuple[int, int, int] | None:
    """(field id, compact type, offset of the value) of the field header at ``pos``; None at STOP.

    Raises:
        RemoteProtocolError: unknown type or a header cut short.
    """
    if pos >= len(data):
        raise RemoteProtocolError("struct ends before its STOP", kind="truncated")
    byte = data[pos]
    if byte == CType.STOP:
        return None
    ctype = byte & 0x0F
    if ctype not in _COMPACT_FIELD_TYPES:
        raise RemoteProtocolError(f"unknown compact field type {ctype}", kind="garbage")
    delta = byte >> 4
    if delta:
        return last_id + delta, ctype, pos + 1
    read = read_varint(data, pos + 1, len(data), 3)
    if read is None:
        raise RemoteProtocolError("field header cut short", kind="truncated")
    return unzigzag(read[0]), ctype, read[1]


def iter_compact_fields(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int]]:
    """Yield (field id, compact type, value offset) of each top-level field of a compact struct.

    A bool field's value is its type (BOOL_TRUE or BOOL_FALSE). Values are
    skipped by the generator after each yield.

    Raises:
        RemoteProtocolError: the struct is malformed or cut short.
    """
    pos = 0
    last_id = 0
    while True:
        found = _compact_field_header(data, pos, last_id)
        if found is None:
            return
        fid, ctype, at = found
        yield fid, ctype, at
        last_id = fid
        pos = compact_value_end(data, at, ctype)


def first_field_id(
    body: bytes | bytearray | memoryview, protocol: Protocol = Protocol.BINARY
) -> int | None:
    """The id of a struct's first field, or None for an empty struct (a void result).

    Only the first field header is read; the rest of the struct is not checked.

    Raises:
        RemoteProtocolError: the bytes cannot begin a struct of ``protocol``.
    """
    if not len(body):
        raise RemoteProtocolError("empty result struct", kind="truncated")
    if protocol is Protocol.COMPACT:
        found = _compact_field_header(body, 0, 0)
        return None if found is None else found[0]
    if body[0] == TType.STOP:
        return None
    if body[0] not in BINARY_FIELD_TYPES:
        raise RemoteProtocolError(f"unknown field type {body[0]}", kind="garbage")
    if len(body) < 3:
        raise RemoteProtocolError("field header cut short", kind="truncated")
    fid: int = _I16.unpack_from(body, 1)[0]
    return fid


def _binary_field_types(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int]]:
    """(field id, type) of each top-level field of a binary struct."""
    pos = 0
    while True:
        if pos >= len(data):
            raise RemoteProtocolError("struct cut short", kind="truncated")
        ftype = data[pos]
        if ftype == TType.STOP:
            return
        if ftype not in BINARY_FIELD_TYPES:
            raise RemoteProtocolError(f"unknown field type {ftype}", kind="garbage")
        if pos + 3 > len(data):
            raise RemoteProtocolError("field header cut short", kind="truncated")
        yield _I16.unpack_from(data, pos + 1)[0], ftype
        pos = value_end(data, pos + 3, ftype)


def mistyped_field(
    body: bytes | bytearray | memoryview, protocol: Protocol, declared: Mapping[int, int]
) -> tuple[int, int] | None:
    """The first top-level field whose type is not the one ``declared`` for its id, as
    (field id, its type on the wire as a binary type id), or None. Fields
    ``declared`` does not name are not compared (an upstream skips them).

    Raises:
        RemoteProtocolError: the struct is malformed (walk it first: `validate`).
    """
    if protocol is Protocol.COMPACT:
        for fid, ctype, _ in iter_compact_fields(body):
            ttype = _TTYPE_OF_COMPACT[ctype]
            want = declared.get(fid)
            if want is not None and want != ttype:
                return fid, ttype
        return None
    for fid, ttype in _binary_field_types(body):
        want = declared.get(fid)
        if want is not None and want != ttype:
            return fid, ttype
    return None
