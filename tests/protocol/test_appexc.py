"""TApplicationException bytes, read back by thriftpy2 and by Apache Thrift's Python library."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thrift.protocol.TBinaryProtocol import TBinaryProtocol as ApacheBinaryProtocol
from thrift.Thrift import TApplicationException as ApacheApplicationException
from thrift.Thrift import TMessageType as ApacheMessageType
from thrift.transport.TTransport import TMemoryBuffer as ApacheMemoryBuffer
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport.memory import TMemoryBuffer

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.appexc import (
    ApplicationExceptionType,
    encode_application_exception,
    encode_exception_struct,
    parse_application_exception,
)
from sidecar.protocol.envelope import MessageType, parse_header
from tests.protocol.thrift_strategies import Schema, contains, encode_by_hand, kind, schemas, values

MESSAGES = [
    "",
    "circuit open for upstream a:1, no fallback for Svc.getItem",
    "ünïcødé ✓",
    "x" * 5000,
]


def read_thriftpy2(data: bytes) -> tuple[str, int, int, int, str | None]:
    """(name, message type, seqid, exception type, text) as thriftpy2's client reads them."""
    proto = TBinaryProtocol(TMemoryBuffer(data), strict_read=False)
    name, mtype, seqid = proto.read_message_begin()
    exc = TApplicationException()
    proto.read_struct(exc)
    return name, mtype, seqid, exc.type, exc.message


def read_apache(data: bytes) -> tuple[str, int, int, int, str | None]:
    """The same, as Apache Thrift's Python library reads them."""
    proto = ApacheBinaryProtocol(ApacheMemoryBuffer(data))
    name, mtype, seqid = proto.readMessageBegin()
    exc = ApacheApplicationException()
    exc.read(proto)
    proto.readMessageEnd()
    return name, mtype, seqid, exc.type, exc.message


def struct_thriftpy2(exc_type: int, message: str | None) -> bytes:
    out = io.BytesIO()
    TBinaryProtocol(out).write_struct(TApplicationException(exc_type, message))
    return out.getvalue()


def struct_apache(exc_type: int | None, message: str | None) -> bytes:
    buf = ApacheMemoryBuffer()
    exc = ApacheApplicationException(exc_type, message)
    exc.write(ApacheBinaryProtocol(buf))
    return buf.getvalue()


# ----------------------------------------------------------------------------- edge cases


def test_type_codes_match_both_libraries() -> None:
    for code in ApplicationExceptionType:
        assert getattr(ApacheApplicationException, code.name) == code
        if hasattr(TApplicationException, code.name):
            assert getattr(TApplicationException, code.name) == code
    assert MessageType.EXCEPTION == TMessageType.EXCEPTION == ApacheMessageType.EXCEPTION


@pytest.mark.parametrize("exc_type", list(ApplicationExceptionType))
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("strict", [True, False])
def test_both_libraries_read_what_we_encode(
    exc_type: ApplicationExceptionType, message: str, strict: bool
) -> None:
    data = encode_application_exception("Svc:getItem", -7, exc_type, message, strict)
    expected = ("Svc:getItem", int(MessageType.EXCEPTION), -7, int(exc_type), message)
    assert read_thriftpy2(data) == expected
    assert read_apache(data) == expected
    header = parse_header(data)
    assert header is not None
    assert (header.name, header.type, header.seqid, header.strict) == (
        "Svc:getItem",
        MessageType.EXCEPTION,
        -7,
        strict,
    )
    assert parse_application_exception(data[header.body_offset :]) == (exc_type, message)


@pytest.mark.parametrize("exc_type", list(ApplicationExceptionType))
@pytest.mark.parametrize("message", MESSAGES)
def test_struct_bytes_are_what_both_libraries_write(
    exc_type: ApplicationExceptionType, message: str
) -> None:
    ours = encode_exception_struct(exc_type, message)
    assert ours == struct_thriftpy2(exc_type, message) == struct_apache(exc_type, message)
    assert parse_application_exception(ours) == (exc_type, message)
    assert parse_application_exception(memoryview(bytearray(ours + b"\xff\xff"))) == (
        exc_type,
        message,
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"\x00", (0, "")),
        (struct_apache(6, None), (6, "")),
        (struct_apache(None, "only a message"), (0, "only a message")),
        (b"\x08\x00\x02\x00\x00\x00\x63\x00", (99, "")),  # an unknown type code is passed on
        (b"\x08\x00\x02\xff\xff\xff\xff\x00", (-1, "")),
        (b"\x0b\x00\x01\x00\x00\x00\x02\xc3\x28\x00", (0, "\ufffd(")),  # not UTF-8: replaced
        # Fields with the right ids but other types are skipped.
        (b"\x08\x00\x01\x00\x00\x00\x05\x0b\x00\x02\x00\x00\x00\x01x\x00", (0, "")),
        # The last of repeated fields wins, as in both libraries.
        (encode_exception_struct(1, "a")[:-1] + encode_exception_struct(2, "b"), (2, "b")),
    ],
)
def test_parse_edge_cases(body: bytes, expected: tuple[int, str]) -> None:
    assert parse_application_exception(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        encode_exception_struct(6, "boom")[:-1],
        b"\x0b\x00\x01\x00\x00\x00\x10abc",
        b"\x0b\x00\x01\xff\xff\xff\xff\x00",
        b"\x05\x00\x01\x00",
        b"\x0f\x00\x03\x0b\xff\xff\xff\xff\x00",
    ],
)
def test_malformed_structs_raise(body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_application_exception(body)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=100, deadline=None)
@given(
    st.integers(-(2**31), 2**31 - 1),
    st.text(max_size=40),
    st.text(max_size=20),
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
)
def test_round_trip(exc_type: int, message: str, name: str, seqid: int, strict: bool) -> None:
    data = encode_application_exception(name, seqid, exc_type, message, strict)
    expected = (name, int(MessageType.EXCEPTION), seqid, exc_type, message)
    assert read_apache(data) == expected
    assert read_thriftpy2(data) == expected
    header = parse_header(data)
    assert header is not None
    assert parse_application_exception(memoryview(data)[header.body_offset :]) == (
        exc_type,
        message,
    )


def _field(fid: int, exclude: tuple[str, ...], forbidden: tuple[str, ...] = ()) -> Any:
    return (
        schemas(exclude=exclude)
        .filter(lambda s: kind(s) not in forbidden)
        .flatmap(lambda s: st.tuples(st.just(fid), st.just(s), values(s)))
    )


def extra_fields(exclude: tuple[str, ...]) -> st.SearchStrategy[tuple[int, Schema, Any]]:
    """Fields no reader knows, and decoys: a known id with another type, which must be skipped."""
    return st.one_of(
        st.integers(-32768, 32767)
        .filter(lambda fid: fid not in (1, 2))
        .flatmap(lambda fid: _field(fid, exclude)),
        _field(1, exclude, ("string", "binary")),
        # thriftpy2 reads a STRING-typed field 2 as an i32; Apache Thrift and we skip it.
        _field(2, exclude, ("i32", "string", "binary")),
    )


# Apache's skip() decodes skipped strings as UTF-8; thriftpy2 cannot skip a UUID.
EXCLUDES = [(), ("binary",), ("binary", "uuid")]


@settings(max_examples=250, deadline=None)
@given(
    st.none() | st.integers(-(2**31), 2**31 - 1),
    st.none() | st.text(max_size=20),
    st.data(),
)
def test_unknown_fields_are_skipped(
    exc_type: int | None, message: str | None, data: st.DataObject
) -> None:
    exclude = data.draw(st.sampled_from(EXCLUDES), label="exclude")
    fields = data.draw(st.lists(extra_fields(exclude), max_size=5), label="extras")
    for fid, schema, value in ((2, "i32", exc_type), (1, "string", message)):
        if value is not None:
            at = data.draw(st.integers(0, len(fields)), label=f"field {fid} at")
            fields.insert(at, (fid, schema, value))
    schema = ("struct", tuple((fid, s) for fid, s, _ in fields))
    body = encode_by_hand(schema, tuple(v for _, _, v in fields))
    expected = (0 if exc_type is None else exc_type, message or "")
    trailing = data.draw(st.binary(max_size=4), label="trailing")
    assert parse_application_exception(body + trailing) == expected

    message_bytes = encode_application_exception("m", 1, 0, "")
    header = parse_header(message_bytes)
    assert header is not None
    whole = message_bytes[: header.body_offset] + body
    if not contains(schema, "binary"):
        assert read_apache(whole)[3:] == (0 if exc_type is None else exc_type, message)
    if not contains(schema, "binary") and not contains(schema, "uuid"):
        assert read_thriftpy2(whole)[3:] == (0 if exc_type is None else exc_type, message)


def test_a_message_with_a_name_that_is_not_utf8_is_written_as_text() -> None:
    """The envelope echoes the name's bytes; the message is text a client can decode."""
    name = str(b"get\xff", "utf-8", "surrogateescape")
    wire = encode_application_exception(name, 4, 6, f"circuit open, no fallback for {name}")
    header = parse_header(wire)
    assert header is not None
    assert wire[8:12] == b"get\xff"
    exc_type, message = parse_application_exception(memoryview(wire)[header.body_offset :])
    assert (exc_type, message) == (6, "circuit open, no fallback for get\\xff")
