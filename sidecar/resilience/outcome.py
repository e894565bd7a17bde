"""What one attempt came to, read from the reply bytes or the I/O error alone (no IDL).

| outcome            | evidence                                   | breaker failure |
|--------------------|--------------------------------------------|-----------------|
| ok                 | REPLY whose result has field 0, or is void | no              |
| declared_exception | REPLY whose result has a field id >= 1     | no              |
| app_exception      | EXCEPTION of any type but INTERNAL_ERROR   | no              |
| internal_error     | EXCEPTION with type INTERNAL_ERROR         | yes             |
| connect_error      | refused, unreachable, connect timeout      | yes             |
| connection_closed  | reset or EOF before the whole reply        | yes             |
| timeout            | the per-try timeout expired                | yes             |
| protocol_error     | garbage or a wrong seqid from the upstream | yes             |

Which outcomes are retried and which trip the breaker is configuration
(``retry.retry_on``, ``breaker.trip_on``); the defaults follow this table.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from sidecar.errors import (
    ProtocolError,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from sidecar.protocol.appexc import ApplicationExceptionType, parse_application_exception
from sidecar.protocol.envelope import MessageType, Protocol
from sidecar.protocol.fields import BINARY_FIELD_TYPES, first_field_id
from sidecar.protocol.skip import TType


class Outcome(StrEnum):
    """The result of one attempt."""

    OK = "ok"
    DECLARED_EXCEPTION = "declared_exception"
    APP_EXCEPTION = "app_exception"
    INTERNAL_ERROR = "internal_error"
    CONNECT_ERROR = "connect_error"
    CONNECTION_CLOSED = "connection_closed"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"


# Enum members as plain names for classify_reply: reading Outcome.OK costs a descriptor call.
_OK: Final = Outcome.OK
_DECLARED: Final = Outcome.DECLARED_EXCEPTION
_REPLY: Final = MessageType.REPLY
_BINARY: Final = Protocol.BINARY


def classify_reply(
    mtype: int,
    body: bytes | bytearray | memoryview,
    protocol: Protocol = Protocol.BINARY,
    at: int = 0,
) -> Outcome:
    """Classify a reply message from its type and result struct.

    Args:
        mtype: the envelope's message type.
        body: the struct after the envelope; or, with ``at``, bytes holding it.
        protocol: the protocol the reply is in.
        at: where the struct begins in ``body`` (a message's own buffer is read
            in place, with no view made of it).
    """
    if mtype == _REPLY and protocol is _BINARY:  # the common case, inline
        size = len(body) - at
        if size <= 0:
            return Outcome.PROTOCOL_ERROR
        # The field id, big-endian, is 0 (the success field) when both its bytes
        # are: two reads, where struct would be a method call and a tuple. On
        # bytes (a reply as the event loop handed it over) the compiled build
        # reads each byte as a load; on the other buffers, through the object:
        # the same reads, written twice so that the first are typed bytes.
        first: int
        zero_id: bool
        if isinstance(body, bytes):
            first = body[at]
            zero_id = size >= 3 and body[at + 1] == 0 and body[at + 2] == 0
        else:
            first = body[at]
            zero_id = size >= 3 and body[at + 1] == 0 and body[at + 2] == 0
        if first == TType.STOP:
            return _OK
        if size < 3 or first not in BINARY_FIELD_TYPES:
            return Outcome.PROTOCOL_ERROR
        return _OK if zero_id else _DECLARED
    if at:
        body = memoryview(body)[at:]
    if mtype == _REPLY:
        try:
            field = first_field_id(body, protocol)
        except ProtocolError:
            return Outcome.PROTOCOL_ERROR
        return Outcome.OK if field is None or field == 0 else Outcome.DECLARED_EXCEPTION
    if mtype == MessageType.EXCEPTION:
        try:
            exc_type, _ = parse_application_exception(body, protocol)
        except ProtocolError:
            return Outcome.PROTOCOL_ERROR
        if exc_type == ApplicationExceptionType.INTERNAL_ERROR:
            return Outcome.INTERNAL_ERROR
        return Outcome.APP_EXCEPTION
    return Outcome.PROTOCOL_ERROR


# The outcome each kind of failed exchange comes to.
_ERROR_OUTCOMES: Final[dict[type[UpstreamError], Outcome]] = {
    UpstreamUnavailable: Outcome.CONNECT_ERROR,
    UpstreamClosed: Outcome.CONNECTION_CLOSED,
    UpstreamTimeout: Outcome.TIMEOUT,
    UpstreamProtocolError: Outcome.PROTOCOL_ERROR,
}


def classify_error(error: UpstreamError) -> Outcome:
    """The outcome of an exchange that failed with ``error`` (closed, by default)."""
    return _ERROR_OUTCOMES.get(type(error), Outcome.CONNECTION_CLOSED)
