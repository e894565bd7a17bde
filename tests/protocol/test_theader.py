"""THeader frames from Apache Thrift's THeaderTransport: decode, patch, add headers, encode back.

"buffered" THeader is the frame alone; "framed" is a THeader frame inside a
framed transport (a second length in front), as Apache's test clients send it.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thrift.Thrift import TMessageType

from sidecar.errors import ProtocolError, RemoteProtocolError
from sidecar.protocol.appexc import encode_application_exception
from sidecar.protocol.auto import decoder_for, make_decoder
from sidecar.protocol.compact import encode_compact_header
from sidecar.protocol.envelope import MessageType, Protocol, encode_header
from sidecar.protocol.message import Message, Transport, frame, frame_reply
from sidecar.protocol.theader import THeaderFrame, encode_theader, parse_theader
from sidecar.protocol.theader_decoder import THeaderDecoder
from tests.protocol.apache_wire import call_wire, read_exception, read_string_arg
from tests.protocol.thrift_strategies import chunks, one_by_one, split_points

HEADER_PROTOCOLS = {"header-binary": Protocol.BINARY, "header-compact": Protocol.COMPACT}
CASES = [(p, t) for p in HEADER_PROTOCOLS for t in ("buffered", "framed")]
HEADERS = {b"client-timeout": b"250", b"trace": b"\x00\xffbinary", b"": b"empty key"}


def decode_one(wire: bytes, max_size: int = 1 << 20) -> Message:
    decoder = THeaderDecoder(max_size)
    [message] = decoder.receive_data(wire)
    assert decoder.receive_data(b"") == []
    return message


@pytest.mark.parametrize("zlib_on", [False, True], ids=["plain", "zlib"])
@pytest.mark.parametrize(("protocol", "transport"), CASES)
def test_decodes_apache_frames(protocol: str, transport: str, zlib_on: bool) -> None:
    wire = call_wire(protocol, transport, name="Svc:get", seqid=-9, headers=HEADERS, zlib=zlib_on)
    message = decode_one(wire)
    assert (message.header.name, message.header.seqid) == ("Svc:get", -9)
    assert message.protocol is HEADER_PROTOCOLS[protocol]
    info = message.theader
    assert info is not None
    assert info.headers == HEADERS
    assert info.transforms == ((1,) if zlib_on else ())
    assert info.outer_framed == (transport == "framed")
    assert info.get_header("client-timeout") == "250"
    assert info.get_header("absent") is None


@pytest.mark.parametrize("zlib_on", [False, True], ids=["plain", "zlib"])
@pytest.mark.parametrize(("protocol", "transport"), CASES)
def test_encoded_back_apache_reads_the_same_call(
    protocol: str, transport: str, zlib_on: bool
) -> None:
    wire = call_wire(protocol, transport, seqid=3, arg="ünï", headers=HEADERS, zlib=zlib_on)
    message = decode_one(wire)
    out = bytes(message.to_wire(Transport.THEADER))
    assert read_string_arg(out, protocol, transport) == ("testString", 3, "ünï", HEADERS)
    if not zlib_on:  # Apache pads and orders as we do: the very same bytes
        assert out == wire


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(CASES),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
)
def test_set_seqid_and_headers(case: tuple[str, str], old: int, new: int, zlib_on: bool) -> None:
    protocol, transport = case
    wire = call_wire(protocol, transport, seqid=old, headers={b"a": b"1"}, zlib=zlib_on)
    message = decode_one(wire)
    message.set_seqid(new)
    message.theader.set_header("sidecar-attempt", "2")  # type: ignore[union-attr]
    message.theader.set_header("a", "replaced")  # type: ignore[union-attr]
    out = bytes(message.to_wire(Transport.THEADER))
    name, seqid, arg, headers = read_string_arg(out, protocol, transport)
    assert (name, seqid, arg) == ("testString", new, "hello")
    assert headers == {b"a": b"replaced", b"sidecar-attempt": b"2"}
    again = decode_one(out)
    assert again.theader is not None
    assert again.theader.seqid == new
    assert again.header.seqid == new


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(CASES), st.integers(-(2**31), 2**31 - 1), st.sampled_from(list(Transport)))
def test_wire_with_seqid_is_set_seqid_then_to_wire(
    case: tuple[str, str], new: int, transport: Transport
) -> None:
    wire = call_wire(*case, seqid=3, headers={b"a": b"1"})
    one, two = decode_one(wire), decode_one(wire)
    two.set_seqid(new)
    assert bytes(one.wire_with_seqid(new, transport)) == bytes(two.to_wire(transport))
    assert one.theader is not None
    assert one.theader.seqid == new


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(CASES), st.data())
def test_streams_in_any_split(case: tuple[str, str], data: st.DataObject) -> None:
    wires = [
        call_wire(*case, seqid=i, zlib=i == 1, headers={b"n": str(i).encode()}) for i in range(3)
    ]
    stream = b"".join(wires)
    cuts = data.draw(split_points(len(stream)), label="cuts")
    for pieces in (chunks(stream, cuts), one_by_one(stream)):
        decoder = decoder_for(Transport.THEADER)
        got: list[Message] = []
        for piece in pieces:
            got += decoder.receive_data(piece)
        assert [m.header.seqid for m in got] == [0, 1, 2]
        assert [m.theader.get_header("n") for m in got if m.theader] == ["0", "1", "2"]


@pytest.mark.parametrize(("protocol", "transport"), CASES)
def test_error_answers_reach_the_client(protocol: str, transport: str) -> None:
    request = decode_one(call_wire(protocol, transport, name="getItem", seqid=77, zlib=True))
    reply = encode_application_exception("getItem", 77, 7, "bad", protocol=request.protocol)
    wire = frame_reply(reply, request, Transport.THEADER)
    assert read_exception(wire, protocol, transport) == (
        "getItem",
        MessageType.EXCEPTION,
        77,
        7,
        "bad",
    )
    plain = frame(reply, Transport.THEADER, outer_framed=transport == "framed")
    assert read_exception(plain, protocol, transport)[2:] == (77, 7, "bad")


def test_a_plain_message_gets_a_plain_theader_frame() -> None:
    [message] = make_decoder(Transport.BUFFERED).receive_data(
        call_wire("binary", "buffered", seqid=12)
    )
    out = bytes(message.to_wire(Transport.THEADER))
    assert read_string_arg(out, "header-binary", "buffered")[:3] == ("testString", 12, "hello")


def test_unknown_info_sections_are_carried_through() -> None:
    info = THeaderFrame(seqid=5, headers={b"k": b"v"}, other_info=b"\x02\x01\x01x\x01y")
    payload = encode_application_exception("m", 5, 1, "x")
    wire = encode_theader(info, payload)
    parsed, body = parse_theader(wire[4:], 1 << 20)
    assert (parsed.headers, bytes(body)) == ({b"k": b"v"}, payload)
    # What follows the key-value sections is kept to the header's end, its padding too.
    kept = parsed.other_info
    assert kept.startswith(info.other_info)
    assert kept[len(info.other_info) :] == b"\x00" * (len(kept) - len(info.other_info))


@pytest.mark.parametrize("key_size", [1, 2, 3, 4])
def test_an_unknown_info_section_ending_in_zero_bytes_is_carried_whole(key_size: int) -> None:
    """fbthrift's persistent headers (info type 2) whose last value is empty end in a
    0x00: it was stripped as if it were padding, and where the header then needed
    none, the section came out cut short and the upstream could not read the frame."""
    section = b"\x02\x01\x01p\x00"  # one key "p" with an empty value
    original = THeaderFrame(seqid=5, headers={b"k" * key_size: b"v"}, other_info=section)
    payload = encode_application_exception("m", 5, 1, "x")
    parsed, _ = parse_theader(encode_theader(original, payload)[4:], 1 << 20)
    again = encode_theader(parsed, payload)
    words = struct.unpack_from(">H", again, 4 + 8)[0]
    header = again[4 + 10 : 4 + 10 + 4 * words]
    assert section in header
    assert parse_theader(again[4:], 1 << 20)[0].other_info.startswith(section)


# ----------------------------------------------------------------------------- refusals


def theader(head: bytes, payload: bytes, flags: int = 0, seqid: int = 1) -> bytes:
    head += b"\x00" * (-len(head) % 4)
    body = struct.pack(">HHiH", 0x0FFF, flags, seqid, len(head) // 4) + head + payload
    return struct.pack(">i", len(body)) + body


CALL = call_wire("binary", "buffered", seqid=1)
# What a THeader decoder may say: its own kinds and those of the payload's envelope.
KINDS = {"garbage", "oversized", "truncated", "unsupported", "bad_version", "bad_type"}


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (struct.pack(">i", 2000), "oversized"),
        (struct.pack(">i", 0), "garbage"),
        (struct.pack(">i", -5), "garbage"),
        (theader(b"\x00\x01\x02", CALL), "unsupported"),  # transform 2 (HMAC)
        (theader(b"\x01\x00", CALL), "unsupported"),  # protocol 1 (JSON)
        (theader(b"\x00\x01\x01", zlib.compress(b"\x00" * 5000)), "oversized"),
        (theader(b"\x00\x01\x01", b"not zlib"), "garbage"),
        (theader(b"\x00\x01\x01", zlib.compress(CALL)[:-3]), "garbage"),
        (theader(b"\x00\x00", b"\x80\x01\x00\x01\x00"), "garbage"),  # payload cut short
        (theader(b"\x00\x00\x01\x05\x01", CALL), "garbage"),  # info past the header
        (struct.pack(">iHHiH", 12, 0x0FFF, 0, 1, 40) + b"\x00\x00", "garbage"),
        (struct.pack(">i", 6) + b"\x0f\xfe\x00\x00\x00\x00", "garbage"),
    ],
)
def test_refusals(wire: bytes, kind: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        THeaderDecoder(1000).receive_data(wire)
    assert info.value.kind == kind


def test_input_ending_inside_a_frame_is_truncated() -> None:
    decoder = THeaderDecoder(1000)
    assert decoder.receive_data(theader(b"\x00\x00", CALL)[:-1]) == []
    with pytest.raises(RemoteProtocolError) as info:
        decoder.receive_data(b"")
    assert info.value.kind == "truncated"


def test_messages_before_an_error_are_delivered_first() -> None:
    decoder = THeaderDecoder(1000)
    good = theader(b"\x00\x00", CALL)
    messages = decoder.receive_data(good + struct.pack(">i", -1))
    assert len(messages) == 1
    assert decoder.error is not None
    assert decoder.error.kind == "garbage"
    with pytest.raises(RemoteProtocolError):
        decoder.receive_data(good)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120), st.sampled_from(CASES), st.data())
def test_garbage_raises_only_protocol_errors(
    noise: bytes, case: tuple[str, str], data: Any
) -> None:
    wire = bytearray(call_wire(*case, headers={b"k": b"v"}, zlib=data.draw(st.booleans())))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    for stream in (bytes(wire), noise, struct.pack(">i", len(noise)) + noise):
        decoder = THeaderDecoder(4096)
        error: ProtocolError | None = None
        try:
            for piece in [*chunks(stream, data.draw(split_points(len(stream)))), b""]:
                decoder.receive_data(piece)
        except ProtocolError as exc:
            error = exc
        assert error is None or error.kind in KINDS


def test_oneway_and_reply_types_pass() -> None:
    message = decode_one(call_wire("header-compact", "buffered", mtype=TMessageType.ONEWAY))
    assert message.header.type is MessageType.ONEWAY


@pytest.mark.parametrize("protocol", [Protocol.BINARY, Protocol.COMPACT])
@pytest.mark.parametrize("raw", [b"\xff\xfe", b"caf\xc3", b"caf\xc3\xa9"])
def test_a_name_that_is_not_utf8_comes_through_a_theader_frame_unchanged(
    raw: bytes, protocol: Protocol
) -> None:
    name = str(raw, "utf-8", "surrogateescape")
    if protocol is Protocol.COMPACT:
        payload = encode_compact_header(name, MessageType.CALL, 4) + b"\x00"
    else:
        payload = encode_header(name, MessageType.CALL, 4) + b"\x00"
    assert raw in payload
    info = THeaderFrame(protocol=protocol)
    info.seqid = 4
    wire = encode_theader(info, payload)
    message = decode_one(wire)
    assert message.header.name == name
    message.set_seqid(300)
    message.set_seqid(4)
    assert bytes(message.to_wire(Transport.THEADER)) == wire
    answer = encode_application_exception(name, 4, 1, "unknown", protocol=protocol)
    assert raw in bytes(frame_reply(answer, message, Transport.THEADER))
