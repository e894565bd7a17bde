"""Binary <-> compact transcoding against Apache Thrift's own writers of both protocols.

For random nested values the transcoder must turn Apache's binary bytes into
exactly Apache's compact bytes and back. Apache's binary writer is told to
write an empty map's types as 0 when the bytes come from compact, which does
not carry them (transcode.py says why that is harmless).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.transport.TTransport import TMemoryBuffer

from sidecar.errors import ProtocolError, RemoteProtocolError
from sidecar.protocol.compact import encode_varint
from sidecar.protocol.compact_skip import CType
from sidecar.protocol.decoders import BufferedDecoder, FramedDecoder
from sidecar.protocol.envelope import MessageType, Protocol, encode_header
from sidecar.protocol.message import encode_frame
from sidecar.protocol.transcode import transcode_message
from tests.protocol.apache_codec import encode_apache, encode_message, value_depth
from tests.protocol.thrift_strategies import Schema, chunks, split_points, structs

B, C = Protocol.BINARY, Protocol.COMPACT
envelopes = st.tuples(
    st.text(max_size=10), st.sampled_from(list(MessageType)), st.integers(-(2**31), 2**31 - 1)
)


def nonstrict_envelope(name: str, mtype: int, seqid: int) -> bytes:
    out = TMemoryBuffer()
    TBinaryProtocol(out, strictWrite=False).writeMessageBegin(name, mtype, seqid)
    return out.getvalue()


@settings(max_examples=500, deadline=None)
@given(structs(), envelopes)
def test_both_ways_match_apache(sv: tuple[Schema, Any], envelope: tuple[str, int, int]) -> None:
    schema, value = sv
    name, mtype, seqid = envelope
    compact = encode_message(name, mtype, seqid, encode_apache(schema, value, "compact"), "compact")
    binary = encode_message(name, mtype, seqid, encode_apache(schema, value, "binary"), "binary")
    erased = encode_apache(schema, value, "binary", erase_empty_map_types=True)
    assert transcode_message(binary, B, C) == compact
    assert transcode_message(compact, C, B) == encode_message(name, mtype, seqid, erased, "binary")
    assert transcode_message(compact, C, B, strict=False) == nonstrict_envelope(*envelope) + erased
    # A round trip through compact gives the binary bytes back (empty maps aside).
    assert transcode_message(transcode_message(binary, B, C), C, B) == transcode_message(
        compact, C, B
    )
    assert transcode_message(compact, C, C) == compact


@settings(max_examples=100, deadline=None)
@given(structs(), st.data())
def test_messages_from_the_decoders(sv: tuple[Schema, Any], data: st.DataObject) -> None:
    body = encode_apache(*sv, "binary")
    wire = encode_header("get", MessageType.REPLY, 5) + body
    stream = encode_frame(wire)
    decoder = FramedDecoder(1 << 20)
    got = []
    for piece in chunks(stream, data.draw(split_points(len(stream)))):
        got += decoder.receive_data(piece)
    [message] = got
    compact = transcode_message(message.payload(), message.protocol, C)
    [back] = BufferedDecoder(1 << 20, protocol=C).receive_data(compact)
    assert (back.header.name, back.header.seqid, back.header.type) == ("get", 5, MessageType.REPLY)
    assert bytes(back.body()) == encode_apache(*sv, "compact")


@settings(max_examples=200, deadline=None)
@given(structs(), st.data())
def test_every_proper_prefix_is_refused(sv: tuple[Schema, Any], data: st.DataObject) -> None:
    for protocol in (B, C):
        wire = encode_message("m", 1, 1, encode_apache(*sv, protocol.value), protocol.value)
        n = data.draw(st.integers(0, len(wire) - 1), label="n")
        with pytest.raises(RemoteProtocolError) as info:
            transcode_message(wire[:n], protocol, C if protocol is B else B)
        assert info.value.kind == "truncated"


@settings(max_examples=200, deadline=None)
@given(structs())
def test_depth_limit_is_the_value_depth(sv: tuple[Schema, Any]) -> None:
    d = value_depth(*sv)
    for protocol in (B, C):
        wire = encode_message("m", 1, 1, encode_apache(*sv, protocol.value), protocol.value)
        other = C if protocol is B else B
        transcode_message(wire, protocol, other, max_depth=d)
        if d > 1:
            with pytest.raises(RemoteProtocolError) as info:
                transcode_message(wire, protocol, other, max_depth=d - 1)
            assert info.value.kind == "too_deep"


@pytest.mark.parametrize(
    ("protocol", "body"),
    [
        (B, b"\x0c\x00\x01" * 1_000_000),
        (B, b"\x0f\x00\x01" + b"\x0f\x00\x00\x00\x01" * 1_000_000),
        (C, bytes(((1 << 4) | CType.STRUCT,)) * 1_000_000),
        (C, bytes(((1 << 4) | CType.MAP,)) + b"\x01\xbb" * 1_000_000),
    ],
    ids=["binary structs", "binary lists", "compact structs", "compact maps"],
)
def test_million_deep_is_too_deep_fast(protocol: Protocol, body: bytes) -> None:
    wire = encode_message("m", 1, 1, body, protocol.value)
    started = time.perf_counter()
    with pytest.raises(RemoteProtocolError) as info:
        transcode_message(wire, protocol, C if protocol is B else B)
    assert (info.value.kind, info.value.seqid, info.value.name) == ("too_deep", 1, "m")
    assert time.perf_counter() - started < 2.0


def test_output_limit() -> None:
    # 200 compact i64 zeros: 1 byte each in compact, 8 in binary.
    body = (
        bytes(((1 << 4) | CType.LIST, 0xF0 | CType.I64)) + encode_varint(200) + b"\0" * 200 + b"\0"
    )
    wire = encode_message("m", 2, 1, body, "compact")
    assert len(transcode_message(wire, C, B, max_size=2000)) > 1600
    with pytest.raises(RemoteProtocolError) as info:
        transcode_message(wire, C, B, max_size=1000)
    assert info.value.kind == "oversized"


def test_double_bits_survive() -> None:
    signalling_nan = b"\x7f\xf0\x00\x00\x00\x00\x00\x01"
    wire = encode_header("m", MessageType.CALL, 1) + b"\x04\x00\x01" + signalling_nan + b"\x00"
    compact = transcode_message(wire, B, C)
    assert signalling_nan[::-1] in compact
    assert transcode_message(compact, C, B) == wire


_MEANINGFUL = st.sampled_from(
    [0, 1, 2, 3, 4, 5, 8, 9, 11, 12, 13, 15, 0x19, 0x1C, 0x80, 0xF9, 0xFF]
)
noise = st.binary(max_size=150) | st.lists(st.integers(0, 255) | _MEANINGFUL, max_size=150).map(
    bytes
)


@settings(max_examples=800, deadline=None)
@given(noise, st.sampled_from([B, C]))
def test_garbage_raises_only_protocol_errors(data: bytes, protocol: Protocol) -> None:
    prefix = encode_message("m", 1, 1, b"", protocol.value)
    for wire in (data, prefix + data):
        for target, strict in ((B, True), (B, False), (C, True)):
            error: ProtocolError | None = None
            try:
                transcode_message(wire, protocol, target, strict=strict, max_size=5000)
            except ProtocolError as exc:
                error = exc
            kinds = {"garbage", "oversized", "truncated", "too_deep", "bad_version", "bad_type"}
            assert error is None or error.kind in kinds
