"""Binary-protocol bytes for the fuzzer, written by hand so that every length is known.

The fuzzer needs more than valid messages: it needs to know where each
string length, container size and frame length sits, to make them lie. So
calls of the interop IDL (``idl/interop.thrift``) are encoded here with a
small `Writer` that records those offsets, independently of the sidecar's
own codec. Replies are only read as far as their envelope (`read_envelope`)
and split from a stream (`split_messages`); their values are decoded with
thriftpy2 by the good client.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import StrEnum
from io import BytesIO
from typing import Any

from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TApplicationException, TType

# thriftpy2's pure-Python protocol (untyped): walks buffered replies independently of the sidecar.
_PurePythonBinary: Any = TBinaryProtocol

I32 = struct.Struct(">i")
I64 = struct.Struct(">q")

# Message types and field types of the binary protocol.
CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
T_STOP, T_BOOL, T_BYTE, T_DOUBLE, T_I16, T_I32, T_I64 = 0, 2, 3, 4, 6, 8, 10
T_STRING, T_STRUCT, T_MAP, T_SET, T_LIST = 11, 12, 13, 14, 15
VERSION_1 = 0x80010000
# The biggest reply read back.
MAX_REPLY_BYTES = 64 << 20


class Transport(StrEnum):
    """How messages are delimited on a connection."""

    FRAMED = "framed"
    BUFFERED = "buffered"


@dataclass
class Writer:
    """Appends binary-protocol values, remembering where the lengths are.

    Attributes:
        buf: the bytes so far.
        string_lengths: offsets of string/binary length fields.
        container_sizes: offsets of list/set/map size fields.
        seqid_at: offset of the envelope's seqid.
    """

    buf: bytearray = field(default_factory=bytearray)
    string_lengths: list[int] = field(default_factory=list)
    container_sizes: list[int] = field(default_factory=list)
    seqid_at: int = -1

    def envelope(self, name: str, mtype: int, seqid: int, strict: bool = True) -> Writer:
        raw = name.encode()
        if strict:
            self.buf += I32.pack((VERSION_1 | mtype) - (1 << 32)) + I32.pack(len(raw)) + raw
        else:
            self.buf += I32.pack(len(raw)) + raw + bytes([mtype])
        self.seqid_at = len(self.buf)
        self.buf += I32.pack(seqid)
        return self

    def field(self, ftype: int, fid: int) -> Writer:
        self.buf += bytes([ftype]) + struct.pack(">h", fid)
        return self

    def stop(self) -> Writer:
        self.buf.append(T_STOP)
        return self

    def i32(self, value: int) -> Writer:
        self.buf += I32.pack(value)
        return self

    def i64(self, value: int) -> Writer:
        self.buf += I64.pack(value)
        return self

    def string(self, data: bytes) -> Writer:
        self.string_lengths.append(len(self.buf))
        self.buf += I32.pack(len(data)) + data
        return self

    def list_header(self, etype: int, size: int) -> Writer:
        self.container_sizes.append(len(self.buf) + 1)
        self.buf += bytes([etype]) + I32.pack(size)
        return self


def encode_call(
    method: str,
    args: dict[str, Any],
    seqid: int,
    *,
    mtype: int = CALL,
    strict: bool = True,
) -> Writer:
    """A call of the interop IDL with its offsets (see `Writer`).

    Methods: ping, add(a, b), getItem(id), listItems(limit), echoBinary(data),
    notify(tag), placeOrder(customer, lines=[(itemId, quantity)], note).
    """
    w = Writer().envelope(method, mtype, seqid, strict)
    if method == "add":
        w.field(T_I64, 1).i64(int(args["a"])).field(T_I64, 2).i64(int(args["b"]))
    elif method == "getItem":
        w.field(T_I64, 1).i64(int(args["id"]))
    elif method == "listItems":
        w.field(T_I32, 1).i32(int(args["limit"]))
    elif method in ("echoBinary", "notify"):
        data = args["data"] if method == "echoBinary" else args["tag"]
        w.field(T_STRING, 1).string(data)
    elif method == "placeOrder":
        customer, lines = args["customer"], args["lines"]
        w.field(T_STRUCT, 1).field(T_STRING, 1).string(customer)
        w.field(T_LIST, 2).list_header(T_STRUCT, len(lines))
        for item_id, quantity in lines:
            w.field(T_I64, 1).i64(item_id).field(T_I32, 2).i32(quantity).stop()
        note = args.get("note")
        if note is not None:
            w.field(T_STRING, 3).string(note)
        w.stop()
    elif method != "ping":
        raise ValueError(f"no encoder for {method!r}")
    w.stop()
    return w


def nested_lists(levels: int, innermost: int) -> bytes:
    """Field 99 of an args struct: ``levels`` lists inside each other, then STOP.

    The innermost list holds one ``innermost`` element (T_I32: a fixed-size
    element; T_STRUCT: an empty struct). With the args struct counted, the
    message nests ``levels + 1`` deep (``+ 2`` with a struct element).
    """
    out = bytearray(b"\x0f\x00\x63")
    for _ in range(levels - 1):
        out += bytes([T_LIST]) + I32.pack(1)
    if innermost == T_I32:
        out += bytes([T_I32]) + I32.pack(1) + I32.pack(7)
    else:
        out += bytes([T_STRUCT]) + I32.pack(1) + b"\x00"
    return bytes(out + b"\x00")


def framed(message: bytes | bytearray) -> bytes:
    """One message with its frame length."""
    return I32.pack(len(message)) + bytes(message)


def on_wire(message: bytes | bytearray, transport: Transport) -> bytes:
    return framed(message) if transport is Transport.FRAMED else bytes(message)


@dataclass(frozen=True)
class Envelope:
    """The envelope of a message read back: name, type and seqid."""

    name: str
    mtype: int
    seqid: int


def read_envelope(message: bytes) -> Envelope | None:
    """The envelope at the start of ``message`` (strict or not); None if it is not one."""
    try:
        word = I32.unpack_from(message, 0)[0]
        if word < 0:
            if (word & 0xFFFF0000) != VERSION_1:
                return None
            size = I32.unpack_from(message, 4)[0]
            name = message[8 : 8 + size]
            seqid = I32.unpack_from(message, 8 + size)[0]
            return Envelope(name.decode("utf-8", "replace"), word & 0xFF, seqid)
        name = message[4 : 4 + word]
        mtype = message[4 + word]
        seqid = I32.unpack_from(message, 5 + word)[0]
        return Envelope(name.decode("utf-8", "replace"), mtype, seqid)
    except (struct.error, IndexError):
        return None


class _Stream:
    """A read-only transport over bytes for thriftpy2's pure-Python protocol."""

    def __init__(self, data: bytes) -> None:
        self.io = BytesIO(data)

    def read(self, n: int) -> bytes:
        chunk = self.io.read(n)
        if len(chunk) != n:
            raise EOFError
        return chunk


# TApplicationException types with which the sidecar refuses a message itself.
INVALID_MESSAGE_TYPE, PROTOCOL_ERROR = 2, 7


def exception_type(message: bytes) -> int | None:
    """The TApplicationException type an EXCEPTION message carries (None if unreadable)."""
    stream = _Stream(message)
    proto = _PurePythonBinary(stream, strict_read=False, decode_response=False)
    try:
        proto.read_message_begin()
        exc = TApplicationException()
        proto.read_struct(exc)
    except Exception:
        return None
    return None if exc.type is None else int(exc.type)


def split_messages(data: bytes, transport: Transport) -> list[bytes]:
    """The whole messages at the start of ``data``; an unfinished or broken tail is dropped.

    Framed: by the length prefixes. Buffered: each message is walked by
    thriftpy2's own binary protocol (not by the sidecar's decoder).
    """
    out: list[bytes] = []
    pos = 0
    for _ in range(len(data)):  # bounded: each round consumes at least one byte
        if pos >= len(data):
            break
        if transport is Transport.FRAMED:
            if pos + 4 > len(data):
                break
            size = I32.unpack_from(data, pos)[0]
            if size <= 0 or size > MAX_REPLY_BYTES or pos + 4 + size > len(data):
                break
            out.append(data[pos + 4 : pos + 4 + size])
            pos += 4 + size
            continue
        stream = _Stream(data[pos:])
        proto = _PurePythonBinary(stream, strict_read=False, decode_response=False)
        try:
            proto.read_message_begin()
            proto.skip(TType.STRUCT)
            proto.read_message_end()
        except Exception:
            break
        end = pos + stream.io.tell()
        out.append(data[pos:end])
        pos = end
    return out
