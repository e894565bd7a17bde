"""Value readers for the transcoder: one per protocol, the same interface, binary type ids.

A reader walks a buffer from an offset; each method reads one item and
advances. Types are reported as binary-protocol ids (`skip.TType`) whatever
the encoding, so the transcoder has one vocabulary. Every read checks the
bytes are there (kind ``truncated`` if not) and every type id and size is
checked before use (kind ``garbage``).
"""

from __future__ import annotations

import struct
from typing import Final, Protocol

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import MAX_VARINT32, read_varint, unzigzag
from sidecar.protocol.skip import FIXED_SIZE, TType

_KNOWN: Final = frozenset(FIXED_SIZE) | {
    TType.STRING,
    TType.STRUCT,
    TType.MAP,
    TType.SET,
    TType.LIST,
}
# Compact type id -> binary type id.
FROM_COMPACT: Final[dict[int, int]] = {
    1: TType.BOOL,
    2: TType.BOOL,
    3: TType.BYTE,
    4: TType.I16,
    5: TType.I32,
    6: TType.I64,
    7: TType.DOUBLE,
    8: TType.STRING,
    9: TType.LIST,
    10: TType.SET,
    11: TType.MAP,
    12: TType.STRUCT,
    13: TType.UUID,
}
_MAX_SIZE: Final = 0x7FFFFFFF
_SEQ: Final = struct.Struct(">bi")
_MAP: Final = struct.Struct(">bbi")
_FIELD: Final = struct.Struct(">bh")
_INTS: Final = {16: struct.Struct(">h"), 32: struct.Struct(">i"), 64: struct.Struct(">q")}


class Reader(Protocol):
    """What the transcoder reads with."""

    def struct_begin(self) -> None: ...
    def struct_end(self) -> None: ...
    def field(self) -> tuple[int, int] | None: ...
    def seq_begin(self) -> tuple[int, int]: ...
    def map_begin(self) -> tuple[int, int, int]: ...
    def bool(self) -> bool: ...
    def raw(self, size: int) -> bytes: ...
    def double_be(self) -> bytes: ...
    def string(self) -> bytes: ...
    def integer(self, bits: int) -> int: ...


def _truncated() -> RemoteProtocolError:
    return RemoteProtocolError("struct ends past the end of the data", kind="truncated")


class _Base:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)

    def raw(self, size: int) -> bytes:
        at = self.pos
        if at + size > self.end:
            raise _truncated()
        self.pos = at + size
        return bytes(self.data[at : at + size])

    def _size(self, size: int, least: int) -> int:
        if size < 0 or size > _MAX_SIZE:
            raise RemoteProtocolError(f"negative size {size}", kind="garbage")
        if self.pos + size * least > self.end:
            raise _truncated()
        return size


class BinaryReader(_Base):
    """Reads the binary protocol."""

    __slots__ = ()

    def struct_begin(self) -> None:
        pass

    def struct_end(self) -> None:
        pass

    def field(self) -> tuple[int, int] | None:
        if self.pos >= self.end:
            raise _truncated()
        if self.data[self.pos] == TType.STOP:
            self.pos += 1
            return None
        if self.pos + 3 > self.end:
            raise _truncated()
        ftype, fid = _FIELD.unpack_from(self.data, self.pos)
        if ftype not in _KNOWN:
            raise RemoteProtocolError(f"unknown field type {ftype}", kind="garbage")
        self.pos += 3
        return ftype, fid

    def seq_begin(self) -> tuple[int, int]:
        if self.pos + 5 > self.end:
            raise _truncated()
        etype, count = _SEQ.unpack_from(self.data, self.pos)
        self.pos += 5
        return _element(etype, count), self._size(count, 1)

    def map_begin(self) -> tuple[int, int, int]:
        if self.pos + 6 > self.end:
            raise _truncated()
        ktype, vtype, count = _MAP.unpack_from(self.data, self.pos)
        self.pos += 6
        return _element(ktype, count), _element(vtype, count), self._size(count, 2)

    def bool(self) -> bool:
        return self.raw(1) != b"\x00"

    def double_be(self) -> bytes:
        return self.raw(8)

    def string(self) -> bytes:
        length: int = _INTS[32].unpack(self.raw(4))[0]
        return self.raw(self._size(length, 1))

    def integer(self, bits: int) -> int:
        value: int = _INTS[bits].unpack(self.raw(bits // 8))[0]
        return value


def _element(etype: int, count: int) -> int:
    """Check a container's element type; an empty container may name any (a byte stands in)."""
    if etype in _KNOWN:
        return etype
    if count == 0:
        return TType.BYTE
    raise RemoteProtocolError(f"unknown element type {etype}", kind="garbage")


class CompactReader(_Base):
    """Reads the compact protocol (field ids are deltas; bool fields carry their value)."""

    __slots__ = ("_bool", "_last")

    def __init__(self, data: bytes | bytearray | memoryview, pos: int) -> None:
        super().__init__(data, pos)
        self._last: list[int] = []
        self._bool: bool | None = None

    def _varint(self, max_bytes: int) -> int:
        read = read_varint(self.data, self.pos, self.end, max_bytes)
        if read is None:
            raise _truncated()
        value, self.pos = read
        return value

    def _type(self, ctype: int, count: int = 1) -> int:
        btype = FROM_COMPACT.get(ctype)
        if btype is None:
            if count == 0:
                return TType.BYTE
            raise RemoteProtocolError(f"unknown compact type {ctype}", kind="garbage")
        return btype

    def struct_begin(self) -> None:
        self._last.append(0)

    def struct_end(self) -> None:
        self._last.pop()

    def field(self) -> tuple[int, int] | None:
        byte = self.raw(1)[0]
        if byte == 0:
            return None
        ctype = byte & 0x0F
        btype = self._type(ctype)
        delta = byte >> 4
        fid = self._last[-1] + delta if delta else unzigzag(self._varint(3) & 0xFFFF)
        if not -32768 <= fid <= 32767:
            raise RemoteProtocolError(f"field id {fid} out of range", kind="garbage")
        self._last[-1] = fid
        if btype == TType.BOOL:
            self._bool = ctype == 1
        return btype, fid

    def seq_begin(self) -> tuple[int, int]:
        byte = self.raw(1)[0]
        count = byte >> 4
        if count == 15:
            count = self._varint(MAX_VARINT32)
        return self._type(byte & 0x0F, count), self._size(count, 1)

    def map_begin(self) -> tuple[int, int, int]:
        count = self._varint(MAX_VARINT32)
        if count == 0:
            return 0, 0, 0
        types = self.raw(1)[0]
        ktype, vtype = self._type(types >> 4), self._type(types & 0x0F)
        return ktype, vtype, self._size(count, 2)

    def bool(self) -> bool:
        pending = self._bool
        if pending is not None:
            self._bool = None
            return pending
        return self.raw(1)[0] == 1

    def double_be(self) -> bytes:
        return self.raw(8)[::-1]

    def string(self) -> bytes:
        return self.raw(self._size(self._varint(MAX_VARINT32), 1))

    def integer(self, bits: int) -> int:
        raw = self._varint({16: 3, 32: 5, 64: 10}[bits]) & ((1 << bits) - 1)
        return unzigzag(raw)
