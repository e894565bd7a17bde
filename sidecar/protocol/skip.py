"""Where does a binary-protocol struct end? Found without building Python objects.

Buffered (unframed) Thrift has no length prefix: the only way to know where a
message ends is to walk its struct field by field, through nested structs and
containers, until the outermost STOP. `StructSkipper` does that incrementally:
it can stop at any byte boundary when the bytes run out and resume when more
arrive, so a message split across any number of reads costs one pass.

Plan of the walk. The state is an explicit stack of frames (no recursion, so a
hostile message cannot exhaust the Python stack):

    STRUCT             expecting a field header (type, id) or STOP
    SEQ  etype n       n more elements of etype (list, set)
    MAP  kt vt n       n more keys and values, alternating (n counts both)
    VALUE t            one value of type t, whose header is not read yet
    RAW  n             n more opaque bytes (strings, runs of fixed-size values)

Limits: nesting deeper than ``max_depth`` structs and containers, negative
sizes, unknown type ids, and any size that would carry the message past the
caller's ``limit`` raise `RemoteProtocolError` as soon as they are read.
"""

from __future__ import annotations

import struct
from typing import Final

from librt.strings import read_i32_be

from sidecar.errors import RemoteProtocolError


class TType:
    """Type ids of the Thrift binary protocol."""

    STOP: Final = 0
    VOID: Final = 1
    BOOL: Final = 2
    BYTE: Final = 3
    DOUBLE: Final = 4
    I16: Final = 6
    I32: Final = 8
    I64: Final = 10
    STRING: Final = 11
    STRUCT: Final = 12
    MAP: Final = 13
    SET: Final = 14
    LIST: Final = 15
    UUID: Final = 16


# Encoded size of each fixed-size type (Thrift binary protocol spec; UUID since Thrift 0.19).
FIXED_SIZE: Final[dict[int, int]] = {
    TType.BOOL: 1,
    TType.BYTE: 1,
    TType.DOUBLE: 8,
    TType.I16: 2,
    TType.I32: 4,
    TType.I64: 8,
    TType.UUID: 16,
}
# FIXED_SIZE by type byte, -1 where the type is not of fixed size: an index, not a lookup.
_FIXED_BY_BYTE: Final[tuple[int, ...]] = tuple(FIXED_SIZE.get(b, -1) for b in range(256))
_VARIABLE: Final = frozenset({TType.STRING, TType.STRUCT, TType.MAP, TType.SET, TType.LIST})
# Fewest bytes a value of each type can take: a size prefix, a STOP, a container header.
_MIN_SIZE: Final[dict[int, int]] = {
    **FIXED_SIZE,
    TType.STRING: 4,
    TType.STRUCT: 1,
    TType.MAP: 6,
    TType.SET: 5,
    TType.LIST: 5,
}

# Same default as Apache Thrift's and thriftpy2's decoders.
DEFAULT_MAX_DEPTH: Final = 64

_STRUCT, _SEQ, _MAP, _VALUE, _RAW = range(5)
_NO_LIMIT: Final = 1 << 62
# `StructSkipper.advance` without a step budget.
UNBOUNDED: Final = 1 << 62
_I32: Final = struct.Struct(">i")
_SEQ_HEADER: Final = struct.Struct(">bi")
_MAP_HEADER: Final = struct.Struct(">bbi")


class SkipperState:
    """What both skippers keep between feeds (`StructSkipper`, `CompactSkipper`).

    ``done``: the walk reached the end of its struct or value.
    ``out_of_steps``: the last ``advance`` stopped because its ``steps`` ran
    out, not for want of bytes; calling it again goes on.
    """

    __slots__ = ("_depth", "_max_depth", "_stack", "done", "out_of_steps")

    def __init__(self, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._max_depth = max_depth
        self.reset()

    def reset(self) -> None:
        """Prepare to walk the next struct."""
        self._stack: list[list[int]] = [[_STRUCT]]
        self._depth = 1
        self.done = False
        self.out_of_steps = False

    def reset_value(self, vtype: int) -> None:
        """Prepare to walk one value of type ``vtype`` instead of a struct."""
        self._stack = [[_VALUE, vtype]]
        self._depth = 0
        self.done = False
        self.out_of_steps = False


class StructSkipper(SkipperState):
    """Walks one struct, fed incrementally.

    Usage::

        skipper = StructSkipper()
        pos = skipper.advance(data, body_start, len(data), limit)
        if skipper.done: ...  # the struct ends at pos
        else: ...             # feed more bytes; call advance(data, pos, ...) again

    The skipper keeps no reference to ``data`` between calls, so the caller may
    grow or replace its buffer, as long as positions stay the same.
    """

    __slots__ = ()

    def advance(
        self,
        data: bytes | bytearray | memoryview,
        pos: int,
        end: int,
        limit: int,
        steps: int = UNBOUNDED,
    ) -> int:
        """Walk as far as ``data[pos:end]`` allows, in at most ``steps`` steps.

        Args:
            data: the buffer.
            pos: where the walk stopped last time (the struct's start at first).
            end: how many bytes of ``data`` are valid.
            limit: the struct may not extend past this offset.
            steps: most frames visited (a field, an element, a run of raw
                bytes: about 100 ns each); past it ``out_of_steps`` is set.

        Returns:
            The position reached; when ``done`` is set, the first byte after the struct.

        Raises:
            RemoteProtocolError: the bytes cannot be a struct within the limits.
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
                ftype = data[pos]
                if ftype == TType.STOP:
                    pos += 1
                    if pos > limit:
                        raise _too_big(limit)
                    stack.pop()
                    self._depth -= 1
                    continue
                if pos + 3 > end:
                    return pos
                pos += 3
                vtype = ftype
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
            else:  # _VALUE: a value whose type is known and whose bytes are not read yet
                vtype = frame[1]
                stack.pop()
            # Skip one value of vtype, or leave a VALUE frame to resume from.
            size = FIXED_SIZE.get(vtype)
            if size is not None:
                if pos + size > end:
                    stack.append([_VALUE, vtype])
                    return pos
                pos += size
            elif vtype == TType.STRING:
                if pos + 4 > end:
                    stack.append([_VALUE, vtype])
                    return pos
                length = _I32.unpack_from(data, pos)[0]
                pos += 4
                self._push_raw(stack, length, pos, limit)
            elif vtype == TType.STRUCT:
                self._enter(stack, [_STRUCT])
            elif vtype == TType.LIST or vtype == TType.SET:
                if pos + 5 > end:
                    stack.append([_VALUE, vtype])
                    return pos
                etype, count = _SEQ_HEADER.unpack_from(data, pos)
                pos += 5
                _check_container(etype, count)
                self._check_depth()
                esize = FIXED_SIZE.get(etype)
                if esize is not None:
                    self._push_raw(stack, count * esize, pos, limit)
                elif count:
                    _check_fits(count * _MIN_SIZE[etype], pos, limit)
                    self._enter(stack, [_SEQ, etype, count])
            elif vtype == TType.MAP:
                if pos + 6 > end:
                    stack.append([_VALUE, vtype])
                    return pos
                ktype, vt, count = _MAP_HEADER.unpack_from(data, pos)
                pos += 6
                _check_container(ktype, count)
                _check_container(vt, count)
                self._check_depth()
                ksize = FIXED_SIZE.get(ktype)
                vsize = FIXED_SIZE.get(vt)
                if ksize is not None and vsize is not None:
                    self._push_raw(stack, count * (ksize + vsize), pos, limit)
                elif count:
                    _check_fits(count * (_MIN_SIZE[ktype] + _MIN_SIZE[vt]), pos, limit)
                    self._enter(stack, [_MAP, ktype, vt, 2 * count])
            else:
                raise RemoteProtocolError(f"unknown field type {vtype}", kind="garbage")
            if pos > limit:
                raise _too_big(limit)
        self.done = True
        return pos

    def _check_depth(self) -> None:
        """Refuse one more level of nesting (every struct and container is a level)."""
        if self._depth >= self._max_depth:
            raise RemoteProtocolError(
                f"structs and containers nested deeper than {self._max_depth}", kind="too_deep"
            )

    def _enter(self, stack: list[list[int]], frame: list[int]) -> None:
        self._check_depth()
        self._depth += 1
        stack.append(frame)

    @staticmethod
    def _push_raw(stack: list[list[int]], length: int, pos: int, limit: int) -> None:
        if length < 0:
            raise RemoteProtocolError(f"negative size {length}", kind="garbage")
        if pos + length > limit:
            raise _too_big(limit)
        if length:
            stack.append([_RAW, length])


def _check_container(etype: int, count: int) -> None:
    if count < 0:
        raise RemoteProtocolError(f"negative container size {count}", kind="garbage")
    if etype not in FIXED_SIZE and etype not in _VARIABLE and count:
        raise RemoteProtocolError(f"unknown element type {etype}", kind="garbage")


def _check_fits(least: int, pos: int, limit: int) -> None:
    """Refuse a container whose elements cannot fit before ``limit``, before they arrive."""
    if pos + least > limit:
        raise _too_big(limit)


def _too_big(limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"message larger than the {limit}-byte limit", kind="oversized")


def flat_struct_end(data: bytes | bytearray | memoryview, pos: int, end: int, steps: int) -> int:
    """Where a flat struct at ``data[pos]`` ends, if it is one; -1 for anything else.

    The fast path of `StructSkipper.advance` for the usual call: fields of
    fixed-size types and strings, then STOP, all in ``data[pos:end]``. -1
    (the caller then walks with a `StructSkipper`, which says what is wrong, if
    anything) for a nested struct or container, an unknown type, a negative
    size, bytes that end first, or more than ``steps`` steps counted as
    `StructSkipper.advance` counts them (a field, a string's bytes, the STOP).
    Where it answers, a `StructSkipper` would end at the same offset.
    """
    if isinstance(data, bytes):
        return _flat_struct_end_of_bytes(data, pos, end, steps)
    fixed = FIXED_SIZE
    while True:
        steps -= 1
        if steps < 0 or pos >= end:
            return -1
        ftype = data[pos]
        if ftype == TType.STOP:
            return pos + 1
        pos += 3
        size = fixed.get(ftype)
        if size is not None:
            pos += size
        elif ftype == TType.STRING:
            if pos + 4 > end:
                return -1
            length = _I32.unpack_from(data, pos)[0]
            pos += 4
            if length:
                steps -= 1
                if length < 0 or steps < 0:
                    return -1
                pos += length
        else:
            return -1
        if pos > end:
            return -1


def _flat_struct_end_of_bytes(data: bytes, pos: int, end: int, steps: int) -> int:
    """`flat_struct_end` on ``bytes`` (a message as the event loop handed it over), step
    for step the same: the compiled build reads a byte of ``bytes`` and a length by
    librt as loads, where the general loop indexes a union of buffers and calls
    struct (docs/compiled.md). tests/protocol/test_skip.py keeps the two equal.
    """
    sizes = _FIXED_BY_BYTE
    while True:
        steps -= 1
        if steps < 0 or pos >= end:
            return -1
        ftype = data[pos]
        if ftype == TType.STOP:
            return pos + 1
        pos += 3
        size = sizes[ftype]
        if size >= 0:
            pos += size
        elif ftype == TType.STRING:
            if pos + 4 > end:
                return -1
            length = read_i32_be(data, pos)
            pos += 4
            if length:
                steps -= 1
                if length < 0 or steps < 0:
                    return -1
                pos += length
        else:
            return -1
        if pos > end:
            return -1


def value_end(data: bytes | bytearray | memoryview, start: int, vtype: int) -> int:
    """Return the offset just past the one value of type ``vtype`` at ``data[start]``.

    Raises:
        RemoteProtocolError: the value is malformed or ends past the data.
    """
    skipper = StructSkipper()
    skipper.reset_value(vtype)
    pos = skipper.advance(data, start, len(data), _NO_LIMIT)
    if not skipper.done:
        raise RemoteProtocolError("value ends past the end of the data", kind="truncated")
    return pos


def struct_end(
    data: bytes | bytearray | memoryview,
    start: int = 0,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> int:
    """Return the offset just past the complete struct that begins at ``data[start]``.

    Raises:
        RemoteProtocolError: the struct is malformed or ends past the data (kind ``truncated``).
    """
    skipper = StructSkipper(max_depth)
    end = len(data)
    # No size limit here: a size past the data is reported as truncation.
    pos = skipper.advance(data, start, end, _NO_LIMIT)
    if not skipper.done:
        raise RemoteProtocolError("struct ends past the end of the data", kind="truncated")
    return pos
