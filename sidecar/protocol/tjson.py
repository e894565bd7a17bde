"""The Thrift JSON protocol, only as far as answering a client that speaks it.

The sidecar does not proxy TJSONProtocol; a client that speaks it gets a
TApplicationException it can decode, then the connection closes. Message form
(Apache Thrift lib/py/src/protocol/TJSONProtocol.py, writeMessageBegin and
writeFieldBegin)::

    [1,"name",type,seqid,{"1":{"str":"message"},"2":{"i32":type}}]
"""

from __future__ import annotations

import json
import re
import struct
from typing import Final

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.envelope import MAX_NAME_LENGTH, MessageType

JSON_START: Final = b'[1,"'
_ENVELOPE: Final = re.compile(rb'\[\s*1\s*,\s*"((?:[^"\\]|\\.)*)"\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,')
# Longest envelope worth waiting for: every name character escaped as \uXXXX.
MAX_ENVELOPE: Final = 6 * MAX_NAME_LENGTH + 64
_I32: Final = struct.Struct(">i")


def parse_json_envelope(data: bytes | bytearray, start: int = 0) -> tuple[str, int, int] | None:
    """(name, type, seqid) of the JSON message at ``data[start]``; None while it may be incomplete.

    Raises:
        RemoteProtocolError: kind ``json``, when the envelope cannot be read.
    """
    match = _ENVELOPE.match(bytes(data[start : start + MAX_ENVELOPE]))
    if match is None:
        if b"{" not in data[start:] and len(data) - start < MAX_ENVELOPE:
            return None
        raise unsupported_json(None)
    try:
        name = json.loads(b'"' + match.group(1) + b'"')
    except ValueError:
        raise unsupported_json(None) from None
    return str(name), int(match.group(2)), int(match.group(3))


class UnsupportedProtocolError(RemoteProtocolError):
    """A client speaks a Thrift protocol the sidecar does not proxy, but can answer in it.

    Attributes:
        protocol: ``json``.
        framed: the client frames its messages.
    """

    def __init__(
        self, message: str, *, kind: str, framed: bool, seqid: int | None, name: str | None
    ) -> None:
        super().__init__(message, kind=kind, seqid=seqid, name=name)
        self.protocol = kind
        self.framed = framed

    def answer(self, exc_type: int, message: str) -> bytes | None:
        """A TApplicationException the client decodes, in its protocol and framing.

        None when the client's seqid is unknown (nothing it would accept).
        """
        if self.seqid is None:
            return None
        name = (self.name or "").rpartition(":")[2]
        reply = encode_json_application_exception(name, self.seqid, exc_type, message)
        return _I32.pack(len(reply)) + reply if self.framed else reply


def unsupported_json(
    envelope: tuple[str, int, int] | None, framed: bool = False
) -> UnsupportedProtocolError:
    """The error for a JSON-protocol client (kind ``json``)."""
    return UnsupportedProtocolError(
        "the Thrift JSON protocol is not supported (use binary or compact)",
        kind="json",
        framed=framed,
        seqid=None if envelope is None else envelope[2],
        name=None if envelope is None else envelope[0],
    )


def encode_json_application_exception(name: str, seqid: int, exc_type: int, message: str) -> bytes:
    """A whole EXCEPTION message in TJSONProtocol form, unframed."""
    try:
        quoted_name = json.dumps(name, ensure_ascii=False)
        quoted_name.encode("utf-8")
    except UnicodeEncodeError:  # a \\udcxx escape in the client's name: the same escape back
        quoted_name = json.dumps(name)
    quoted_message = json.dumps(message, ensure_ascii=False)
    text = (
        f"[1,{quoted_name},{int(MessageType.EXCEPTION)},{seqid},"
        f'{{"1":{{"str":{quoted_message}}},"2":{{"i32":{int(exc_type)}}}}}]'
    )
    return text.encode("utf-8")
