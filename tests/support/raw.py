"""Calls over a bare socket: exact bytes out, exact bytes back.

For tests that check what no library client checks: the reply's seqid and
method name, its envelope form, replies to pipelined requests, garbage.

- `raw_calls` sends messages (framing them when the transport is framed) and
  reads a number of reply messages: framed by their length prefix, buffered
  with `sidecar.protocol.framing.BufferedDecoder`. One deadline covers it all.
- `encode_call` builds a real call message with thriftpy2's encoder, and
  `decode_reply` turns reply bytes back into a value or raises what the
  reply carries.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import thriftpy2.protocol
import thriftpy2.thrift
import thriftpy2.transport

from sidecar.protocol.framing import Transport, frame, make_decoder
from tests.support.clients import split_address
from tests.support.idl import load_thriftpy2_interop

# Replies up to 64 MiB: above every payload the tests send.
MAX_REPLY_BYTES = 64 * 1024 * 1024
_RECV_BYTES = 256 * 1024


class ConnectionClosed(ConnectionError):
    """The peer closed the connection before every expected reply arrived.

    Attributes:
        replies: the complete replies received before the close.
    """

    def __init__(self, message: str, replies: list[bytes]) -> None:
        super().__init__(message)
        self.replies = replies


def raw_calls(
    address: str,
    messages: Sequence[bytes],
    transport: Transport | str,
    *,
    replies: int | None = None,
    timeout: float = 5.0,
) -> list[bytes]:
    """Send ``messages`` on one new connection at once, read ``replies`` replies.

    Args:
        address: ``"host:port"``.
        messages: whole messages without frame prefix; framed here when the
            transport is framed.
        transport: ``"framed"`` or ``"buffered"`` (or a `Transport`).
        replies: replies to wait for; default one per message (pass fewer
            when some messages are oneway).
        timeout: seconds for connect, send and every reply together.

    Returns:
        Each reply message as bytes, without frame prefix, in arrival order.

    Raises:
        ConnectionClosed: EOF before all replies arrived.
        TimeoutError: the deadline passed first.
        sidecar.errors.RemoteProtocolError: the bytes back are not Thrift.
    """
    transport = Transport(transport)
    wanted = len(messages) if replies is None else replies
    deadline = time.monotonic() + timeout
    out: list[bytes] = []
    with socket.create_connection(split_address(address), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"".join(frame(m, transport) for m in messages))
        decoder = make_decoder(transport, MAX_REPLY_BYTES)
        while len(out) < wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(out)} of {wanted} replies within {timeout}s")
            sock.settimeout(remaining)
            data = sock.recv(_RECV_BYTES)
            if not data:
                raise ConnectionClosed(
                    f"connection closed after {len(out)} of {wanted} replies", out
                )
            out.extend(bytes(m.payload()) for m in decoder.receive_data(data))
    return out


def raw_call(
    address: str, message: bytes, transport: Transport | str, *, timeout: float = 5.0
) -> bytes:
    """Send one message on a new connection and return the one reply (see `raw_calls`)."""
    return raw_calls(address, [message], transport, timeout=timeout)[0]


def raw_send(address: str, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` exactly as given, half-close, and return all bytes until EOF.

    For garbage and truncated input: nothing is framed or parsed.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    with socket.create_connection(split_address(address), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no EOF within {timeout}s")
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(_RECV_BYTES)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _service_module(service: str) -> Any:
    return getattr(load_thriftpy2_interop(), service)


def encode_call(
    method: str,
    args: dict[str, Any] | None = None,
    *,
    seqid: int = 1,
    service: str = "Interop",
    multiplexed: bool = False,
    strict: bool = True,
    name: str | None = None,
) -> bytes:
    """A call message of the interop IDL, encoded by thriftpy2.

    Args:
        method: method of ``service``; its ``_args`` struct is encoded.
        args: argument values by IDL name, e.g. ``{"id": 7}``.
        seqid: the envelope's sequence id.
        service: ``"Interop"`` or ``"Echo"``.
        multiplexed: name the message ``"<service>:<method>"``.
        strict: strict (versioned) or old non-strict envelope.
        name: the envelope's name verbatim, overriding the above (for
            unknown methods and other mistakes).

    Returns:
        The message without frame prefix; CALL, or ONEWAY for oneway methods.
    """
    module = _service_module(service)
    oneway = getattr(module, method + "_result").oneway
    mtype = thriftpy2.thrift.TMessageType.ONEWAY if oneway else thriftpy2.thrift.TMessageType.CALL
    if name is None:
        name = f"{service}:{method}" if multiplexed else method
    buf = thriftpy2.transport.TCyMemoryBuffer()
    proto = thriftpy2.protocol.TCyBinaryProtocol(buf, strict_write=strict)
    proto.write_message_begin(name, mtype, seqid)
    proto.write_struct(getattr(module, method + "_args")(**(args or {})))
    proto.write_message_end()
    return bytes(buf.getvalue())


def decode_reply(method: str, data: bytes, *, service: str = "Interop") -> Any:
    """The value a reply message carries, decoded by thriftpy2.

    Returns:
        The success value (None for void).

    Raises:
        The declared exception the reply carries, or
        ``thriftpy2.thrift.TApplicationException`` for an EXCEPTION message.
    """
    module = _service_module(service)
    proto = thriftpy2.protocol.TCyBinaryProtocol(
        thriftpy2.transport.TCyMemoryBuffer(data), strict_read=False
    )
    _, mtype, _ = proto.read_message_begin()
    if mtype == thriftpy2.thrift.TMessageType.EXCEPTION:
        exc = thriftpy2.thrift.TApplicationException()
        proto.read_struct(exc)
        raise exc
    result = getattr(module, method + "_result")()
    proto.read_struct(result)
    for spec in result.thrift_spec.values():
        field = spec[1]
        value = getattr(result, field, None)
        if field != "success" and value is not None:
            raise value
    return getattr(result, "success", None)
