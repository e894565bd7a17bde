"""The compact protocol: envelope, struct skipping, decoders, seqid patching, exceptions.

Bytes come from Apache Thrift's own TCompactProtocol writer (apache_codec),
fed whole, one byte at a time and in random pieces.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TApplicationException
from thrift.transport.TTransport import TMemoryBuffer

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.appexc import encode_application_exception, parse_application_exception
from sidecar.protocol.compact import (
    encode_compact_header,
    encode_seqid,
    encode_varint,
    parse_compact_header,
    read_varint,
    unzigzag,
    zigzag,
)
from sidecar.protocol.compact_skip import CompactSkipper, CType, compact_struct_end
from sidecar.protocol.decoders import BufferedDecoder, FramedDecoder
from sidecar.protocol.envelope import MessageType, Protocol, name_bytes
from sidecar.protocol.fields import first_field_id
from sidecar.protocol.message import Message, Transport, encode_frame
from tests.protocol.apache_codec import encode_apache, encode_message
from tests.protocol.thrift_strategies import Schema, chunks, one_by_one, split_points, structs

NO_LIMIT = 1 << 40
SEQIDS = st.integers(-(2**31), 2**31 - 1)
NAMES = st.text(max_size=12)
TYPES = st.sampled_from(list(MessageType))


def kind_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        call(*args, **kwargs)
    return info.value.kind


# ----------------------------------------------------------------------------- integers


@given(st.integers(0, 2**64 - 1))
def test_varint_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert read_varint(raw + b"\xff", 0, len(raw) + 1) == (value, len(raw))
    assert read_varint(raw, 0, len(raw) - 1) is None


@given(st.integers(-(2**63), 2**63 - 1))
def test_zigzag_round_trip(value: int) -> None:
    assert unzigzag(zigzag(value, 64)) == value


def test_varint_longer_than_allowed_is_garbage() -> None:
    assert kind_of(read_varint, b"\x80" * 5 + b"\x01", 0, 6, 5) == "garbage"
    assert read_varint(b"\x80" * 4, 0, 4, 5) is None


# ----------------------------------------------------------------------------- envelope


@settings(max_examples=300, deadline=None)
@given(NAMES, TYPES, SEQIDS)
def test_envelope_matches_apache(name: str, mtype: MessageType, seqid: int) -> None:
    apache = encode_message(name, int(mtype), seqid, b"\x00", "compact")
    assert encode_compact_header(name, mtype, seqid) + b"\x00" == apache
    header = parse_compact_header(apache)
    assert header is not None
    assert (header.name, header.type, header.seqid) == (name, mtype, seqid)
    assert header.protocol is Protocol.COMPACT
    assert header.body_offset == len(apache) - 1
    assert header.seqid_size == len(encode_seqid(seqid))
    for n in range(len(apache) - 1):
        assert parse_compact_header(apache[:n]) is None, n


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (b"\x83\x21\x01\x00", "bad_version"),
        (b"\x82\x22\x01\x00", "bad_version"),
        (b"\x82\xa1\x01\x00", "bad_type"),
        (b"\x82\x21" + b"\xff" * 6, "garbage"),
        (b"\x82\x21\x01" + encode_varint(5000), "garbage"),
    ],
)
def test_bad_envelopes(wire: bytes, kind: str) -> None:
    assert kind_of(parse_compact_header, wire) == kind


RAW_NAMES = [b"\xff\xfe", b"caf\xc3", b"\xed\xa0\x80", b"Svc:get\xff", b"caf\xc3\xa9"]


@pytest.mark.parametrize("raw", RAW_NAMES)
def test_any_name_bytes_are_read_and_written_back_exactly(raw: bytes) -> None:
    """As in the binary protocol (tests/protocol/test_envelope.py): any bytes, the same back."""
    envelope = b"\x82\x21\x07" + encode_varint(len(raw)) + raw
    header = parse_compact_header(envelope + b"\x00")
    assert header is not None
    assert (header.type, header.seqid, header.body_offset) == (MessageType.CALL, 7, len(envelope))
    assert name_bytes(header.name) == raw
    assert encode_compact_header(header.name, MessageType.CALL, 7) == envelope
    for n in range(len(envelope)):
        assert parse_compact_header(envelope[:n]) is None
    if raw == b"caf\xc3\xa9":
        assert header.name == "café"


@pytest.mark.parametrize("raw", RAW_NAMES)
@pytest.mark.parametrize("transport", [Transport.FRAMED, Transport.BUFFERED])
def test_decoders_deliver_any_name_and_answers_echo_it(raw: bytes, transport: Transport) -> None:
    call = b"\x82\x21\x07" + encode_varint(len(raw)) + raw + b"\x15\x54\x00"  # {1: i32 42}
    wire = encode_frame(call) if transport is Transport.FRAMED else call
    decoder = (
        FramedDecoder(NO_LIMIT, Protocol.COMPACT)
        if transport is Transport.FRAMED
        else (BufferedDecoder(NO_LIMIT, protocol=Protocol.COMPACT))
    )
    messages = [m for byte in one_by_one(wire * 2) for m in decoder.receive_data(byte)]
    assert [bytes(m.payload()) for m in messages] == [call, call]
    message = messages[0]
    message.set_seqid(300)  # a longer varint: the name after it moves
    assert name_bytes(message.header.name) == raw
    assert bytes(message.payload()) == b"\x82\x21\xac\x02" + call[3:]
    answer = encode_application_exception(
        message.header.name, 300, 1, "unknown", protocol=Protocol.COMPACT
    )
    assert answer.startswith(b"\x82\x61\xac\x02" + encode_varint(len(raw)) + raw)


# ----------------------------------------------------------------------------- skipping


def feed(data: bytes, cuts: list[int], limit: int = NO_LIMIT) -> tuple[bool, int]:
    skipper = CompactSkipper()
    buf = bytearray()
    pos = 0
    for chunk in chunks(data, cuts):
        buf += chunk
        pos = skipper.advance(buf, pos, len(buf), limit)
        assert pos <= len(buf)
        if skipper.done:
            break
    return skipper.done, pos


@settings(max_examples=400, deadline=None)
@given(structs(), st.binary(max_size=10), st.data())
def test_struct_end_agrees_with_apache(
    sv: tuple[Schema, Any], trailing: bytes, data: st.DataObject
) -> None:
    encoded = encode_apache(*sv, "compact")
    assert compact_struct_end(encoded + trailing) == len(encoded)
    assert compact_struct_end(b"ab" + encoded, 2) == 2 + len(encoded)
    whole = encoded + trailing
    cuts = data.draw(split_points(len(whole)), label="cuts")
    assert feed(whole, cuts) == (True, len(encoded))
    assert feed(whole, cuts, limit=len(encoded)) == (True, len(encoded))
    with pytest.raises(RemoteProtocolError) as info:
        feed(whole, cuts, limit=len(encoded) - 1)
    assert info.value.kind == "oversized"
    assert feed(whole, list(range(1, len(whole)))) == (True, len(encoded))


@settings(max_examples=200, deadline=None)
@given(structs(), st.data())
def test_truncated_struct_never_ends(sv: tuple[Schema, Any], data: st.DataObject) -> None:
    encoded = encode_apache(*sv, "compact")
    n = data.draw(st.integers(0, len(encoded) - 1), label="n")
    assert kind_of(compact_struct_end, encoded[:n]) == "truncated"
    assert feed(encoded[:n], data.draw(split_points(n), label="cuts"))[0] is False


@pytest.mark.parametrize(
    "data",
    [
        bytes(((1 << 4) | CType.BINARY,)) + encode_varint(2**32 - 1),
        bytes(((1 << 4) | CType.LIST, 0xF0 | CType.I32)) + encode_varint(2**32 - 1),
        bytes(((1 << 4) | CType.MAP,)) + encode_varint(2**32 - 1) + b"\x55",
    ],
    ids=["string", "list", "map"],
)
def test_sizes_over_i32_are_garbage(data: bytes) -> None:
    assert kind_of(compact_struct_end, data) == "garbage"


@pytest.mark.parametrize(
    "data",
    [
        bytes(((1 << 4) | CType.BINARY,)) + encode_varint(10**6),
        bytes(((1 << 4) | CType.LIST, 0xF0 | CType.STRUCT)) + encode_varint(10**6),
        bytes(((1 << 4) | CType.MAP,)) + encode_varint(10**6) + bytes(((5 << 4) | 12,)),
    ],
    ids=["string", "list", "map"],
)
def test_huge_declared_size_is_oversized_before_the_bytes_arrive(data: bytes) -> None:
    skipper = CompactSkipper()
    with pytest.raises(RemoteProtocolError) as info:
        skipper.advance(data, 0, len(data), 1000)
    assert info.value.kind == "oversized"


@pytest.mark.parametrize("ftype", [14, 15])
def test_unknown_types_are_garbage(ftype: int) -> None:
    assert kind_of(compact_struct_end, bytes(((1 << 4) | ftype, 0))) == "garbage"
    elem = bytes(((1 << 4) | CType.LIST, (1 << 4) | ftype, 0, 0))
    assert kind_of(compact_struct_end, elem) == "garbage"


@pytest.mark.parametrize(
    "hostile",
    [
        bytes(((1 << 4) | CType.STRUCT,)) * 1_000_000,
        bytes(((1 << 4) | CType.LIST,)) + bytes(((1 << 4) | CType.LIST,)) * 1_000_000,
        bytes(((1 << 4) | CType.MAP,)) + b"\x01\xbb" * 1_000_000,
    ],
    ids=["structs", "lists", "maps"],
)
def test_million_deep_input_is_refused_fast(hostile: bytes) -> None:
    started = time.perf_counter()
    assert kind_of(compact_struct_end, hostile) == "too_deep"
    with pytest.raises(RemoteProtocolError) as info:
        feed(hostile[:1000], list(range(1, 1000)))
    assert info.value.kind == "too_deep"
    assert time.perf_counter() - started < 1.0


# ----------------------------------------------------------------------------- decoders


def messages_of(bodies: list[bytes], seqids: list[int]) -> list[bytes]:
    return [
        encode_message(f"m{i}", 1, seqid, body, "compact")
        for i, (body, seqid) in enumerate(zip(bodies, seqids, strict=True))
    ]


@settings(max_examples=150, deadline=None)
@given(st.lists(structs(), min_size=1, max_size=3), st.lists(SEQIDS, min_size=3), st.data())
def test_decoders_split_compact_streams(
    svs: list[tuple[Schema, Any]], seqids: list[int], data: st.DataObject
) -> None:
    bodies = [encode_apache(*sv, "compact") for sv in svs]
    wires = messages_of(bodies, seqids[: len(bodies)])
    for transport in (Transport.BUFFERED, Transport.FRAMED):
        stream = b"".join(w if transport is Transport.BUFFERED else encode_frame(w) for w in wires)
        cuts = data.draw(split_points(len(stream)), label="cuts")
        for pieces in ([stream], chunks(stream, cuts), one_by_one(stream)):
            decoder: BufferedDecoder | FramedDecoder = (
                BufferedDecoder(1 << 20, protocol=Protocol.COMPACT)
                if transport is Transport.BUFFERED
                else FramedDecoder(1 << 20, Protocol.COMPACT)
            )
            got: list[Message] = []
            for piece in pieces:
                got += decoder.receive_data(piece)
            assert decoder.receive_data(b"") == []
            assert [bytes(m.payload()) for m in got] == wires
            assert [m.header.seqid for m in got] == seqids[: len(bodies)]
            assert [bytes(m.body()) for m in got] == bodies
            assert all(m.protocol is Protocol.COMPACT for m in got)


def test_buffered_compact_message_over_the_limit_is_oversized() -> None:
    wire = encode_message("m", 1, 1, b"\x18" + encode_varint(100) + b"x" * 100 + b"\x00", "compact")
    with pytest.raises(RemoteProtocolError) as info:
        BufferedDecoder(50, protocol=Protocol.COMPACT).receive_data(wire)
    assert (info.value.kind, info.value.seqid, info.value.name) == ("oversized", 1, "m")


# ----------------------------------------------------------------------------- seqid patching


@settings(max_examples=300, deadline=None)
@given(SEQIDS, SEQIDS, st.sampled_from([Transport.BUFFERED, Transport.FRAMED]))
def test_set_seqid_keeps_the_message_whole(old: int, new: int, transport: Transport) -> None:
    body = encode_apache(("struct", ((1, "string"), (2, "i64"))), ("payload", -(2**40)), "compact")
    wire = encode_message("getItem", 1, old, body, "compact")
    framed = transport is Transport.FRAMED
    decoder = (
        FramedDecoder(1 << 20, Protocol.COMPACT)
        if framed
        else BufferedDecoder(1 << 20, protocol=Protocol.COMPACT)
    )
    [message] = decoder.receive_data(encode_frame(wire) if framed else wire)
    message.set_seqid(new)
    assert message.header.seqid == old  # the one that arrived
    assert bytes(message.body()) == body
    out = bytes(message.to_wire(transport))
    again = (
        FramedDecoder(1 << 20, Protocol.COMPACT)
        if framed
        else BufferedDecoder(1 << 20, protocol=Protocol.COMPACT)
    )
    [copy] = again.receive_data(out)
    assert copy.header.seqid == new
    assert bytes(copy.body()) == body
    proto = TCompactProtocol(TMemoryBuffer(bytes(message.payload())))
    assert proto.readMessageBegin() == ("getItem", 1, new)
    message.set_seqid(old)
    assert bytes(message.payload()) == wire


# ------------------------------------------------------------------------ exceptions and results


@settings(max_examples=100, deadline=None)
@given(NAMES, SEQIDS, st.integers(-(2**31), 2**31 - 1), st.text(max_size=20))
def test_application_exception_is_read_by_apache(
    name: str, seqid: int, exc_type: int, text: str
) -> None:
    wire = encode_application_exception(name, seqid, exc_type, text, protocol=Protocol.COMPACT)
    proto = TCompactProtocol(TMemoryBuffer(wire))
    assert proto.readMessageBegin() == (name, MessageType.EXCEPTION, seqid)
    exc = TApplicationException()
    exc.read(proto)
    assert (exc.type, exc.message) == (exc_type, text)
    header = parse_compact_header(wire)
    assert header is not None
    assert parse_application_exception(wire[header.body_offset :], Protocol.COMPACT) == (
        exc_type,
        text,
    )


@given(st.integers(-(2**31), 2**31 - 1), st.text(max_size=20))
def test_application_exception_written_by_apache_is_parsed(exc_type: int, text: str) -> None:
    out = TMemoryBuffer()
    proto = TCompactProtocol(out)
    exc = TApplicationException(exc_type, text)
    exc.write(proto)
    assert parse_application_exception(out.getvalue(), Protocol.COMPACT) == (exc_type, text)


def test_application_exception_skips_unknown_fields() -> None:
    body = bytes(((3 << 4) | CType.BOOL_TRUE, (1 << 4) | CType.LIST, (1 << 4) | CType.I64, 4))
    # then field 2 (long form: type, zigzag id) i32 7, then STOP
    body += (
        bytes((CType.I32,)) + encode_varint(zigzag(2, 16)) + encode_varint(zigzag(7, 32)) + b"\x00"
    )
    assert parse_application_exception(body, Protocol.COMPACT) == (7, "")


RESULTS = {
    "void": (("struct", ()), (), None),
    "success": (("struct", ((0, "i32"),)), (5,), 0),
    "success bool": (("struct", ((0, "bool"),)), (False,), 0),
    "declared exception": (("struct", ((0, "i32"), (1, ("struct", ())))), (None, ()), 1),
    "exception id 300": (("struct", ((0, "i32"), (300, "string"))), (None, "x"), 300),
    "negative id": (("struct", ((-2, "byte"),)), (1,), -2),
}


@pytest.mark.parametrize("name", sorted(RESULTS))
@pytest.mark.parametrize("protocol", list(Protocol))
def test_first_field_id_of_results(name: str, protocol: Protocol) -> None:
    schema, value, expected = RESULTS[name]
    body = encode_apache(schema, value, protocol.value)
    assert first_field_id(body, protocol) == expected


@pytest.mark.parametrize("protocol", list(Protocol))
@pytest.mark.parametrize("body", [b"", b"\x0f", b"\x1e", b"\x05"])
def test_first_field_id_of_garbage_raises(protocol: Protocol, body: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        first_field_id(body, protocol)
