"""Bytes written and read by Apache Thrift's own Python library, for the protocol tests.

`call_wire` builds one call ``name(1: string arg)`` as a client of the given
protocol and transport writes it; `read_exception` reads a
TApplicationException reply the way such a client does. Everything goes
through in-memory transports: no sockets.
"""

from __future__ import annotations

from typing import Any

from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.protocol.THeaderProtocol import THeaderProtocol
from thrift.protocol.TJSONProtocol import TJSONProtocol
from thrift.Thrift import TApplicationException, TMessageType, TType
from thrift.transport.THeaderTransport import (
    THeaderClientType,
    THeaderSubprotocolID,
    THeaderTransformID,
)
from thrift.transport.TTransport import TFramedTransport, TMemoryBuffer

PROTOCOLS = ("binary", "compact", "json", "header-binary", "header-compact")
_ALL_CLIENT_TYPES = [
    THeaderClientType.HEADERS,
    THeaderClientType.FRAMED_BINARY,
    THeaderClientType.UNFRAMED_BINARY,
    THeaderClientType.FRAMED_COMPACT,
    THeaderClientType.UNFRAMED_COMPACT,
]


def _protocol(name: str, trans: Any) -> Any:
    if name == "binary":
        return TBinaryProtocol(trans)
    if name == "compact":
        return TCompactProtocol(trans)
    if name == "json":
        return TJSONProtocol(trans)
    sub = THeaderSubprotocolID.COMPACT if name == "header-compact" else THeaderSubprotocolID.BINARY
    return THeaderProtocol(trans, _ALL_CLIENT_TYPES, sub)


def call_wire(
    protocol: str,
    transport: str,
    name: str = "testString",
    seqid: int = 7,
    arg: str = "hello",
    headers: dict[bytes, bytes] | None = None,
    zlib: bool = False,
    mtype: int = TMessageType.CALL,
) -> bytes:
    """One call as Apache's client writes it (``transport``: buffered or framed)."""
    out = TMemoryBuffer()
    trans: Any = TFramedTransport(out) if transport == "framed" else out
    proto = _protocol(protocol, trans)
    if headers:
        for key, value in headers.items():
            proto.set_header(key, value)
    if zlib:
        proto.add_transform(THeaderTransformID.ZLIB)
    proto.writeMessageBegin(name, mtype, seqid)
    proto.writeStructBegin("args")
    proto.writeFieldBegin("arg", TType.STRING, 1)
    proto.writeString(arg)
    proto.writeFieldEnd()
    proto.writeFieldStop()
    proto.writeStructEnd()
    proto.writeMessageEnd()
    proto.trans.flush()
    return out.getvalue()


def read_message(data: bytes, protocol: str, transport: str) -> tuple[str, int, int, Any]:
    """(name, type, seqid, protocol) of the message at the start of ``data``, read by Apache."""
    trans: Any = TMemoryBuffer(data)
    if transport == "framed":
        trans = TFramedTransport(trans)
    proto = _protocol(protocol, trans)
    name, mtype, seqid = proto.readMessageBegin()
    return name, mtype, seqid, proto


def read_exception(data: bytes, protocol: str, transport: str) -> tuple[str, int, int, int, str]:
    """(name, message type, seqid, exception type, text) of a TApplicationException reply."""
    name, mtype, seqid, proto = read_message(data, protocol, transport)
    exc = TApplicationException()
    exc.read(proto)
    proto.readMessageEnd()
    return name, mtype, seqid, exc.type, exc.message


def read_string_arg(
    data: bytes, protocol: str, transport: str
) -> tuple[str, int, str, dict[Any, Any]]:
    """(name, seqid, field 1, THeader info headers) of a call written by `call_wire`."""
    name, _, seqid, proto = read_message(data, protocol, transport)
    proto.readStructBegin()
    _, ftype, fid = proto.readFieldBegin()
    assert (ftype, fid) == (TType.STRING, 1)
    arg = proto.readString()
    headers = proto.get_headers() if isinstance(proto, THeaderProtocol) else {}
    return name, seqid, arg, dict(headers)
