"""Where does a compact-protocol struct end? The compact twin of `skip.StructSkipper`.

Same plan as skip.py: an explicit stack of frames, resumable at any byte
boundary, no recursion. What differs is the encoding (Apache Thrift
doc/specs/thrift-compact-protocol.md):

    field header   one byte: (id delta << 4) | type, or type alone then a zigzag
                   varint id when the delta is 0 or over 15; 0 is STOP
    bool field     the value is the type (1 true, 2 false), no byte follows
    i16 i32 i64    zigzag varints (at most 3, 5, 10 bytes)
    binary         varint length, then the bytes
    list, set      one byte (size << 4 | elem type); size 15: a varint size follows
    map            varint size; when not 0, one byte (key type << 4 | value type)

A varint cut by the end of the input is re-read from its first byte when more
arrive (at most 10 bytes twice). Limits as in skip.py: ``max_depth`` structs
and containers, sizes that cannot fit before ``limit``, unknown types.
"""

from __future__ import annotations

from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import MAX_VARINT32, read_varint
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, UNBOUNDED, SkipperState


class CType:
    """Type ids of the Thrift compact protocol."""

    STOP: Final = 0
    BOOL_TRUE: Final = 1
    BOOL_FALSE: Final = 2
    BYTE: Final = 3
    I16: Final = 4
    I32: Final = 5
    I64: Final = 6
    DOUBLE: Final = 7
    BINARY: Final = 8
    LIST: Final = 9
    SET: Final = 10
    MAP: Final = 11
    STRUCT: Final = 12
    UUID: Final = 13


# Bytes of a fixed-size value inside a container (bools are one byte there).
CFIXED_SIZE: Final[dict[int, int]] = {
    CType.BOOL_TRUE: 1,
    CType.BOOL_FALSE: 1,
    CType.BYTE: 1,
    CType.DOUBLE: 8,
    CType.UUID: 16,
}
# Longest varint of each integer type.
VARINT_SIZE: Final[dict[int, int]] = {CType.I16: 3, CType.I32: 5, CType.I64: 10}
_KNOWN: Final = frozenset(range(1, 14))
# Fewest bytes a value of each type takes inside a container.
_MIN_SIZE: Final[dict[int, int]] = {t: CFIXED_SIZE.get(t, 1) for t in _KNOWN}
_MAX_SIZE: Final = 0x7FFFFFFF

_STRUCT, _SEQ, _MAP, _VALUE, _RAW = range(5)
_NO_LIMIT: Final = 1 << 62


class CompactSkipper(SkipperState):
    """Walks one compact struct, fed incrementally (the interface of `StructSkipper`)."""

    __slots__ = ()

    def advance(
        self,
        data: bytes | bytearray | memoryview,
        pos: int,
        end: int,
        limit: int,
        steps: int = UNBOUNDED,
    ) -> int:
        """Walk as far as ``data[pos:end]`` allows, in ``steps`` (see `StructSkipper.advance`).

        Raises:
            RemoteProtocolError: the bytes cannot be a compact struct within the limits.
        """
        stack = self._stack
        self.out_of_steps = False
        while stack:
            steps -= 1
            if steps < 0:
                self.out_of_steps = True
                return pos
            frame = stack[-1]
            kind = frame[0]
            if kind == _RAW:
                available = end - pos
                if available < frame[1]:
                    frame[1] -= available
                    return end
                pos += frame[1]
                stack.pop()
                continue
            if kind == _STRUCT:
                if pos >= end:
                    return pos
                byte = data[pos]
                if byte == CType.STOP:
                    pos += 1
                    if pos > limit:
                        raise _too_big(limit)
                    stack.pop()
                    self._depth -= 1
                    continue
                vtype = byte & 0x0F
                after = pos + 1
                if not byte >> 4:
                    read = read_varint(data, after, end, 3)
                    if read is None:
                        return pos
                    after = read[1]
                pos = after
                if vtype == CType.BOOL_TRUE or vtype == CType.BOOL_FALSE:
                    if pos > limit:
                        raise _too_big(limit)
                    continue
            elif kind == _SEQ:
                if frame[2] == 0:
                    stack.pop()
                    self._depth -= 1
                    continue
                frame[2] -= 1
                vtype = frame[1]
            elif kind == _MAP:
                remaining = frame[3]
                if remaining == 0:
                    stack.pop()
                    self._depth -= 1
                    continue
                frame[3] = remaining - 1
                vtype = frame[1] if remaining % 2 == 0 else frame[2]
            else:
                vtype = frame[1]
                stack.pop()
            resume = self._value(stack, data, pos, end, limit, vtype)
            if resume < 0:
                stack.append([_VALUE, vtype])
                return pos
            pos = resume
            if pos > limit:
                raise _too_big(limit)
        self.done = True
        return pos

    def _value(
        self,
        stack: list[list[int]],
        data: bytes | bytearray | memoryview,
        pos: int,
        end: int,
        limit: int,
        vtype: int,
    ) -> int:
        """Skip the start of one value; -1 when its header is cut short."""
        size = CFIXED_SIZE.get(vtype)
        if size is not None:
            if pos + size > end:
                return -1
            return pos + size
        varint = VARINT_SIZE.get(vtype)
        if varint is not None:
            read = read_varint(data, pos, end, varint)
            return -1 if read is None else read[1]
        if vtype == CType.BINARY:
            read = read_varint(data, pos, end, MAX_VARINT32)
            if read is None:
                return -1
            length, pos = read
            _check_size(length, pos, limit)
            if length:
                stack.append([_RAW, length])
            return pos
        if vtype == CType.STRUCT:
            self._enter(stack, [_STRUCT])
            return pos
        if vtype == CType.LIST or vtype == CType.SET:
            if pos >= end:
                return -1
            byte = data[pos]
            count, etype = byte >> 4, byte & 0x0F
            pos += 1
            if count == 15:
                read = read_varint(data, pos, end, MAX_VARINT32)
                if read is None:
                    return -1
                count, pos = read
            self._container(stack, (etype,), count, pos, limit)
            return pos
        if vtype == CType.MAP:
            read = read_varint(data, pos, end, MAX_VARINT32)
            if read is None:
                return -1
            count, after = read
            if count == 0:
                self._check_depth()
                return after
            if after >= end:
                return -1
            types = data[after]
            self._container(stack, (types >> 4, types & 0x0F), count, after + 1, limit)
            return after + 1
        raise RemoteProtocolError(f"unknown compact field type {vtype}", kind="garbage")

    def _container(
        self, stack: list[list[int]], types: tuple[int, ...], count: int, pos: int, limit: int
    ) -> None:
        """Check a container's header; push what walks its elements."""
        self._check_depth()
        if count > _MAX_SIZE:
            raise RemoteProtocolError(f"negative container size {count}", kind="garbage")
        if not count:
            return
        for t in types:
            if t not in _KNOWN:
                raise RemoteProtocolError(f"unknown element type {t}", kind="garbage")
        fixed = [CFIXED_SIZE.get(t) for t in types]
        if None not in fixed:
            length = count * sum(s for s in fixed if s is not None)
            _check_size(length, pos, limit)
            stack.append([_RAW, length])
            return
        _check_fits(count * sum(_MIN_SIZE[t] for t in types), pos, limit)
        self._depth += 1
        if len(types) == 1:
            stack.append([_SEQ, types[0], count])
        else:
            stack.append([_MAP, types[0], types[1], 2 * count])

    def _check_depth(self) -> None:
        if self._depth >= self._max_depth:
            raise RemoteProtocolError(
                f"structs and containers nested deeper than {self._max_depth}", kind="too_deep"
            )

    def _enter(self, stack: list[list[int]], frame: list[int]) -> None:
        self._check_depth()
        self._depth += 1
        stack.append(frame)


def _check_size(length: int, pos: int, limit: int) -> None:
    if length > _MAX_SIZE:
        raise RemoteProtocolError(f"negative size {length}", kind="garbage")
    if pos + length > limit:
        raise _too_big(limit)


def _check_fits(least: int, pos: int, limit: int) -> None:
    if pos + least > limit:
        raise _too_big(limit)


def _too_big(limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"message larger than the {limit}-byte limit", kind="oversized")


def compact_struct_end(
    data: bytes | bytearray | memoryview, start: int = 0, max_depth: int = DEFAULT_MAX_DEPTH
) -> int:
    """Return the offset just past the compact struct that begins at ``data[start]``.

    Raises:
        RemoteProtocolError: malformed, or ends past the data (kind ``truncated``).
    """
    skipper = CompactSkipper(max_depth)
    pos = skipper.advance(data, start, len(data), _NO_LIMIT)
    if not skipper.done:
        raise RemoteProtocolError("struct ends past the end of the data", kind="truncated")
    return pos


def compact_value_end(data: bytes | bytearray | memoryview, start: int, vtype: int) -> int:
    """Return the offset just past the one compact value of type ``vtype`` at ``data[start]``.

    A bool field's value is in its type: it takes no bytes (``start`` is returned).

    Raises:
        RemoteProtocolError: the value is malformed or ends past the data.
    """
    if vtype == CType.BOOL_TRUE or vtype == CType.BOOL_FALSE:
        return start
    skipper = CompactSkipper()
    skipper.reset_value(vtype)
    pos = skipper.advance(data, start, len(data), _NO_LIMIT)
    if not skipper.done:
        raise RemoteProtocolError("value ends past the end of the data", kind="truncated")
    return pos
