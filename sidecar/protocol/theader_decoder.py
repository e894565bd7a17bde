"""Splits a stream of THeader frames into messages (the decoder interface of framing.py).

Each frame's length is checked against the limit as soon as its four bytes
arrive. A whole frame is parsed with `parse_theader`; its payload, with any
zlib transform undone, must be one binary or compact message. The `Message`
holds that payload (``start`` 0) and the frame's header in ``theader``; a
frame inside an outer frame length is recognised per frame and remembered.
"""

from __future__ import annotations

import struct
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.decoders import PARSERS, DecoderBase
from sidecar.protocol.message import Message
from sidecar.protocol.theader import MAGIC_BYTES, parse_theader

_I32: Final = struct.Struct(">i")


class THeaderDecoder(DecoderBase):
    """Splits THeader frames into messages.

    Attributes:
        outer_framed: whether the last frame came inside a frame length (None
            before the first frame); answers to the peer should do the same.
    """

    __slots__ = ("outer_framed",)

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self.outer_framed: bool | None = None

    def receive_data(self, data: bytes | bytearray) -> list[Message]:
        """Feed bytes; return the messages they complete.

        Raises:
            RemoteProtocolError: a bad or oversized frame length, a malformed
                THeader, an unsupported transform or payload protocol (kind
                ``unsupported``), or input that ends inside a frame.
        """
        if self.error is not None:
            raise self.error
        if not data:
            if self._buf:
                raise self._fail(
                    RemoteProtocolError(
                        f"connection ended inside a frame ({len(self._buf)} bytes unfinished)",
                        kind="truncated",
                    )
                )
            return []
        self._buf += data
        out: list[Message] = []
        try:
            self._split(out)
        except RemoteProtocolError:
            if not out:
                raise
        return out

    def _split(self, out: list[Message]) -> None:
        buf = self._buf
        pos = 0
        while len(buf) - pos >= 4:
            length = _I32.unpack_from(buf, pos)[0]
            if length > self.max_size:
                raise self._fail(
                    RemoteProtocolError(
                        f"frame of {length} bytes exceeds the {self.max_size}-byte limit",
                        kind="oversized",
                    )
                )
            if length <= 0:
                raise self._fail(
                    RemoteProtocolError(f"invalid frame length {length}", kind="garbage")
                )
            stop = pos + 4 + length
            if stop > len(buf):
                break
            try:
                out.append(self._message(memoryview(bytes(buf[pos + 4 : stop]))))
            except RemoteProtocolError as exc:
                raise self._fail(exc) from None
            pos = stop
        if pos:
            del buf[:pos]

    def _message(self, content: memoryview) -> Message:
        outer = False
        if content[:2] != MAGIC_BYTES:
            if len(content) >= 6 and (
                _I32.unpack_from(content, 0)[0] == len(content) - 4 and content[4:6] == MAGIC_BYTES
            ):
                outer = True
                content = content[4:]
            else:
                raise RemoteProtocolError("not a THeader frame", kind="garbage")
        self.outer_framed = outer
        info, payload = parse_theader(content, self.max_size)
        info.outer_framed = outer
        body = bytearray(payload)
        try:
            header = PARSERS[info.protocol](body, 0)
        except RemoteProtocolError as exc:
            if exc.seqid is None:
                exc.seqid = info.seqid
            raise
        if header is None or header.body_offset >= len(body):
            raise RemoteProtocolError(
                "THeader payload shorter than its message envelope",
                kind="garbage",
                seqid=info.seqid,
            )
        return Message(header, body, 0, info)
