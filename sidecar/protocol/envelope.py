"""The message envelope of the Thrift binary protocol: read it, write it, patch its seqid.

Wire format (Thrift binary protocol, both forms are accepted):

    strict:      i32 (0x80010000 | type)  i32 name_len  name  i32 seqid  struct...
    non-strict:  i32 name_len  name  i8 type  i32 seqid  struct...

Only the envelope is decoded. The struct that follows (call arguments or reply
result) stays opaque bytes; `MessageHeader.body_offset` says where it starts.

Method names are bytes on the wire, and Thrift does not check that they are
UTF-8 (Apache's C++, Java and Go servers read any bytes and answer a name they
do not know with UNKNOWN_METHOD). A name is read with the ``surrogateescape``
error handler: valid UTF-8 gives the same `str` as a strict decode, and every
other byte string gives a `str` whose ``surrogateescape`` encoding is exactly
the bytes that came (`name_bytes`). Such a `str` is fine as a key but not as
text: where a name leaves as text (logs, metrics, /state, messages to people)
it goes through `shown_name`.
"""

from __future__ import annotations

import struct
import sys
from enum import IntEnum, StrEnum
from typing import Final

from librt.strings import BytesWriter, read_i32_be

from sidecar.errors import ProtocolError, RemoteProtocolError

VERSION_1: Final = 0x80010000
VERSION_MASK: Final = 0xFFFF0000
TYPE_MASK: Final = 0x000000FF

# Decodes method names and encodes them back byte for byte (PEP 383).
NAME_ERRORS: Final = "surrogateescape"

# A method name longer than this is not a name but garbage. Thrift puts no
# limit on names; real IDL identifiers are far below it.
MAX_NAME_LENGTH: Final = 4096

_I32: Final = struct.Struct(">i")
_U32: Final = struct.Struct(">I")
_I8: Final = struct.Struct(">b")


class Protocol(StrEnum):
    """The encoding of a message: Thrift's binary or compact protocol."""

    BINARY = "binary"
    COMPACT = "compact"


class MessageType(IntEnum):
    """TMessageType from the Thrift spec."""

    CALL = 1
    REPLY = 2
    EXCEPTION = 3
    ONEWAY = 4


_VALID_TYPES: Final = frozenset(int(t) for t in MessageType)
# MessageType by wire value, without the cost of calling the enum (None: not a type).
TYPE_BY_VALUE: Final[tuple[MessageType | None, ...]] = tuple(
    MessageType(v) if v in _VALID_TYPES else None for v in range(256)
)
_STRICT_START: Final = struct.Struct(">Ii")
# A strict envelope's name of n bytes and the seqid after it, read in one unpack for
# names shorter than this (any real method name): one call into C instead of a
# slice and a second unpack.
_SHORT_NAME: Final = 128
_NAME_AND_SEQID: Final = tuple(struct.Struct(f">{n}si") for n in range(_SHORT_NAME))


class MessageHeader:
    """The decoded envelope of one message.

    A plain class of read-only fields, not a named tuple: the compiled build
    makes one with a single native call and reads its fields without a lookup
    (a named tuple's construction and field reads go through Python). Treat it
    as immutable; `replaced` gives a changed copy.

    Attributes:
        name: the method name as sent, ``Service:method`` for multiplexed calls.
        type: CALL, REPLY, EXCEPTION or ONEWAY.
        seqid: the sequence id.
        strict: True for the strict (versioned) envelope.
        seqid_offset: offset of the seqid from the start of the message.
        body_offset: offset of the struct from the start of the message.
        protocol: binary (the default) or compact.
        seqid_size: bytes the seqid takes (4 in binary; a 1-5 byte varint in compact).
    """

    __slots__ = (
        "body_offset",
        "name",
        "protocol",
        "seqid",
        "seqid_offset",
        "seqid_size",
        "strict",
        "type",
    )

    def __init__(
        self,
        name: str,
        type: MessageType,
        seqid: int,
        strict: bool,
        seqid_offset: int,
        body_offset: int,
        protocol: Protocol = Protocol.BINARY,
        seqid_size: int = 4,
    ) -> None:
        self.name: Final = name
        self.type: Final = type
        self.seqid: Final = seqid
        self.strict: Final = strict
        self.seqid_offset: Final = seqid_offset
        self.body_offset: Final = body_offset
        self.protocol: Final = protocol
        self.seqid_size: Final = seqid_size

    def _fields(self) -> tuple[str, MessageType, int, bool, int, int, Protocol, int]:
        return (
            self.name,
            self.type,
            self.seqid,
            self.strict,
            self.seqid_offset,
            self.body_offset,
            self.protocol,
            self.seqid_size,
        )

    def replaced(self, *, seqid_size: int, body_offset: int) -> MessageHeader:
        """A copy with a seqid of another size (a patched compact varint) and the body after it."""
        return MessageHeader(
            self.name,
            self.type,
            self.seqid,
            self.strict,
            self.seqid_offset,
            body_offset,
            self.protocol,
            seqid_size,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MessageHeader):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return (
            f"MessageHeader(name={self.name!r}, type={self.type!r}, seqid={self.seqid}, "
            f"strict={self.strict}, seqid_offset={self.seqid_offset}, "
            f"body_offset={self.body_offset}, protocol={self.protocol!r}, "
            f"seqid_size={self.seqid_size})"
        )

    @property
    def service(self) -> str:
        """The service part of a multiplexed name, or ``""``."""
        service, sep, _ = self.name.rpartition(":")
        return service if sep else ""

    @property
    def method(self) -> str:
        """The method part of the name, without any service prefix."""
        return self.name.rpartition(":")[2]


_BINARY: Final = Protocol.BINARY


def parse_header(
    data: bytes | bytearray | memoryview, start: int = 0, names: NameCache | None = None
) -> MessageHeader | None:
    """Read the envelope of the message that begins at ``data[start]``.

    Args:
        data: bytes received so far.
        start: offset of the first byte of the message.
        names: the reading connection's last name (`NameCache`), or None.

    Returns:
        The header with offsets relative to ``start``, or None when more bytes
        are needed to read the whole envelope.

    Raises:
        RemoteProtocolError: the bytes cannot be a binary-protocol envelope.
    """
    # The locals are declared int: the compiled build then does their arithmetic on
    # machine integers, not on the objects struct returns.
    end: int = len(data)
    first: int
    name_len: int
    seqid: int
    raw: bytes | bytearray | memoryview  # the name's bytes
    if end - start >= 8 and isinstance(data, bytes):
        # What the event loop hands over, read in place: librt's readers take bytes
        # only, and the compiled build makes each a load (`unpack_from` is a method
        # call that builds a tuple; docs/compiled.md).
        first = int(read_i32_be(data, start)) & 0xFFFFFFFF
        name_len = read_i32_be(data, start + 4)
    elif end - start >= 8:  # both words at once
        words = _STRICT_START.unpack_from(data, start)
        first = words[0]
        name_len = words[1]
    elif end - start >= 4:
        first = name_len = _U32.unpack_from(data, start)[0]
    else:
        return None
    if first & 0x80000000:
        if first & VERSION_MASK != VERSION_1:
            raise RemoteProtocolError(
                f"bad binary protocol version 0x{first:08x}", kind="bad_version"
            )
        if end - start < 8:
            return None
        mtype = first & TYPE_MASK
        if name_len < 0 or name_len > MAX_NAME_LENGTH:
            raise _bad_name_length(name_len)
        seqid_at = start + 8 + name_len
        if end < seqid_at + 4:
            return None
        if isinstance(data, bytes):
            raw = data[start + 8 : seqid_at]
            seqid = read_i32_be(data, seqid_at)
        elif name_len < _SHORT_NAME:
            name_and_seqid = _NAME_AND_SEQID[name_len].unpack_from(data, start + 8)
            raw = name_and_seqid[0]
            seqid = name_and_seqid[1]
        else:
            raw = data[start + 8 : seqid_at]
            seqid = _I32.unpack_from(data, seqid_at)[0]
        strict = True
    else:
        name_len = first
        if name_len > MAX_NAME_LENGTH:
            raise _bad_name_length(name_len)
        name_at = start + 4
        name_end = name_at + name_len
        if end < name_end + 5:
            return None
        mtype = data[name_end]
        seqid_at = name_end + 1
        seqid = _I32.unpack_from(data, seqid_at)[0]
        raw = data[name_at:name_end]
        strict = False
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    name = decode_name(raw) if names is None else names.decode(raw)
    message_type = TYPE_BY_VALUE[mtype]
    if message_type is None:
        raise RemoteProtocolError(
            f"unknown message type {mtype}", kind="bad_type", seqid=seqid, name=name, strict=strict
        )
    return MessageHeader(
        name, message_type, seqid, strict, seqid_at - start, seqid_at + 4 - start, _BINARY, 4
    )


def decode_name(raw: bytes) -> str:
    """A method name's bytes as the parsers read them (the module docstring)."""
    try:
        # Valid UTF-8 (the usual name) decodes to the same str either way; the
        # default codec needs no lookup of its name or of the error handler's, and
        # on a value known to be bytes the compiled build calls it without a lookup.
        return raw.decode()
    except UnicodeDecodeError:
        return str(raw, "utf-8", NAME_ERRORS)


class NameCache:
    """The method name one connection's parser read last, with its bytes.

    The calls on a connection mostly repeat one name. When the next does, the
    parser hands back the same ``str`` for a comparison of bytes: no decode and
    no new object, and the hash that the first lookup by name computed is kept
    with it (a new ``str`` is hashed again by each dict it is looked up in).
    The name is interned when it is decoded, so that every connection's cache
    hands back the one ``str`` of a name: a table that keeps the name it was
    asked for last (`sidecar.proxy.policy.PolicyTable`) knows it again by
    identity. An interned name lives only while something refers to it.
    Holds one name, at most `MAX_NAME_LENGTH` bytes.
    """

    __slots__ = ("name", "raw")

    def __init__(self) -> None:
        self.raw = b""
        self.name = ""

    def decode(self, raw: bytes) -> str:
        """``raw`` read as `decode_name` reads it."""
        if raw == self.raw:
            return self.name
        name = sys.intern(decode_name(raw))
        self.raw = raw
        self.name = name
        return name


def _bad_name_length(name_len: int) -> RemoteProtocolError:
    return RemoteProtocolError(f"implausible method name length {name_len}", kind="garbage")


def name_bytes(name: str) -> bytes:
    """The wire bytes of a method name as `parse_header` read it (the same bytes back)."""
    return name.encode("utf-8", NAME_ERRORS)


def shown_name(name: str) -> str:
    """A method name as text for people and for text formats: valid UTF-8, always.

    A name that was valid UTF-8 on the wire is returned as it is. In any other,
    each byte that is not part of valid UTF-8 is written ``\\xNN`` and each
    backslash ``\\\\`` (``b"caf\\xc3"`` is shown ``caf\\xc3``), so no two such
    names look alike; a UTF-8 name may (one spelled ``caf\\xc3`` with a real
    backslash), which is why keys never use this form. Logs, metrics, ``/state``, ``sidecar
    top`` and the messages of TApplicationExceptions the sidecar writes use
    this form (docs/robustness.md, "Method names that are not UTF-8").
    """
    if name.isascii():
        return name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = name.replace("\\", "\\\\").encode("utf-8", NAME_ERRORS)
        return raw.decode("utf-8", "backslashreplace")
    return name


def encode_header(name: str, mtype: MessageType, seqid: int, strict: bool = True) -> bytes:
    """Encode an envelope; the struct bytes go right after it.

    ``name`` is written as `name_bytes` gives it: a name read from the wire goes
    back as the bytes that came, UTF-8 or not.
    """
    raw = name.encode("utf-8", NAME_ERRORS)
    if strict:
        return b"".join(
            (
                _U32.pack(VERSION_1 | int(mtype)),
                _I32.pack(len(raw)),
                raw,
                _I32.pack(seqid),
            )
        )
    return b"".join((_I32.pack(len(raw)), raw, _I8.pack(int(mtype)), _I32.pack(seqid)))


def write_seqid(buf: bytearray, offset: int, seqid: int) -> None:
    """Overwrite the seqid at ``offset`` (a header's seqid_offset plus the message start)."""
    _I32.pack_into(buf, offset, seqid)


def with_seqid(data: bytes, offset: int, seqid: int) -> bytes:
    """A copy of ``data`` with ``seqid`` written at ``offset``; ``data`` is left as it is.

    Made in a librt ``BytesWriter``: the compiled build copies the bytes in
    and stores the four bytes natively, where a ``bytearray`` copy and
    ``struct.pack_into`` cost about twice the instructions (argument parsing,
    a buffer export). It copies twice (in, and out as ``bytes``): for small
    messages only (`Message.wire_with_seqid`).
    """
    writer = BytesWriter()
    writer.write(data)
    writer[offset] = (seqid >> 24) & 0xFF
    writer[offset + 1] = (seqid >> 16) & 0xFF
    writer[offset + 2] = (seqid >> 8) & 0xFF
    writer[offset + 3] = seqid & 0xFF
    return writer.getvalue()


def identify(error: ProtocolError, header: MessageHeader) -> None:
    """Attach the message's seqid, name and envelope form to ``error`` (the one place).

    The client's answer to a broken message then carries its seqid, in its form.
    """
    error.seqid = header.seqid
    error.name = header.name
    error.strict = header.strict
