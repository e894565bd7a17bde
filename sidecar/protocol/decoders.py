"""Message boundaries: framed and buffered decoders, binary or compact protocol.

A decoder is fed bytes in any split with ``receive_data(data)`` and returns
the complete messages they finish; ``receive_data(b"")`` means end of input.

- Framed: ``i32 length`` then exactly one message. The length is checked
  against the limit as soon as its four bytes arrive, before any body is
  buffered (a hostile length cannot make us allocate).
- Buffered (unframed): messages back to back; each ends where its struct ends,
  found by `StructSkipper` (`CompactSkipper`) without decoding it.
- THeader frames: theader_decoder.py. Detection: detect.py and auto.py.

A decoder that has raised stays broken: every later call raises the same error.
When the error comes after messages that completed in the same call, those
messages are returned first and the error is raised by the next call; the
`error` attribute shows it at once, so a caller can answer the messages and
then the error, in order, without waiting for more input.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Final

from librt.strings import read_i32_be

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import parse_compact_header
from sidecar.protocol.compact_skip import CompactSkipper
from sidecar.protocol.envelope import MessageHeader, NameCache, Protocol, identify, parse_header
from sidecar.protocol.message import Message
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, UNBOUNDED, StructSkipper, flat_struct_end

HeaderParser = Callable[[bytes | bytearray | memoryview, int], MessageHeader | None]
PARSERS: Final[dict[Protocol, HeaderParser]] = {
    Protocol.BINARY: parse_header,
    Protocol.COMPACT: parse_compact_header,
}

# Largest message accepted unless configured otherwise: 16 MiB, the design's
# default (Apache Thrift's own default frame limit is 16,384,000 bytes).
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024

_I32: Final = struct.Struct(">i")


class DecoderBase:
    """What every decoder shares: the buffer, the size limit, the error that broke it."""

    __slots__ = ("_buf", "_compact", "_names", "error", "max_size", "protocol")

    # Only a buffered walk stops before the bytes run out (`BufferedDecoder`).
    walk_pending = False

    def resume(self) -> list[Message]:
        """Go on with a walk stopped for its step budget (`BufferedDecoder.resume`)."""
        return []

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete (each decoder's own).

        Declared here so that a caller holding any decoder as a `DecoderBase`
        calls it directly in the compiled build (a union of the decoders, or a
        bound method kept as a callable, is a call through Python). Every
        decoder defines its own; this one is never called.
        """
        raise NotImplementedError(f"{type(self).__name__} defines no receive_data")

    def __init__(self, max_size: int, protocol: Protocol = Protocol.BINARY) -> None:
        self.max_size = max_size
        self.protocol = protocol
        # A plain bool: reading an enum member (Protocol.COMPACT) is a call per read.
        self._compact = protocol is Protocol.COMPACT
        self._names = NameCache()  # the last method name read: the next one is mostly the same
        self._buf = bytearray()
        # The error that broke this decoder, if any (every later call raises it). A
        # plain attribute, not a property: it is read after every read of a connection.
        self.error: RemoteProtocolError | None = None

    def _read_header(
        self, data: bytes | bytearray | memoryview, start: int
    ) -> MessageHeader | None:
        """The envelope at ``data[start]`` in this decoder's protocol (`PARSERS`).

        Both parsers called by name: the compiled build calls each directly,
        where a parser kept in an attribute was called through its Python
        signature (twice per proxied call).
        """
        if self._compact:
            return parse_compact_header(data, start, self._names)
        return parse_header(data, start, self._names)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received but not yet returned in a message."""
        return len(self._buf)

    def _fail(self, error: RemoteProtocolError) -> RemoteProtocolError:
        self.error = error
        self._buf = bytearray()
        return error

    def partial_header(self) -> MessageHeader | None:
        """The envelope of the unfinished message being received, when readable."""
        start = 4 if isinstance(self, FramedDecoder) else 0
        try:
            return self._read_header(self._buf, start) if self._buf else None
        except RemoteProtocolError:
            return None

    def _take(self, start: int, end: int) -> bytearray:
        """Bytes ``[start:end]`` of the buffer as a new array; the whole buffer when it fits."""
        if start == 0 and end == len(self._buf):
            taken = self._buf
            self._buf = bytearray()
            return taken
        return self._buf[start:end]


class FramedDecoder(DecoderBase):
    """Splits a framed byte stream into messages (of ``protocol``, binary by default)."""

    __slots__ = ()

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: bad or oversized frame length, a frame too
                short for its envelope, or input that ends inside a frame.
        """
        if self.error is not None:
            raise self.error
        buf = self._buf
        if not data:
            if buf:
                raise self._fail(_truncated(buf, 4, self._read_header))
            return []
        if (
            not buf
            and len(data) > 4
            and isinstance(data, bytes)
            and read_i32_be(data, 0) == len(data) - 4
        ):
            # The common case: one whole frame in the bytes of one read, nothing
            # pending (read in place, as `parse_header` reads bytes). Anything unusual
            # (too big, bad envelope, a bytearray) takes the general path below.
            try:
                header = self._read_header(data, 4) if len(data) - 4 <= self.max_size else None
            except RemoteProtocolError:
                header = None
            if header is not None and header.body_offset < len(data) - 4:
                return [Message(header, data, 4)]  # the read's own bytes (`Message`)
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
                _identify(error, buf, pos + 4, self._read_header)
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
                header = self._read_header(msg, 4)
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


class BufferedDecoder(DecoderBase):
    """Splits an unframed byte stream into messages by skipping each struct.

    With ``walk_steps`` the walk of one call stops after that many steps
    (`StructSkipper.advance`) even when the bytes for more are there:
    ``walk_pending`` then says so, and `resume` goes on. The caller lets
    other connections run in between, so one client's hard-to-walk message
    cannot hold the loop.
    """

    __slots__ = ("_flat", "_header", "_pos", "_skipper", "walk_pending", "walk_steps")

    def __init__(
        self,
        max_size: int,
        max_depth: int = DEFAULT_MAX_DEPTH,
        protocol: Protocol = Protocol.BINARY,
        walk_steps: int = UNBOUNDED,
    ) -> None:
        super().__init__(max_size, protocol)
        self._skipper: StructSkipper | CompactSkipper = (
            CompactSkipper(max_depth) if protocol is Protocol.COMPACT else StructSkipper(max_depth)
        )
        self._flat = protocol is not Protocol.COMPACT  # `flat_struct_end` can walk it
        self._header: MessageHeader | None = None
        self._pos = 0
        self.walk_steps = walk_steps
        self.walk_pending = False

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: a malformed envelope or struct, a message over
                the size limit, or input that ends inside a message.
        """
        if self.error is not None:
            raise self.error
        if not data:
            if self._buf:
                raise self._fail(_truncated(self._buf, 0, self._read_header, self._header))
            return []
        if not self._buf and self._flat and isinstance(data, bytes):
            # The common case: one whole message, a flat struct, in the bytes of one
            # read, nothing pending (nothing buffered means no header or walk pending
            # either): read in place, as `FramedDecoder` reads a whole frame, and kept
            # as those bytes. Anything else (more or less than one message, a nested
            # struct, too many steps, garbage) takes the walk below, which says why.
            try:
                header = self._read_header(data, 0)
            except RemoteProtocolError:
                header = None
            if header is not None:
                end = len(data)
                stop = flat_struct_end(data, header.body_offset, end, self.walk_steps)
                if stop == end and stop <= self.max_size:
                    return [Message(header, data, 0)]  # the read's own bytes (`Message`)
        self._buf += data
        if self.walk_pending:  # `resume` walks on; these bytes wait their turn
            return []
        return self._walk()

    def resume(self) -> list[Message]:
        """Walk on after ``walk_pending``: the messages completed in the next ``walk_steps``."""
        if self.error is not None:
            raise self.error
        return self._walk()

    def _walk(self) -> list[Message]:
        out: list[Message] = []
        start = 0
        skipper = self._skipper
        header = self._header
        steps = self.walk_steps
        self.walk_pending = False
        try:
            while True:
                if header is None:
                    header = self._read_header(self._buf, start)
                    if header is None:
                        break
                    buf = self._buf
                    body = start + header.body_offset
                    if self._flat:  # the usual call, a flat struct, whole: no skipper
                        stop = flat_struct_end(buf, body, len(buf), steps)
                        if stop >= 0 and stop <= start + self.max_size:
                            out.append(Message(header, self._take(start, stop), 0))
                            start = self._pos = stop
                            header = None
                            continue
                    skipper.reset()
                    self._pos = body
                buf = self._buf
                self._pos = skipper.advance(buf, self._pos, len(buf), start + self.max_size, steps)
                if not skipper.done:
                    self.walk_pending = skipper.out_of_steps
                    break
                out.append(Message(header, self._take(start, self._pos), 0))
                start = self._pos
                header = None
        except RemoteProtocolError as exc:
            if exc.seqid is None and header is not None:
                identify(exc, header)
            self._fail(exc)
            if out:  # deliver the whole messages before the error; the next call raises
                return out
            raise exc from None
        self._header = header
        if start and self._buf:
            del self._buf[:start]
        self._pos -= start
        return out


def _identify(
    error: RemoteProtocolError, buf: bytearray, start: int, parse: HeaderParser = parse_header
) -> None:
    """Attach the seqid and name of the message at ``start`` to ``error`` when readable."""
    try:
        header = parse(buf, start)
    except RemoteProtocolError:
        return
    if header is not None:
        identify(error, header)


def _truncated(
    buf: bytearray, start: int, parse: HeaderParser, header: MessageHeader | None = None
) -> RemoteProtocolError:
    error = RemoteProtocolError(
        f"connection ended inside a message ({len(buf)} bytes unfinished)", kind="truncated"
    )
    if header is not None:
        identify(error, header)
    else:
        _identify(error, buf, start, parse)
    return error
