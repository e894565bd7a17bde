"""The forms a message takes between a client and the upstream.

A call goes to the upstream in the upstream's protocol (``upstream.protocol``:
the client's by default) with a strict envelope, and its reply comes back to
the client in the client's protocol. Both protocols are self-describing, so
transcoding needs no IDL (`sidecar.protocol.transcode`). A THeader call stays
THeader upstream (its info headers travel both ways unchanged), with two
headers of the sidecar's added on the way up: `ATTEMPT_HEADER` and
`DEADLINE_HEADER`.

Nothing is copied when the forms already match, which is the common case.
"""

from __future__ import annotations

from typing import Final

from sidecar.protocol.compact import parse_compact_header
from sidecar.protocol.envelope import MessageHeader, Protocol, encode_header, parse_header
from sidecar.protocol.framing import Message, Transport
from sidecar.protocol.theader import THeaderFrame
from sidecar.protocol.transcode import transcode_message

# Info headers the sidecar adds to a THeader call it sends upstream: the attempt
# number (the first is 1) and the milliseconds left until the call's deadline.
ATTEMPT_HEADER: Final = "sidecar-attempt"
DEADLINE_HEADER: Final = "sidecar-deadline-ms"

_PARSE: Final = {Protocol.BINARY: parse_header, Protocol.COMPACT: parse_compact_header}


def upstream_transport(client: Transport, configured: Transport | None) -> Transport:
    """The transport a call goes upstream on: THeader stays THeader; else as configured."""
    if client is Transport.THEADER or configured is None:
        return client
    return configured


def for_upstream(message: Message, protocol: Protocol, *, max_size: int, max_depth: int) -> Message:
    """The call as the upstream gets it: in ``protocol``, with a strict envelope.

    The message itself when nothing changes. A non-strict binary envelope is
    made strict (every binary server reads strict envelopes; some read no
    other), which copies the message once.

    Raises:
        RemoteProtocolError: the call cannot be transcoded (malformed, too deep
            or too big).
    """
    header = message.header
    if header.protocol is protocol:
        if protocol is Protocol.BINARY and not header.strict:
            return _strict(message)
        return message
    data = transcode_message(
        message.payload(), header.protocol, protocol, max_depth=max_depth, max_size=max_size
    )
    return _message(data, protocol, message.theader)


def for_client(reply: Message, request: Message, *, max_size: int, max_depth: int) -> Message:
    """The upstream's reply in the protocol of the client's ``request``.

    Raises:
        RemoteProtocolError: the reply cannot be transcoded.
    """
    protocol = request.header.protocol
    if reply.header.protocol is protocol:
        return reply
    data = transcode_message(
        reply.payload(), reply.header.protocol, protocol, max_depth=max_depth, max_size=max_size
    )
    return _message(data, protocol, reply.theader)


def set_theader_headers(message: Message, attempt: int, deadline_ms: int) -> None:
    """Tell a THeader upstream which attempt this is and how long is left."""
    info = message.theader
    if info is not None:
        info.set_header(ATTEMPT_HEADER, str(attempt))
        info.set_header(DEADLINE_HEADER, str(max(0, deadline_ms)))


def client_timeout(message: Message, header_name: str | None) -> float | None:
    """Seconds the client gives the call in its THeader ``header_name`` (milliseconds), if any."""
    info = message.theader
    if info is None or header_name is None:
        return None
    value = info.get_header(header_name)
    if value is None:
        return None
    try:
        millis = int(value.strip())
    except ValueError:
        return None
    return millis / 1000 if millis > 0 else None


def _strict(message: Message) -> Message:
    header = message.header
    envelope = encode_header(header.name, header.type, header.seqid, True)
    data = bytearray(envelope)
    data += message.body()
    return _message(data, Protocol.BINARY, message.theader)


def _message(data: bytes | bytearray, protocol: Protocol, theader: THeaderFrame | None) -> Message:
    header: MessageHeader | None = _PARSE[protocol](data, 0)
    assert header is not None, "a re-encoded message has a whole envelope"
    info = None
    if theader is not None:
        info = THeaderFrame(
            flags=theader.flags,
            seqid=header.seqid,
            protocol=protocol,
            transforms=theader.transforms,
            headers=dict(theader.headers),
            other_info=theader.other_info,
            outer_framed=theader.outer_framed,
        )
    return Message(header, bytearray(data), 0, info)
