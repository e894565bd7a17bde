"""One complete message as the decoders return it, and how it goes back on the wire.

A `Message` keeps the bytes it arrived in: the ``bytes`` of the read itself
when the read held it whole (no copy, and the compiled build reads ``bytes``
natively: validation and a reply's classification read them), else the
decoder's own ``bytearray``. Its seqid is patched in place, in a
``bytearray`` of its own made on the first patch (`Message.owned`): the copy
is made where it was always needed. When it arrived framed, the frame prefix
is kept in front of it and it can be forwarded framed without another copy.
A compact seqid is a varint: patching it may change the message's length,
and the frame prefix follows.
A message that arrived in a THeader frame keeps the frame's header
(`THeaderFrame`: info headers, transforms) beside its payload.
"""

from __future__ import annotations

import struct
from enum import StrEnum
from typing import Final

from sidecar.protocol.compact import (
    PROTOCOL_ID,
    parse_compact_header,
    read_varint,
    replace_seqid,
)
from sidecar.protocol.envelope import MessageHeader, Protocol, parse_header, with_seqid
from sidecar.protocol.theader import THeaderFrame, encode_theader

_I32: Final = struct.Struct(">i")
# Up to this size `wire_with_seqid` writes a patched copy of a message's bytes
# (copied twice, natively) rather than patching a bytearray copy in place: past
# it, the second copy costs more than the call to struct it saves.
SMALL_WIRE_BYTES: Final = 4096


class Transport(StrEnum):
    """How messages are delimited on a connection."""

    FRAMED = "framed"
    BUFFERED = "buffered"
    THEADER = "theader"


# Enum members as plain names: reading Transport.FRAMED costs a descriptor call.
_FRAMED: Final = Transport.FRAMED
_BUFFERED: Final = Transport.BUFFERED
_THEADER: Final = Transport.THEADER
_COMPACT: Final = Protocol.COMPACT


class Message:
    """One complete message.

    A plain class, not a dataclass: a dataclass's generated ``__init__`` stays
    interpreted in the compiled build, and two messages are made per call.

    Attributes:
        header: the envelope as it arrived (its offsets follow any seqid patch).
        buf: the bytes: as they arrived (``bytes``, never changed) until the
            first seqid patch, then a ``bytearray`` of this message's own.
        start: 4 when ``buf`` begins with the frame length prefix, else 0.
        theader: the THeader frame's header when the message came in one.
    """

    __slots__ = ("buf", "header", "start", "theader")

    def __init__(
        self,
        header: MessageHeader,
        buf: bytes | bytearray,
        start: int,
        theader: THeaderFrame | None = None,
    ) -> None:
        self.header = header
        self.buf = buf
        self.start = start
        self.theader = theader

    def __repr__(self) -> str:
        return f"Message({self.header!r}, {self.buf!r}, {self.start}, {self.theader!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.header, self.buf, self.start, self.theader) == (
            other.header,
            other.buf,
            other.start,
            other.theader,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable: equal by value, like a dataclass

    @property
    def protocol(self) -> Protocol:
        """The protocol the message is encoded in."""
        return self.header.protocol

    @property
    def size(self) -> int:
        """Length of the message without any frame prefix."""
        return len(self.buf) - self.start

    def owned(self) -> bytearray:
        """The bytes in a ``bytearray`` of this message's own, to patch: copied the first time."""
        buf = self.buf
        if isinstance(buf, bytearray):
            return buf
        # Written as a slice of bytes: the compiled build makes that one C call
        # (PyByteArray_FromStringAndSize), where bytearray(buf) is a call of the
        # type; in the pure build buf[:] is buf itself.
        owned = bytearray(buf[:])
        self.buf = owned
        return owned

    def set_seqid(self, seqid: int) -> None:
        """Patch the seqid in place (``header.seqid`` keeps the one that arrived)."""
        header = self.header
        buf = self.owned()
        if header.protocol is _COMPACT:
            grown = replace_seqid(buf, header, self.start, seqid)
            if grown:
                self.header = header.replaced(
                    seqid_size=header.seqid_size + grown, body_offset=header.body_offset + grown
                )
                if self.start == 4:
                    _I32.pack_into(buf, 0, len(buf) - 4)
        else:
            _I32.pack_into(buf, self.start + header.seqid_offset, seqid)
        if self.theader is not None:
            self.theader.seqid = seqid

    def wire_with_seqid(
        self, seqid: int, transport: Transport, outer_framed: bool | None = None
    ) -> bytes | bytearray | memoryview:
        """The bytes `set_seqid`, then `to_wire`, give: one step for the usual message
        (binary, no THeader frame, already in the form ``transport`` writes), done once
        for each way of a call. A small one still in the bytes of its read gets a patched
        copy, and keeps its own bytes as they came; any other is patched in place."""
        header = self.header
        if header.protocol is not _COMPACT and self.theader is None:
            start = self.start
            in_form = (start == 4 and transport is _FRAMED) or (
                start == 0 and transport is _BUFFERED
            )
            data = self.buf
            if in_form and isinstance(data, bytes) and len(data) <= SMALL_WIRE_BYTES:
                # The bytes of the read, small: a patched copy to write, the message
                # left as it came (the cheaper copy; `with_seqid`).
                return with_seqid(data, start + header.seqid_offset, seqid)
            buf = self.owned()
            _I32.pack_into(buf, start + header.seqid_offset, seqid)
            if in_form:
                return buf
        else:
            self.set_seqid(seqid)
        return self.to_wire(transport, outer_framed)

    def payload(self) -> memoryview:
        """The message without frame prefix."""
        return memoryview(self.buf)[self.start :]

    def body(self) -> memoryview:
        """The struct after the envelope: call arguments or reply result."""
        return memoryview(self.buf)[self.start + self.header.body_offset :]

    def to_wire(
        self, transport: Transport, outer_framed: bool | None = None
    ) -> bytes | bytearray | memoryview:
        """The bytes to write for ``transport``; no copy when the form already matches.

        For THEADER the message's own frame header is used (a plain one, with
        the payload's protocol, when it came without); ``outer_framed``, when
        given, says whether the frame goes inside a frame length of its own,
        whatever the form it came in (a peer reads the form it speaks).
        """
        if transport is _THEADER:
            info = self.theader
            if info is None:
                info = THeaderFrame(protocol=self.protocol)
                info.seqid = _seqid_now(self)
            return encode_theader(info, self.payload(), outer_framed)
        if transport is _FRAMED:
            if self.start == 4:
                return self.buf
            return _I32.pack(len(self.buf)) + self.buf
        if self.start == 0:
            return self.buf
        return memoryview(self.buf)[4:]


def _seqid_now(message: Message) -> int:
    """The seqid as the bytes say now (after any patch)."""
    header = message.header
    at = message.start + header.seqid_offset
    if header.protocol is Protocol.COMPACT:
        read = read_varint(message.buf, at, len(message.buf), 5)
        assert read is not None
        raw = read[0]
        return raw - (1 << 32) if raw & 0x80000000 else raw
    value: int = _I32.unpack_from(message.buf, at)[0]
    return value


def encode_frame(message: bytes | bytearray) -> bytes:
    """Prefix one message with its frame length."""
    return _I32.pack(len(message)) + bytes(message)


def frame(message: bytes | bytearray, transport: Transport, *, outer_framed: bool = False) -> bytes:
    """One message as written on ``transport``.

    THEADER: a frame without info headers, with the payload's protocol and
    seqid; ``outer_framed`` puts it inside a frame length too (as a client
    whose THeader frames come framed expects).
    """
    if transport is Transport.THEADER:
        compact = message[:1] == bytes((PROTOCOL_ID,))
        header = parse_compact_header(message) if compact else parse_header(message)
        info = THeaderFrame(protocol=Protocol.COMPACT if compact else Protocol.BINARY)
        info.seqid = 0 if header is None else header.seqid
        info.outer_framed = outer_framed
        return encode_theader(info, message)
    return encode_frame(message) if transport is Transport.FRAMED else bytes(message)


def frame_reply(message: bytes | bytearray, request: Message, transport: Transport) -> bytes:
    """A reply (``message``, unframed) framed the way ``request`` came on ``transport``.

    For a THeader request: the same outer framing, flags and transforms; no
    info headers (a reply's are the upstream's to send).
    """
    if transport is Transport.THEADER and request.theader is not None:
        like = request.theader
        compact = message[:1] == bytes((PROTOCOL_ID,))
        header = parse_compact_header(message) if compact else parse_header(message)
        info = THeaderFrame(
            flags=like.flags,
            seqid=like.seqid if header is None else header.seqid,
            protocol=Protocol.COMPACT if compact else Protocol.BINARY,
            transforms=like.transforms,
            outer_framed=like.outer_framed,
        )
        return encode_theader(info, message)
    return frame(message, transport)
