"""THeader frames (Apache Thrift doc/specs/HeaderFormat.md): parse and encode, sans-I/O.

    i32 length | u16 0x0FFF | u16 flags | i32 seqid | u16 header size / 4 |
    varint protocol id | varint n | n x varint transform id |
    info sections (varint type; type 1 = key/values: varint count, count x
    (varint len, key, varint len, value)) | zero padding to the header size |
    payload: one binary (id 0) or compact (id 2) message, transformed

Transforms: zlib (1) is undone on read and redone on write; any other is
refused. Info sections of other types are kept as raw bytes and written back.
Some stacks put a THeader frame inside an ordinary frame (a framed transport
under THeader): `outer_framed` records it so that answers go back the same way.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import encode_varint, read_varint
from sidecar.protocol.envelope import Protocol

HEADER_MAGIC: Final = 0x0FFF
MAGIC_BYTES: Final[bytes] = b"\x0f\xff"
PROTOCOL_IDS: Final = {0: Protocol.BINARY, 2: Protocol.COMPACT}
PROTOCOL_ID_OF: Final = {v: k for k, v in PROTOCOL_IDS.items()}
ZLIB: Final = 1
INFO_KEY_VALUE: Final = 1
# Bytes from the length to the variable header: length, magic, flags, seqid, size.
FIXED_SIZE: Final = 14

_FIXED: Final = struct.Struct(">iHHiH")
_HEAD: Final = struct.Struct(">HHiH")
# The flag by which a client tells the server it may answer its calls out of order.
SUPPORT_OUT_OF_ORDER: Final = 0x0001
_I32: Final = struct.Struct(">i")


@dataclass(slots=True)
class THeaderFrame:
    """What a THeader frame says besides its payload.

    Attributes:
        flags: the 16-bit flags, kept as sent.
        seqid: the frame's sequence id (kept equal to the payload's).
        protocol: the payload's protocol.
        transforms: transform ids, in the order the sender listed them.
        headers: the key/value info headers, in arrival order.
        other_info: info sections of other types, raw, written back as they came: to
            the header's end, padding and all (a section's own last zero bytes cannot
            be told from padding without knowing its type).
        outer_framed: the frame came inside another frame length.
    """

    flags: int = 0
    seqid: int = 0
    protocol: Protocol = Protocol.BINARY
    transforms: tuple[int, ...] = ()
    headers: dict[bytes, bytes] = field(default_factory=dict)
    other_info: bytes = b""
    outer_framed: bool = False

    def get_header(self, name: str) -> str | None:
        """The value of info header ``name`` (UTF-8), or None."""
        value = self.headers.get(name.encode("utf-8"))
        return None if value is None else value.decode("utf-8", "replace")

    def set_header(self, name: str, value: str) -> None:
        """Add or replace info header ``name``."""
        self.headers[name.encode("utf-8")] = value.encode("utf-8")

    @property
    def out_of_order(self) -> bool:
        """Does the sender let the server answer out of order (`SUPPORT_OUT_OF_ORDER`)?"""
        return bool(self.flags & SUPPORT_OUT_OF_ORDER)


def _varint(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[int, int]:
    read = read_varint(data, pos, end, 5)
    if read is None:
        raise RemoteProtocolError("THeader header ends inside a varint", kind="garbage")
    return read


def parse_theader(
    frame: bytes | bytearray | memoryview, max_size: int
) -> tuple[THeaderFrame, bytes | bytearray | memoryview]:
    """Split a THeader frame (starting at the magic, after the length) into header and payload.

    Args:
        frame: the frame's bytes after its length.
        max_size: the largest payload accepted after undoing transforms.

    Raises:
        RemoteProtocolError: not a well-formed THeader frame, an unknown
            transform or protocol (kind ``unsupported``), a payload over ``max_size``.
    """
    if len(frame) < 10 or frame[:2] != MAGIC_BYTES:
        raise RemoteProtocolError("not a THeader frame", kind="garbage")
    _, flags, seqid, words = _HEAD.unpack_from(frame, 0)
    end = 10 + 4 * words
    if end > len(frame):
        raise RemoteProtocolError("THeader header larger than its frame", kind="garbage")
    protocol_id, pos = _varint(frame, 10, end)
    protocol = PROTOCOL_IDS.get(protocol_id)
    if protocol is None:
        raise RemoteProtocolError(
            f"THeader payload protocol {protocol_id} is not supported",
            kind="unsupported",
            seqid=seqid,
        )
    count, pos = _varint(frame, pos, end)
    transforms = []
    for _ in range(count):
        transform, pos = _varint(frame, pos, end)
        if transform != ZLIB:
            raise RemoteProtocolError(
                f"THeader transform {transform} is not supported", kind="unsupported", seqid=seqid
            )
        transforms.append(transform)
    headers: dict[bytes, bytes] = {}
    other = b""
    while pos < end:
        info_type, after = _varint(frame, pos, end)
        if info_type != INFO_KEY_VALUE:
            other = bytes(frame[pos:end])
            break
        pairs, pos = _varint(frame, after, end)
        for _ in range(pairs):
            key, pos = _string(frame, pos, end)
            headers[key], pos = _string(frame, pos, end)
    payload: bytes | bytearray | memoryview = frame[end:]
    for _ in transforms:
        payload = _inflate(payload, max_size)
    if len(payload) > max_size:
        raise RemoteProtocolError(f"THeader payload over {max_size} bytes", kind="oversized")
    return THeaderFrame(flags, seqid, protocol, tuple(transforms), headers, other), payload


def _string(data: bytes | bytearray | memoryview, pos: int, end: int) -> tuple[bytes, int]:
    length, pos = _varint(data, pos, end)
    if pos + length > end:
        raise RemoteProtocolError("THeader info header past the header's end", kind="garbage")
    return bytes(data[pos : pos + length]), pos + length


def _inflate(payload: bytes | bytearray | memoryview, max_size: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, max_size + 1)
    except zlib.error as exc:
        raise RemoteProtocolError(f"bad zlib payload: {exc}", kind="garbage") from None
    if len(out) > max_size or inflater.unconsumed_tail:
        raise RemoteProtocolError(f"THeader payload over {max_size} bytes", kind="oversized")
    if not inflater.eof:
        raise RemoteProtocolError("zlib payload cut short", kind="garbage")
    return out


def encode_theader(
    info: THeaderFrame,
    payload: bytes | bytearray | memoryview,
    outer_framed: bool | None = None,
) -> bytes:
    """A whole THeader frame (with its length; twice when outer framed) around ``payload``.

    ``outer_framed``: inside a frame length of its own or not; None: as ``info`` says.
    """
    body = bytes(payload)
    for transform in info.transforms:
        if transform == ZLIB:
            body = zlib.compress(body)
    head = bytearray(encode_varint(PROTOCOL_ID_OF[info.protocol]))
    head += encode_varint(len(info.transforms))
    for transform in info.transforms:
        head += encode_varint(transform)
    if info.headers:
        head += encode_varint(INFO_KEY_VALUE) + encode_varint(len(info.headers))
        for key, value in info.headers.items():
            head += encode_varint(len(key)) + key + encode_varint(len(value)) + value
    head += info.other_info
    head += b"\x00" * (-len(head) % 4)
    length = 10 + len(head) + len(body)
    out = _FIXED.pack(length, HEADER_MAGIC, info.flags, info.seqid, len(head) // 4) + head + body
    if outer_framed is None:
        outer_framed = info.outer_framed
    return _I32.pack(len(out)) + out if outer_framed else out
