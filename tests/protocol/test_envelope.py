"""Envelope parsing and encoding, checked against thriftpy2's own envelope writer."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.transport.memory import TMemoryBuffer

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.appexc import encode_application_exception
from sidecar.protocol.compact import encode_varint, parse_compact_header
from sidecar.protocol.envelope import (
    MAX_NAME_LENGTH,
    MessageHeader,
    MessageType,
    NameCache,
    encode_header,
    name_bytes,
    parse_header,
    shown_name,
    with_seqid,
    write_seqid,
)
from sidecar.protocol.framing import Transport, frame, make_decoder
from tests.protocol.thrift_strategies import encode_envelope_thriftpy2

ALL_TYPES = list(MessageType)
SEQIDS = [0, 1, -1, 2**31 - 1, -(2**31)]
NAMES = ["", "ping", "Calculator:add", "naïve_名前", "x" * MAX_NAME_LENGTH]
BODY = b"\x08\x00\x01\x00\x00\x00\x2a\x00"  # struct { 1: i32 = 42 }

names = st.text(max_size=30)
seqids = st.integers(-(2**31), 2**31 - 1)
mtypes = st.sampled_from(ALL_TYPES)


def _strict(mtype: int, name: bytes, seqid: int) -> bytes:
    return struct.pack(">Ii", 0x80010000 | mtype, len(name)) + name + struct.pack(">i", seqid)


def _nonstrict(mtype: int, name: bytes, seqid: int) -> bytes:
    return struct.pack(">i", len(name)) + name + struct.pack(">bi", mtype, seqid)


def _check(header: MessageHeader | None, name: str, mtype: int, seqid: int, strict: bool) -> None:
    assert header is not None
    raw = name.encode("utf-8")
    assert (header.name, header.type, header.seqid, header.strict) == (name, mtype, seqid, strict)
    assert header.seqid_offset == (8 if strict else 5) + len(raw)
    assert header.body_offset == header.seqid_offset + 4


def test_a_header_is_a_value_and_replaced_changes_only_the_seqid_size_and_body() -> None:
    header = parse_header(_strict(MessageType.CALL, b"echo", 7))
    assert header is not None
    again = parse_header(_strict(MessageType.CALL, b"echo", 7))
    assert header == again
    assert hash(header) == hash(again)
    assert header != parse_header(_strict(MessageType.CALL, b"echo", 8))
    assert "name='echo'" in repr(header)
    assert "seqid=7" in repr(header)
    grown = header.replaced(seqid_size=5, body_offset=header.body_offset + 1)
    assert (grown.seqid_size, grown.body_offset) == (5, header.body_offset + 1)
    kept = ("name", "type", "seqid", "strict", "seqid_offset", "protocol")
    assert [getattr(grown, f) for f in kept] == [getattr(header, f) for f in kept]
    assert (header.seqid_size, header.body_offset) == (4, 16)  # the original is unchanged


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("mtype", ALL_TYPES)
@pytest.mark.parametrize("name", NAMES)
def test_parses_what_thriftpy2_writes(name: str, mtype: MessageType, strict: bool) -> None:
    for seqid in SEQIDS:
        envelope = encode_envelope_thriftpy2(name, mtype, seqid, strict)
        proto = TBinaryProtocol(TMemoryBuffer(), strict_write=strict)
        proto.write_message_begin(name, mtype, seqid)
        assert proto.trans.getvalue() == envelope
        header = parse_header(envelope + BODY)
        _check(header, name, mtype, seqid, strict)
        assert header is not None
        assert envelope[header.seqid_offset : header.body_offset] == struct.pack(">i", seqid)
        assert (envelope + BODY)[header.body_offset :] == BODY


@pytest.mark.parametrize("strict", [True, False])
def test_offsets_are_relative_to_start(strict: bool) -> None:
    junk = b"\x00garbage before\xff"
    envelope = encode_header("Svc:getItem", MessageType.CALL, 77, strict)
    data = junk + envelope + BODY
    header = parse_header(data, len(junk))
    _check(header, "Svc:getItem", MessageType.CALL, 77, strict)
    assert header is not None
    at = len(junk) + header.seqid_offset
    assert data[at : at + 4] == struct.pack(">i", 77)
    assert data[len(junk) + header.body_offset :] == BODY


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_accepts_any_buffer(kind: type) -> None:
    data = kind(encode_header("ping", MessageType.ONEWAY, 5) + BODY)
    _check(parse_header(data), "ping", MessageType.ONEWAY, 5, True)


@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 129, 4000])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_names_short_and_long_read_alike(length: int, kind: type) -> None:
    """Short names are read with the seqid in one unpack, longer ones apart: the same header."""
    for raw in (b"m" * length, (b"\xff" + b"m" * length)[:length]):
        for strict in (True, False):
            envelope = (_strict if strict else _nonstrict)(int(MessageType.CALL), raw, -7)
            header = parse_header(kind(b"junk" + envelope + BODY), 4)
            assert header is not None
            assert name_bytes(header.name) == raw
            assert (header.seqid, header.strict) == (-7, strict)
            assert (header.seqid_offset, header.body_offset) == (len(envelope) - 4, len(envelope))


def _outcome(data: bytes | bytearray | memoryview, start: int) -> object:
    """What parse_header makes of ``data``: the header, or the error's kind and text."""
    try:
        return parse_header(data, start)
    except RemoteProtocolError as exc:
        return (exc.kind, str(exc), exc.seqid)


# Inputs near and far from an envelope: one cut or flipped in one byte, or any bytes.
envelopes = st.builds(
    lambda strict, mtype, raw, seqid: (_strict if strict else _nonstrict)(mtype, raw, seqid),
    st.booleans(),
    st.integers(0, 8),
    st.binary(max_size=140),
    seqids,
)


@st.composite
def near_envelopes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(envelopes) + draw(st.binary(max_size=8)))
    if data and draw(st.booleans()):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(near_envelopes(), st.binary(max_size=40)), junk=st.binary(max_size=5))
def test_bytes_bytearray_and_memoryview_read_alike(data: bytes, junk: bytes) -> None:
    """Bytes are read in place (librt) and the other buffers by struct: the same outcome."""
    whole = junk + data
    expected = _outcome(bytearray(whole), len(junk))
    assert _outcome(whole, len(junk)) == expected
    assert _outcome(memoryview(whole), len(junk)) == expected


@pytest.mark.parametrize(
    ("name", "service", "method"),
    [("ping", "", "ping"), ("Calc:add", "Calc", "add"), (":m", "", "m"), ("", "", "")],
)
def test_service_and_method(name: str, service: str, method: str) -> None:
    header = parse_header(encode_header(name, MessageType.CALL, 1))
    assert header is not None
    assert (header.service, header.method) == (service, method)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", ["", "ping", "Calculator:add", "é"])
def test_every_proper_prefix_is_incomplete(name: str, strict: bool) -> None:
    envelope = encode_header(name, MessageType.CALL, 9, strict)
    for n in range(len(envelope)):
        assert parse_header(envelope[:n]) is None, n
        assert parse_header(b"xx" + envelope[:n], 2) is None, n
    # The envelope alone is enough; the struct need not have arrived.
    _check(parse_header(envelope), name, MessageType.CALL, 9, strict)


@pytest.mark.parametrize(
    "first",
    [0x80020001, 0x80000001, 0x81010001, 0xFFFFFFFF, 0x80FF0001, 0x80000000],
)
def test_bad_version_raises_from_the_first_four_bytes(first: int) -> None:
    data = struct.pack(">I", first)
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(data)
    assert info.value.kind == "bad_version"
    with pytest.raises(RemoteProtocolError):
        parse_header(data + struct.pack(">i", 4) + b"ping" + struct.pack(">i", 1) + BODY)


@pytest.mark.parametrize("mtype", [0, 5, 6, 0x7F, 0xFF])
def test_bad_strict_type(mtype: int) -> None:
    data = _strict(mtype, b"ping", 1234)
    assert parse_header(data[:-1]) is None
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(data + BODY)
    assert info.value.kind == "bad_type"
    assert info.value.seqid == 1234


@pytest.mark.parametrize("mtype", [0, 5, 0x7F, -1, -128])
def test_bad_nonstrict_type(mtype: int) -> None:
    data = _nonstrict(mtype, b"ping", -5)
    assert parse_header(data[:-1]) is None
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(data + BODY)
    assert info.value.kind == "bad_type"
    assert info.value.seqid == -5


@pytest.mark.parametrize("name_len", [-1, -(2**31), MAX_NAME_LENGTH + 1, 2**31 - 1])
def test_bad_strict_name_length_raises_before_the_name_arrives(name_len: int) -> None:
    data = struct.pack(">Ii", 0x80010001, name_len)
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(data)
    assert info.value.kind == "garbage"


@pytest.mark.parametrize("name_len", [MAX_NAME_LENGTH + 1, 0x00FFFFFF, 2**31 - 1])
def test_huge_nonstrict_name_length_raises_before_the_name_arrives(name_len: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(struct.pack(">i", name_len))
    assert info.value.kind == "garbage"


def test_longest_name_is_accepted() -> None:
    name = "n" * MAX_NAME_LENGTH
    for strict in (True, False):
        _check(parse_header(encode_header(name, MessageType.CALL, 3, strict)), name, 1, 3, strict)


# Names as bytes: not UTF-8 at all, UTF-8 cut short, a UTF-8-encoded surrogate
# (not valid UTF-8), a lone continuation byte, and one valid non-ASCII name.
RAW_NAMES = [
    b"\xff\xfe",
    b"caf\xc3",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\x80abc",
    b"Svc:get\xff",
    b"a\\b\xff",
    b"caf\xc3\xa9",
]


@pytest.mark.parametrize("raw", RAW_NAMES)
@pytest.mark.parametrize("strict", [True, False])
def test_any_name_bytes_are_read_and_written_back_exactly(raw: bytes, strict: bool) -> None:
    """A real Thrift server reads a name that is not UTF-8 (and answers UNKNOWN_METHOD);
    so does the sidecar, and whatever it writes with the name carries the same bytes."""
    envelope = (_strict if strict else _nonstrict)(int(MessageType.CALL), raw, 99)
    header = parse_header(envelope + BODY)
    assert header is not None
    assert (header.type, header.seqid, header.strict) == (MessageType.CALL, 99, strict)
    assert header.body_offset == len(envelope)
    assert name_bytes(header.name) == raw
    assert encode_header(header.name, MessageType.CALL, 99, strict) == envelope
    for n in range(len(envelope)):
        assert parse_header(envelope[:n]) is None


@pytest.mark.parametrize("raw", RAW_NAMES)
@pytest.mark.parametrize("transport", [Transport.FRAMED, Transport.BUFFERED])
def test_decoders_deliver_any_name_and_answers_echo_it(raw: bytes, transport: Transport) -> None:
    call = _strict(int(MessageType.CALL), raw, 7) + BODY
    decoder = make_decoder(transport, 1 << 20)
    wire = frame(call, transport) * 2
    messages = [m for at in range(len(wire)) for m in decoder.receive_data(wire[at : at + 1])]
    assert [bytes(m.payload()) for m in messages] == [call, call]
    header = messages[0].header
    answer = encode_application_exception(header.name, 7, 1, "unknown method", header.strict)
    assert answer.startswith(_strict(int(MessageType.EXCEPTION), raw, 7))


def test_a_valid_utf8_name_reads_as_before() -> None:
    header = parse_header(_strict(int(MessageType.CALL), b"caf\xc3\xa9", 1) + BODY)
    assert header is not None
    assert header.name == "café"
    assert shown_name(header.name) == "café"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (b"ping", "ping"),
        (b"caf\xc3\xa9", "café"),
        (b"a\\b", "a\\b"),  # UTF-8: as it is, backslash and all
        (b"\xff\xfe", "\\xff\\xfe"),
        (b"caf\xc3", "caf\\xc3"),
        (b"\xc3\xa9\xff", "é\\xff"),
        (b"a\\b\xff", "a\\\\b\\xff"),  # not UTF-8: the backslash is escaped too
        (b"Svc:get\xff", "Svc:get\\xff"),
    ],
)
def test_shown_name(raw: bytes, shown: str) -> None:
    name = str(raw, "utf-8", "surrogateescape")
    assert shown_name(name) == shown
    shown.encode("utf-8")  # always valid text


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.booleans())
def test_every_byte_string_round_trips_and_shows_as_text(raw: bytes, strict: bool) -> None:
    envelope = encode_header(str(raw, "utf-8", "surrogateescape"), MessageType.REPLY, 5, strict)
    assert envelope == (_strict if strict else _nonstrict)(int(MessageType.REPLY), raw, 5)
    header = parse_header(envelope)
    assert header is not None
    assert name_bytes(header.name) == raw
    shown = shown_name(header.name)
    shown.encode("utf-8")
    try:
        assert shown == raw.decode("utf-8")
    except UnicodeDecodeError:
        assert _read_back(shown) == raw  # no two such names look alike


def _read_back(shown: str) -> bytes:
    """The bytes a `shown_name` of a name that is not UTF-8 stands for."""
    out = bytearray()
    at = 0
    while at < len(shown):
        if shown[at] == "\\" and shown[at + 1] == "\\":
            out += b"\\"
            at += 2
        elif shown[at] == "\\":
            assert shown[at + 1] == "x"
            out.append(int(shown[at + 2 : at + 4], 16))
            at += 4
        else:
            out += shown[at].encode("utf-8")
            at += 1
    return bytes(out)


def test_encode_header_bytes() -> None:
    assert encode_header("ab", MessageType.REPLY, 258) == (
        b"\x80\x01\x00\x02\x00\x00\x00\x02ab\x00\x00\x01\x02"
    )
    assert encode_header("ab", MessageType.REPLY, -1, strict=False) == (
        b"\x00\x00\x00\x02ab\x02\xff\xff\xff\xff"
    )


@pytest.mark.parametrize("strict", [True, False])
def test_write_seqid(strict: bool) -> None:
    before = encode_header("Svc:get", MessageType.CALL, 1, strict) + BODY
    header = parse_header(before)
    assert header is not None
    buf = bytearray(before)
    write_seqid(buf, header.seqid_offset, -(2**31))
    changed = [i for i in range(len(buf)) if buf[i] != before[i]]
    assert changed
    assert all(header.seqid_offset <= i < header.body_offset for i in changed)
    after = parse_header(buf)
    assert after is not None
    assert after.seqid == -(2**31)
    assert (after.name, after.type, after.strict, after.body_offset) == (
        header.name,
        header.type,
        header.strict,
        header.body_offset,
    )


# ----------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(names, mtypes, seqids, st.booleans(), st.binary(max_size=8))
def test_encode_header_matches_thriftpy2_and_round_trips(
    name: str, mtype: MessageType, seqid: int, strict: bool, tail: bytes
) -> None:
    envelope = encode_header(name, mtype, seqid, strict)
    assert envelope == encode_envelope_thriftpy2(name, mtype, seqid, strict)
    header = parse_header(envelope + tail)
    _check(header, name, mtype, seqid, strict)
    assert header is not None
    assert header.body_offset == len(envelope)
    for n in range(len(envelope)):
        assert parse_header(envelope[:n]) is None


@settings(max_examples=150, deadline=None)
@given(names, mtypes, seqids, st.booleans(), seqids, st.binary(max_size=5), st.binary(max_size=8))
def test_write_seqid_patches_only_the_seqid(
    name: str,
    mtype: MessageType,
    seqid: int,
    strict: bool,
    new_seqid: int,
    before: bytes,
    tail: bytes,
) -> None:
    original = before + encode_header(name, mtype, seqid, strict) + tail
    header = parse_header(original, len(before))
    assert header is not None
    buf = bytearray(original)
    write_seqid(buf, len(before) + header.seqid_offset, new_seqid)
    expected = before + encode_header(name, mtype, new_seqid, strict) + tail
    assert buf == expected


@settings(max_examples=300, deadline=None)
@given(names, mtypes, seqids, st.booleans(), st.integers(0, 200), st.integers(0, 255), st.data())
def test_corrupted_envelope_raises_only_remote_protocol_error(
    name: str,
    mtype: MessageType,
    seqid: int,
    strict: bool,
    at: int,
    byte: int,
    data: st.DataObject,
) -> None:
    buf = bytearray(encode_header(name, mtype, seqid, strict) + BODY)
    buf[at % len(buf)] = byte
    cut = data.draw(st.integers(0, len(buf)))
    with contextlib.suppress(RemoteProtocolError):
        parse_header(bytes(buf[:cut]))


# The names a connection repeats: UTF-8, invalid UTF-8, empty, and one long.
_POOL = [b"ping", b"Calc:add", b"caf\xc3", b"", b"\xff\xfe", "naïve".encode(), b"n" * 300]


@settings(max_examples=200, deadline=None)
@given(
    picks=st.lists(
        st.tuples(
            st.sampled_from(_POOL),
            st.sampled_from(["strict", "nonstrict", "compact"]),
            st.sampled_from([bytes, bytearray, memoryview]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_a_name_cache_reads_every_envelope_as_without_it(
    picks: list[tuple[bytes, str, type]],
) -> None:
    """One cache across a run of envelopes: the same headers as each read alone, and a
    name read right after the same bytes is the same object (no decode, hash kept)."""
    names = NameCache()
    previous: tuple[bytes, MessageHeader] | None = None
    for raw, form, kind in picks:
        if form == "compact":
            data = kind(_compact(raw))
            cached = parse_compact_header(data, 0, names)
            alone = parse_compact_header(data, 0)
        else:
            make = _strict if form == "strict" else _nonstrict
            data = kind(make(MessageType.CALL, raw, 7))
            cached = parse_header(data, 0, names)
            alone = parse_header(data, 0)
        assert cached == alone
        assert cached is not None
        assert name_bytes(cached.name) == raw
        if previous is not None and previous[0] == raw:
            assert cached.name is previous[1].name
        previous = (raw, cached)


def _compact(raw: bytes) -> bytes:
    """A compact CALL envelope with seqid 7 and the name's bytes as they are."""
    return bytes([0x82, 0x21, 7 << 1]) + encode_varint(len(raw)) + raw


def test_a_decoder_hands_a_repeated_name_back_as_one_object() -> None:
    """Two calls of one method on a connection: the second's name is the first's str."""
    decoder = make_decoder(Transport.FRAMED)
    wire = frame(encode_header("Calculator:add", MessageType.CALL, 1) + BODY, Transport.FRAMED)
    (first,) = decoder.receive_data(wire)
    (second,) = decoder.receive_data(wire)
    assert second.header.name == "Calculator:add"
    assert second.header.name is first.header.name


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=4, max_size=300), st.data(), seqids)
def test_with_seqid_is_a_patched_copy(data: bytes, draw: st.DataObject, seqid: int) -> None:
    # The copy `Message.wire_with_seqid` writes for a small message: the bytes
    # struct.pack_into would leave in a bytearray copy; the bytes given unchanged.
    offset = draw.draw(st.integers(0, len(data) - 4), label="offset")
    given_bytes = bytes(data)
    expected = bytearray(data)
    struct.pack_into(">i", expected, offset, seqid)
    assert with_seqid(data, offset, seqid) == bytes(expected)
    assert data == given_bytes


def test_every_connections_name_cache_hands_back_one_str_for_a_name() -> None:
    """Two connections' caches read the same name: one ``str`` object, so that a table
    keeping the name it was asked for last (the policies') knows it by identity."""
    raw = b"Catalog:getItemDetails"
    data = _strict(MessageType.CALL, raw, 7)
    first, second = NameCache(), NameCache()
    one = parse_header(data, 0, first)
    other = parse_header(bytes(bytearray(data)), 0, second)
    assert one is not None
    assert other is not None
    assert one.name == "Catalog:getItemDetails"
    assert one.name is other.name
