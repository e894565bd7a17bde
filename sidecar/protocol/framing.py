"""Message boundaries: framed and buffered transports, and telling them apart.

A decoder is fed bytes in any split with ``receive_data(data)`` and returns
the complete messages they finish; ``receive_data(b"")`` means end of input.

- Framed: ``i32 length`` then exactly one message. The length is checked
  against the limit as soon as its four bytes arrive, before any body is
  buffered (a hostile length cannot make us allocate).
- Buffered (unframed): messages back to back; each ends where its struct ends,
  found by `StructSkipper` without decoding it.
- Auto: the first bytes of a connection decide (see `detect_transport`).

Each `Message` owns its bytes in a ``bytearray`` so that its seqid can be
patched in place; when it arrived framed, the frame prefix is kept in front of
it and the message can be forwarded framed without another copy.

A decoder that has raised stays broken: every later call raises the same error.
When the error comes after messages that completed in the same call, those
messages are returned first and the error is raised by the next call; the
`error` property shows it at once, so a caller can answer the messages and
then the error, in order, without waiting for more input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.envelope import MAX_NAME_LENGTH, MessageHeader, MessageType, parse_header
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, StructSkipper

# Largest message accepted unless configured otherwise: 16 MiB, the design's
# default (Apache Thrift's own default frame limit is 16,384,000 bytes).
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_I32 = struct.Struct(">i")


class Transport(StrEnum):
    """How messages are delimited on a connection."""

    FRAMED = "framed"
    BUFFERED = "buffered"


@dataclass(slots=True)
class Message:
    """One complete message.

    Attributes:
        header: the envelope as it arrived.
        buf: the bytes; owned by this message and safe to patch.
        start: 4 when ``buf`` begins with the frame length prefix, else 0.
    """

    header: MessageHeader
    buf: bytearray
    start: int

    @property
    def size(self) -> int:
        """Length of the message without any frame prefix."""
        return len(self.buf) - self.start

    def set_seqid(self, seqid: int) -> None:
        """Patch the seqid in place (the header keeps the one that arrived)."""
        _I32.pack_into(self.buf, self.start + self.header.seqid_offset, seqid)

    def payload(self) -> memoryview:
        """The message without frame prefix."""
        return memoryview(self.buf)[self.start :]

    def body(self) -> memoryview:
        """The struct after the envelope: call arguments or reply result."""
        return memoryview(self.buf)[self.start + self.header.body_offset :]

    def to_wire(self, transport: Transport) -> bytes | bytearray | memoryview:
        """The bytes to write for ``transport``; no copy when the form already matches."""
        if transport is Transport.FRAMED:
            if self.start == 4:
                return self.buf
            return _I32.pack(len(self.buf)) + self.buf
        if self.start == 0:
            return self.buf
        return memoryview(self.buf)[4:]


def encode_frame(message: bytes | bytearray) -> bytes:
    """Prefix one message with its frame length."""
    return _I32.pack(len(message)) + bytes(message)


def frame(message: bytes | bytearray, transport: Transport) -> bytes:
    """One message as written on ``transport``."""
    return encode_frame(message) if transport is Transport.FRAMED else bytes(message)


class _Decoder:
    __slots__ = ("_buf", "_error", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._error: RemoteProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._buf)

    @property
    def error(self) -> RemoteProtocolError | None:
        """The error that broke this decoder, if any (every later call raises it)."""
        return self._error

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        self._error = error
        self._buf = bytearray()
        return error

    def _take(self, start: int, end: int) -> bytearray:
        """Bytes ``[start:end]`` of the buffer as a new array; the whole buffer when it fits."""
        if start == 0 and end == len(self._buf):
            taken = self._buf
            self._buf = bytearray()
            return taken
        return self._buf[start:end]


class FramedDecoder(_Decoder):
    """Splits a framed byte stream into messages."""

    __slots__ = ()

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: bad or oversized frame length, a frame too
                short for its envelope, or input that ends inside a frame.
        """
        if self._error is not None:
            raise self._error
        buf = self._buf
        if not data:
            if buf:
                raise self._fail(_truncated(buf, 4))
            return []
        if not buf and len(data) > 4 and _I32.unpack_from(data, 0)[0] == len(data) - 4:
            # The common case: one whole frame, nothing pending. Anything unusual
            # (too big, bad envelope) takes the general path below, which reports it.
            try:
                header = parse_header(data, 4) if len(data) - 4 <= self.max_size else None
            except RemoteProtocolError:
                header = None
            if header is not None and header.body_offset < len(data) - 4:
                return [Message(header, bytearray(data), 4)]
        buf += data
        out: list[Message] = []
        try:
            self._split(out)
        except RemoteProtocolError:
            if not out:
                raise
            # The messages before the error are whole: deliver them; the next call raises.
        return out

    def _split(self, out: list[Message]) -> None:
        """Move every whole frame from the buffer to ``out``."""
        buf = self._buf
        pos = 0
        end = len(buf)
        max_size = self.max_size
        while end - pos >= 4:
            length = _I32.unpack_from(buf, pos)[0]
            if length > max_size:
                error = RemoteProtocolError(
                    f"frame of {length} bytes exceeds the {max_size}-byte limit",
                    kind="oversized",
                )
                _identify(error, buf, pos + 4)
                raise self._fail(error)
            if length <= 0:
                raise self._fail(
                    RemoteProtocolError(f"invalid frame length {length}", kind="garbage")
                )
            stop = pos + 4 + length
            if stop > end:
                break
            msg = self._take(pos, stop)
            buf = self._buf if msg is buf else buf
            try:
                header = parse_header(msg, 4)
            except RemoteProtocolError as exc:
                raise self._fail(exc) from None
            if header is None or header.body_offset >= length:
                raise self._fail(
                    RemoteProtocolError(
                        "frame shorter than its message envelope",
                        kind="garbage",
                        seqid=None if header is None else header.seqid,
                        strict=True if header is None else header.strict,
                    )
                )
            out.append(Message(header, msg, 4))
            pos = stop
        if pos and buf is self._buf:
            del buf[:pos]


class BufferedDecoder(_Decoder):
    """Splits an unframed byte stream into messages by skipping each struct."""

    __slots__ = ("_header", "_pos", "_skipper")

    def __init__(self, max_size: int, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        super().__init__(max_size)
        self._skipper = StructSkipper(max_depth)
        self._header: MessageHeader | None = None
        self._pos = 0

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: a malformed envelope or struct, a message over
                the size limit, or input that ends inside a message.
        """
        if self._error is not None:
            raise self._error
        if not data:
            if self._buf:
                raise self._fail(_truncated(self._buf, 0, self._header))
            return []
        self._buf += data
        out: list[Message] = []
        start = 0
        skipper = self._skipper
        header = self._header
        try:
            while True:
                if header is None:
                    header = parse_header(self._buf, start)
                    if header is None:
                        break
                    skipper.reset()
                    self._pos = start + header.body_offset
                buf = self._buf
                self._pos = skipper.advance(buf, self._pos, len(buf), start + self.max_size)
                if not skipper.done:
                    break
                out.append(Message(header, self._take(start, self._pos), 0))
                start = self._pos
                header = None
        except RemoteProtocolError as exc:
            if exc.seqid is None and header is not None:
                exc.seqid = header.seqid
                exc.name = header.name
                exc.strict = header.strict
            self._fail(exc)
            if out:  # deliver the whole messages before the error; the next call raises
                return out
            raise exc from None
        self._header = header
        if start and self._buf:
            del self._buf[:start]
        self._pos -= start
        return out


def _identify(error: RemoteProtocolError, buf: bytearray, start: int) -> None:
    """Attach the seqid and name of the message at ``start`` to ``error`` when readable."""
    try:
        header = parse_header(buf, start)
    except RemoteProtocolError:
        return
    if header is not None:
        error.seqid = header.seqid
        error.name = header.name
        error.strict = header.strict


def _truncated(
    buf: bytearray, start: int, header: MessageHeader | None = None
) -> RemoteProtocolError:
    error = RemoteProtocolError(
        f"connection ended inside a message ({len(buf)} bytes unfinished)", kind="truncated"
    )
    if header is not None:
        error.seqid = header.seqid
        error.name = header.name
        error.strict = header.strict
    else:
        _identify(error, buf, start)
    return error


# Bytes that begin requests of other protocols, refused with a clear message.
_HTTP_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"PRI ", b"CONN")
_CLIENT_TYPES = frozenset({int(MessageType.CALL), int(MessageType.ONEWAY)})
_COMPACT_ID = 0x82
_HEADER_MAGIC = b"\x0f\xff"


def detect_transport(prefix: bytes | bytearray) -> Transport | None:
    """Tell from the first bytes of a client connection how it frames messages.

    Rules of this function, in order:
      - ``0x82`` first: compact protocol, refused (kind ``compact``).
      - ``0x80 0x01`` first: buffered, strict binary envelope.
      - a frame length, then ``0x80 0x01``: framed, strict envelope.
      - a frame length, then ``0x82``: framed compact, refused; then ``0x0f 0xff``:
        THeader, refused (kind ``unsupported``).
      - a frame length, then a non-strict envelope of a call: framed, non-strict.
      - a non-strict envelope of a call: buffered, non-strict.
      - the start of an HTTP request, or anything else: refused.

    Returns:
        The transport, or None when more bytes are needed to decide.

    Raises:
        RemoteProtocolError: the client does not speak binary-protocol Thrift.
    """
    n = len(prefix)
    if n == 0:
        return None
    if prefix[0] == _COMPACT_ID:
        raise _compact()
    if n < 2:
        return None
    if prefix[0] == 0x80:
        if prefix[1] == 0x01:
            return Transport.BUFFERED
        raise RemoteProtocolError("not Thrift binary protocol (bad version bytes)", kind="garbage")
    if n >= 4 and bytes(prefix[:4]) in _HTTP_METHODS:
        raise RemoteProtocolError(
            "an HTTP request arrived on the Thrift port (use the admin port for HTTP)",
            kind="http",
        )
    if prefix[0] & 0x80:
        raise RemoteProtocolError("not Thrift binary protocol", kind="garbage")
    if n < 6:
        return None
    marker = bytes(prefix[4:6])
    if marker == b"\x80\x01":
        return Transport.FRAMED
    if prefix[4] == _COMPACT_ID:
        raise _compact()
    if marker == _HEADER_MAGIC:
        raise RemoteProtocolError("THeader transport is not supported", kind="unsupported")
    framed = _nonstrict_call_at(prefix, 4)
    if framed is None:
        return None
    if framed:
        return Transport.FRAMED
    buffered = _nonstrict_call_at(prefix, 0)
    if buffered is None:
        return None
    if buffered:
        return Transport.BUFFERED
    raise RemoteProtocolError("not Thrift binary protocol", kind="garbage")


def _nonstrict_call_at(prefix: bytes | bytearray, at: int) -> bool | None:
    """Does a non-strict CALL/ONEWAY envelope start at ``at``? None: too few bytes to say."""
    if len(prefix) < at + 4:
        return None
    name_len = _I32.unpack_from(prefix, at)[0]
    if not 0 < name_len <= MAX_NAME_LENGTH:
        return False
    type_at = at + 4 + name_len
    if len(prefix) <= type_at:
        return None
    return prefix[type_at] in _CLIENT_TYPES


def _compact() -> RemoteProtocolError:
    return RemoteProtocolError("compact protocol is not supported", kind="compact")


class AutoDecoder:
    """Detects the client's transport from its first bytes, then decodes with it."""

    __slots__ = ("_error", "_inner", "_make", "_prefix", "transport")

    def __init__(self, make: Callable[[Transport], FramedDecoder | BufferedDecoder]) -> None:
        self._make = make
        self._prefix = bytearray()
        self._inner: FramedDecoder | BufferedDecoder | None = None
        self._error: RemoteProtocolError | None = None
        self.transport: Transport | None = None

    @property
    def error(self) -> RemoteProtocolError | None:
        """The error that broke this decoder, if any (every later call raises it)."""
        return self._inner.error if self._inner is not None else self._error

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete (see the decoders)."""
        if self._inner is not None:
            return self._inner.receive_data(data)
        if self._error is not None:
            raise self._error
        try:
            transport = self._detect(data)
        except RemoteProtocolError as exc:
            self._error = exc
            self._prefix = bytearray()
            raise
        if transport is None:
            return []
        self.transport = transport
        self._inner = self._make(transport)
        prefix, self._prefix = self._prefix, bytearray()
        return self._inner.receive_data(prefix)

    def _detect(self, data: bytes | bytearray) -> Transport | None:
        if not data:
            if self._prefix:
                raise RemoteProtocolError(
                    "connection ended before a whole message envelope", kind="truncated"
                )
            return None
        self._prefix += data
        transport = detect_transport(self._prefix)
        if transport is None and len(self._prefix) > MAX_NAME_LENGTH + 16:
            raise RemoteProtocolError("not Thrift binary protocol", kind="garbage")
        return transport


def make_decoder(
    transport: Transport,
    max_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> FramedDecoder | BufferedDecoder:
    """A decoder for a known transport."""
    if transport is Transport.FRAMED:
        return FramedDecoder(max_size)
    return BufferedDecoder(max_size, max_depth)
