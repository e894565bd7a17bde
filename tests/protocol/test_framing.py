"""Message boundaries: framed, buffered and auto-detected, fed in any split."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.decoders import DecoderBase
from sidecar.protocol.envelope import MessageType, encode_header, parse_header
from sidecar.protocol.framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    AutoDecoder,
    BufferedDecoder,
    FramedDecoder,
    Message,
    Transport,
    detect_transport,
    encode_frame,
    frame,
    make_decoder,
)
from sidecar.protocol.message import SMALL_WIRE_BYTES
from sidecar.protocol.skip import UNBOUNDED
from tests.protocol.thrift_strategies import (
    chunks,
    encode_envelope_thriftpy2,
    one_by_one,
    split_points,
    struct_bodies,
)

FRAMED, BUFFERED = Transport.FRAMED, Transport.BUFFERED
BODY = b"\x0b\x00\x01\x00\x00\x00\x03abc\x00"  # struct { 1: string = "abc" }


@dataclass(frozen=True)
class Sent:
    """One message as a client or server would write it."""

    name: str
    mtype: int
    seqid: int
    strict: bool
    body: bytes

    @property
    def raw(self) -> bytes:
        return encode_envelope_thriftpy2(self.name, self.mtype, self.seqid, self.strict) + self.body

    def wire(self, transport: Transport) -> bytes:
        return frame(self.raw, transport)


def sent(name: str = "getItem", mtype: int = 1, seqid: int = 7, strict: bool = True) -> Sent:
    return Sent(name, mtype, seqid, strict, BODY)


Decoder = FramedDecoder | BufferedDecoder | AutoDecoder


def decoder_for(which: str, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> Decoder:
    if which == "auto":
        return AutoDecoder(lambda t: make_decoder(t, max_size))
    return make_decoder(Transport(which), max_size)


def feed_all(decoder: Decoder, pieces: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for piece in pieces:
        out += decoder.receive_data(piece)
    return out


def check(messages: list[Message], expected: list[Sent], transport: Transport) -> None:
    assert len(messages) == len(expected)
    for msg, want in zip(messages, expected, strict=True):
        header = msg.header
        assert (header.name, header.type, header.seqid, header.strict) == (
            want.name,
            want.mtype,
            want.seqid,
            want.strict,
        )
        assert bytes(msg.payload()) == want.raw
        assert bytes(msg.body()) == want.body
        assert msg.size == len(want.raw)
        assert msg.start == (4 if transport is FRAMED else 0)
        assert bytes(msg.to_wire(FRAMED)) == want.wire(FRAMED)
        assert bytes(msg.to_wire(BUFFERED)) == want.wire(BUFFERED)


def raises(decoder: Decoder, data: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decoder.receive_data(data)
    return info.value


DECODERS = ["framed", "buffered", "auto"]


def transport_of(which: str, auto_as: Transport) -> Transport:
    return auto_as if which == "auto" else Transport(which)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("which", DECODERS)
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("auto_as", [FRAMED, BUFFERED])
def test_one_message_whole_and_byte_by_byte(which: str, strict: bool, auto_as: Transport) -> None:
    transport = transport_of(which, auto_as)
    msg = sent(strict=strict)
    wire = msg.wire(transport)
    for pieces in ([wire], one_by_one(wire), [wire[:3], wire[3:9], wire[9:]]):
        decoder = decoder_for(which)
        assert decoder.receive_data(b"") == []
        out = feed_all(decoder, pieces)
        check(out, [msg], transport)
        assert decoder.receive_data(b"") == []


@pytest.mark.parametrize("which", DECODERS)
@pytest.mark.parametrize("auto_as", [FRAMED, BUFFERED])
def test_back_to_back_in_one_read(which: str, auto_as: Transport) -> None:
    transport = transport_of(which, auto_as)
    msgs = [sent(seqid=i, strict=i % 2 == 0, mtype=1 if i % 3 else 4) for i in range(5)]
    decoder = decoder_for(which)
    check(decoder.receive_data(b"".join(m.wire(transport) for m in msgs)), msgs, transport)


@pytest.mark.parametrize("which", ["framed", "buffered"])
@pytest.mark.parametrize("mtype", list(MessageType))
def test_replies_and_exceptions(which: str, mtype: MessageType) -> None:
    transport = Transport(which)
    msgs = [sent(mtype=mtype, strict=True), sent(mtype=mtype, strict=False, name="")]
    decoder = decoder_for(which)
    check(decoder.receive_data(b"".join(m.wire(transport) for m in msgs)), msgs, transport)


@pytest.mark.parametrize("which", DECODERS)
@pytest.mark.parametrize("auto_as", [FRAMED, BUFFERED])
def test_trailing_partial_message_is_kept(which: str, auto_as: Transport) -> None:
    transport = transport_of(which, auto_as)
    first, second = sent(seqid=1), sent(seqid=2, name="Svc:listAll")
    rest = second.wire(transport)
    for cut in range(1, len(rest)):
        decoder = decoder_for(which)
        check(decoder.receive_data(first.wire(transport) + rest[:cut]), [first], transport)
        if not isinstance(decoder, AutoDecoder):
            assert decoder.buffered_bytes == cut
        check(decoder.receive_data(rest[cut:]), [second], transport)
        if not isinstance(decoder, AutoDecoder):
            assert decoder.buffered_bytes == 0


def test_framed_message_is_forwarded_without_copy() -> None:
    msg = FramedDecoder(1000).receive_data(sent().wire(FRAMED))[0]
    assert msg.to_wire(FRAMED) is msg.buf
    unframed = msg.to_wire(BUFFERED)
    assert isinstance(unframed, memoryview)
    assert unframed.obj is msg.buf
    assert bytes(unframed) == sent().raw


def test_buffered_message_is_forwarded_without_copy() -> None:
    msg = BufferedDecoder(1000).receive_data(sent().wire(BUFFERED))[0]
    assert msg.to_wire(BUFFERED) is msg.buf
    assert bytes(msg.to_wire(FRAMED)) == sent().wire(FRAMED)


@pytest.mark.parametrize("which", ["framed", "buffered"])
@pytest.mark.parametrize("strict", [True, False])
def test_set_seqid(which: str, strict: bool) -> None:
    transport = Transport(which)
    original = sent(seqid=5, strict=strict, name="Svc:getItem")
    decoder = decoder_for(which)
    msgs = decoder.receive_data(original.wire(transport) * 2)
    msg = msgs[0]
    msg.set_seqid(-(2**31))
    assert msg.header.seqid == 5  # the header keeps the seqid that arrived
    patched = Sent(original.name, original.mtype, -(2**31), strict, original.body)
    assert bytes(msg.payload()) == patched.raw
    assert bytes(msg.to_wire(FRAMED)) == patched.wire(FRAMED)
    assert bytes(msg.to_wire(BUFFERED)) == patched.wire(BUFFERED)
    reparsed = parse_header(msg.payload())
    assert reparsed is not None
    assert reparsed.seqid == -(2**31)
    # Messages own their bytes: the next one is untouched.
    assert bytes(msgs[1].payload()) == original.raw


def test_encode_frame_and_frame() -> None:
    raw = sent().raw
    assert encode_frame(raw) == struct.pack(">i", len(raw)) + raw
    assert encode_frame(bytearray(raw)) == struct.pack(">i", len(raw)) + raw
    assert frame(raw, FRAMED) == encode_frame(raw)
    assert frame(bytearray(raw), BUFFERED) == raw


def test_make_decoder() -> None:
    framed = make_decoder(FRAMED, 123)
    assert isinstance(framed, FramedDecoder)
    assert framed.max_size == 123
    buffered = make_decoder(BUFFERED)
    assert isinstance(buffered, BufferedDecoder)
    assert buffered.max_size == DEFAULT_MAX_MESSAGE_SIZE == 16 * 1024 * 1024


@pytest.mark.parametrize("length", [101, 1 << 24, 2**31 - 1])
def test_oversized_frame_is_refused_when_its_length_arrives(length: int) -> None:
    decoder = FramedDecoder(100)
    header = struct.pack(">i", length)
    for byte in one_by_one(header[:3]):
        assert decoder.receive_data(byte) == []
    assert raises(decoder, header[3:]).kind == "oversized"


def test_frame_of_exactly_max_size_is_accepted() -> None:
    raw = sent().raw
    decoder = FramedDecoder(len(raw))
    check(decoder.receive_data(encode_frame(raw)), [sent()], FRAMED)
    assert raises(FramedDecoder(len(raw) - 1), encode_frame(raw)).kind == "oversized"


@pytest.mark.parametrize("length", [0, -1, -(2**31)])
def test_zero_or_negative_frame_length(length: int) -> None:
    decoder = FramedDecoder(1000)
    assert isinstance(raises(decoder, struct.pack(">i", length)), RemoteProtocolError)


@pytest.mark.parametrize(
    "payload",
    [
        b"\x80",  # shorter than any envelope
        encode_header("getItem", MessageType.CALL, 3)[:-1],
        encode_header("getItem", MessageType.CALL, 3),  # an envelope and no struct at all
        b"\x80\x02\x00\x01" + b"\x00" * 20,  # bad version
        b"\x00\x00\x20\x00" + b"\x00" * 20,  # implausible name length
    ],
)
def test_frame_that_cannot_hold_its_message(payload: bytes) -> None:
    raises(FramedDecoder(1000), encode_frame(payload))


def test_frame_with_an_envelope_and_no_struct_carries_the_seqid() -> None:
    error = raises(FramedDecoder(1000), encode_frame(encode_header("get", MessageType.CALL, 31)))
    assert (error.kind, error.seqid) == ("garbage", 31)


@pytest.mark.parametrize("which", ["buffered", "auto"])
def test_buffered_message_over_the_limit(which: str) -> None:
    msg = sent(seqid=42)
    size = len(msg.raw)
    check(decoder_for(which, size).receive_data(msg.raw), [msg], BUFFERED)
    error = raises(decoder_for(which, size - 1), msg.raw)
    assert (error.kind, error.seqid) == ("oversized", 42)


@pytest.mark.parametrize("which", ["buffered", "auto"])
@pytest.mark.parametrize(
    "body",
    [
        b"\x0b\x00\x01\x7f\xff\xff\xff",  # string of 2 GiB
        b"\x0f\x00\x01\x0c\x00\x10\x00\x00",  # list of a million structs
        b"\x0d\x00\x01\x0b\x0b\x01\x00\x00\x00",  # map of 16M strings to strings
    ],
)
def test_huge_declared_size_is_refused_before_the_bytes(which: str, body: bytes) -> None:
    decoder = decoder_for(which, 4096)
    envelope = encode_header("upload", MessageType.CALL, 9)
    assert decoder.receive_data(envelope) == []
    error = raises(decoder, body)
    assert (error.kind, error.seqid) == ("oversized", 9)


@pytest.mark.parametrize("which", ["buffered", "auto"])
def test_struct_errors_carry_the_seqid(which: str) -> None:
    envelope = encode_header("getItem", MessageType.CALL, 77)
    error = raises(decoder_for(which), envelope + b"\x05\x00\x01")  # unknown field type 5
    assert (error.kind, error.seqid) == ("garbage", 77)
    deep = b"\x0c\x00\x01" * 100
    error = raises(decoder_for(which), envelope + deep)
    assert (error.kind, error.seqid) == ("too_deep", 77)


@pytest.mark.parametrize("which", DECODERS)
@pytest.mark.parametrize("auto_as", [FRAMED, BUFFERED])
@pytest.mark.parametrize("strict", [True, False])
def test_truncated_at_eof(which: str, auto_as: Transport, strict: bool) -> None:
    transport = transport_of(which, auto_as)
    msg = sent(seqid=1234, strict=strict)
    wire = msg.wire(transport)
    prefix = 4 if transport is FRAMED else 0
    for cut in range(1, len(wire)):
        decoder = decoder_for(which)
        assert decoder.receive_data(sent(seqid=1).wire(transport) + wire[:cut]) != []
        error = raises(decoder, b"")
        assert error.kind == "truncated"
        readable = parse_header(wire[prefix:cut]) is not None if cut > prefix else False
        assert error.seqid == (1234 if readable else None), cut


@pytest.mark.parametrize("which", DECODERS)
def test_truncated_before_the_first_message_completes(which: str) -> None:
    wire = sent(seqid=1234).wire(FRAMED if which == "framed" else BUFFERED)
    for cut in range(1, len(wire)):
        decoder = decoder_for(which)
        assert decoder.receive_data(wire[:cut]) == []
        assert raises(decoder, b"").kind == "truncated"


BREAKERS: list[tuple[str, list[bytes]]] = [
    ("framed", [struct.pack(">i", 1 << 30)]),
    ("framed", [struct.pack(">i", 0)]),
    ("framed", [b"\x00\x00", b""]),
    ("framed", [encode_frame(b"\x80\x01\x00\x09" + b"\x00" * 20)]),
    ("buffered", [b"\x80\x02\x00\x01"]),
    ("buffered", [encode_header("m", MessageType.CALL, 1) + b"\x01\x00\x01"]),
    ("buffered", [encode_header("m", MessageType.CALL, 1), b""]),
    ("auto", [b"\x82\x21"]),
    ("auto", [b"GET / HTTP/1.1\r\n"]),
    ("auto", [b"\x00\x00", b""]),
    ("auto", [b"\x80\x01\x00\x01", b""]),
    ("auto", [encode_header("m", MessageType.CALL, 1) + b"\x01\x00\x01"]),
    ("auto", [encode_frame(encode_header("m", MessageType.CALL, 1)) + b"\x00\x00\x00\x00"]),
]


@pytest.mark.parametrize(("which", "pieces"), BREAKERS)
def test_a_decoder_that_raised_stays_broken(which: str, pieces: list[bytes]) -> None:
    decoder = decoder_for(which)
    *before, last = pieces
    feed_all(decoder, before)
    first = raises(decoder, last)
    good = sent()
    for data in (good.wire(FRAMED), good.wire(BUFFERED), b"", b"\x00"):
        assert raises(decoder, data) is first


# ----------------------------------------------------------------------------- detection


def _strict_wire(transport: Transport) -> bytes:
    return sent(strict=True).wire(transport)


def _nonstrict_wire(transport: Transport) -> bytes:
    return sent(strict=False).wire(transport)


@pytest.mark.parametrize(
    ("wire", "transport", "decided_at"),
    [
        (_strict_wire(BUFFERED), BUFFERED, 2),
        (_strict_wire(FRAMED), FRAMED, 6),
        (_nonstrict_wire(FRAMED), FRAMED, 4 + 4 + len("getItem") + 1),
        (_nonstrict_wire(BUFFERED), BUFFERED, 4 + len("getItem") + 1),
        (sent(strict=False, name="a", mtype=4).wire(BUFFERED), BUFFERED, 8),
        (sent(strict=False, name="a", mtype=4).wire(FRAMED), FRAMED, 10),
    ],
)
def test_detect_transport(wire: bytes, transport: Transport, decided_at: int) -> None:
    for n in range(decided_at):
        assert detect_transport(wire[:n]) is None, n
    for n in range(decided_at, len(wire) + 1):
        assert detect_transport(wire[:n]) is transport, n
        assert detect_transport(bytearray(wire[:n])) is transport, n


COMPACT_CALL = b"\x82\x21\x07\x07getItem\x00"  # compact: id, version|type, seqid, name, struct


@pytest.mark.parametrize(
    ("prefix", "kind", "decided_at"),
    [
        (COMPACT_CALL, "compact", 2),
        (encode_frame(COMPACT_CALL), "compact", 6),
        # THeader: decided at its payload protocol id, the first byte of the variable header.
        (struct.pack(">iHH", 40, 0x0FFF, 0) + b"\x00" * 10, "unsupported", 15),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http", 4),
        (b"POST /rpc HTTP/1.1\r\n", "http", 4),
        (b"PUT / HTTP/1.1\r\n", "http", 4),
        (b"HEAD / HTTP/1.1\r\n", "http", 4),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "http", 4),
        (b"\x80\x02\x00\x01", "garbage", 2),
        (b"\xff\xff\xff\xff", "garbage", 2),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "garbage", 8),  # a TLS ClientHello
    ],
)
def test_detect_refuses(prefix: bytes, kind: str, decided_at: int) -> None:
    for n in range(decided_at):
        assert detect_transport(prefix[:n]) is None, n
    for n in range(decided_at, len(prefix) + 1):
        with pytest.raises(RemoteProtocolError) as info:
            detect_transport(prefix[:n])
        assert info.value.kind == kind


@pytest.mark.parametrize(
    ("prefix", "kind"),
    [
        (COMPACT_CALL, "compact"),
        (b"GET / HTTP/1.1\r\n", "http"),
        (b"\x16\x03\x01\x02\x00", "garbage"),
    ],
)
def test_auto_decoder_refuses(prefix: bytes, kind: str) -> None:
    decoder = AutoDecoder(make_decoder)
    with pytest.raises(RemoteProtocolError) as info:
        feed_all(decoder, one_by_one(prefix + b"\x00" * 8))
    assert info.value.kind == kind
    assert decoder.transport is None


def test_auto_decoder_gives_up_on_endless_undecidable_bytes() -> None:
    decoder = AutoDecoder(make_decoder)
    # A plausible non-strict name length whose type byte never arrives.
    assert decoder.receive_data(struct.pack(">i", 4096)) == []
    with pytest.raises(RemoteProtocolError) as info:
        feed_all(decoder, [b"\x00" * 1000] * 5)
    assert info.value.kind == "garbage"


@pytest.mark.parametrize("auto_as", [FRAMED, BUFFERED])
def test_auto_decoder_reports_its_transport(auto_as: Transport) -> None:
    decoder = AutoDecoder(make_decoder)
    assert decoder.transport is None
    wire = sent().wire(auto_as)
    assert decoder.receive_data(wire[:1]) == []
    check(decoder.receive_data(wire[1:]), [sent()], auto_as)
    assert decoder.transport is auto_as


# ----------------------------------------------------------------------------- properties

any_names = st.text(max_size=12)
# Detection of non-strict envelopes assumes names that look like IDL identifiers.
identifiers = st.from_regex(
    r"([A-Za-z_][A-Za-z0-9_]{0,9}:)?[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True
)
seqids = st.integers(-(2**31), 2**31 - 1)


def messages(names: st.SearchStrategy[str], types: list[int]) -> st.SearchStrategy[Sent]:
    return st.builds(Sent, names, st.sampled_from(types), seqids, st.booleans(), struct_bodies())


all_messages = messages(any_names, [1, 2, 3, 4])
client_messages = messages(identifiers, [1, 4])


def _round_trip(
    make: Callable[[], Decoder], msgs: list[Sent], transport: Transport, data: st.DataObject
) -> None:
    wire = b"".join(m.wire(transport) for m in msgs)
    cuts = data.draw(split_points(len(wire)), label="cuts")
    for pieces in ([wire], chunks(wire, cuts), one_by_one(wire)):
        decoder = make()
        check(feed_all(decoder, pieces), msgs, transport)
        assert decoder.receive_data(b"") == []
    # A partial message after them is kept, then completed, or reported at EOF.
    extra = data.draw(st.sampled_from(msgs), label="extra")
    tail = extra.wire(transport)
    cut = data.draw(st.integers(1, len(tail) - 1), label="tail cut")
    decoder = make()
    check(feed_all(decoder, [*chunks(wire, cuts), tail[:cut]]), msgs, transport)
    if not isinstance(decoder, AutoDecoder):
        assert decoder.buffered_bytes == cut
    check(decoder.receive_data(tail[cut:]), [extra], transport)
    decoder = make()
    feed_all(decoder, [wire, tail[:cut]])
    error = raises(decoder, b"")
    assert error.kind == "truncated"
    prefix = 4 if transport is FRAMED else 0
    readable = cut > prefix and parse_header(tail[prefix:cut]) is not None
    assert error.seqid == (extra.seqid if readable else None)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(all_messages, min_size=1, max_size=4), st.sampled_from([FRAMED, BUFFERED]), st.data()
)
def test_framed_and_buffered_decoders_split_anyhow(
    msgs: list[Sent], transport: Transport, data: st.DataObject
) -> None:
    _round_trip(lambda: make_decoder(transport), msgs, transport, data)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(client_messages, min_size=1, max_size=3),
    st.sampled_from([FRAMED, BUFFERED]),
    st.data(),
)
def test_auto_decoder_splits_anyhow(
    msgs: list[Sent], transport: Transport, data: st.DataObject
) -> None:
    _round_trip(lambda: AutoDecoder(make_decoder), msgs, transport, data)
    for n in range(len(msgs[0].wire(transport)) + 1):
        assert detect_transport(msgs[0].wire(transport)[:n]) in (None, transport)


def _decoded(
    pieces: list[bytes] | list[bytearray], make: Callable[[], FramedDecoder | BufferedDecoder]
) -> tuple[list[Message], object]:
    """What a new decoder from ``make`` makes of ``pieces``, walking on
    while a buffered one says a walk is pending (as a connection does): the messages,
    then the error if any."""
    decoder = make()
    out: list[Message] = []
    try:
        for piece in pieces:
            out += decoder.receive_data(piece)
            for _ in range(10_000):  # bounded: each resume walks at least one step
                if not (isinstance(decoder, BufferedDecoder) and decoder.walk_pending):
                    break
                out += decoder.resume()
    except RemoteProtocolError as exc:
        return out, (exc.kind, str(exc), exc.seqid)
    return out, None


@pytest.mark.parametrize("transport", [FRAMED, BUFFERED])
@settings(max_examples=200, deadline=None)
@given(st.lists(all_messages, min_size=1, max_size=3), st.data())
def test_a_decoder_reads_bytes_and_bytearrays_alike(
    transport: Transport, msgs: list[Sent], data: st.DataObject
) -> None:
    """A read that is one whole message in bytes takes the in-place path (a whole
    frame, or a flat message walked where it lies), anything else the general one; the
    messages and errors are the same, garbage and, unframed, a bounded walk included."""
    walk_steps = UNBOUNDED
    if transport is BUFFERED:
        walk_steps = data.draw(st.sampled_from([UNBOUNDED, 1, 2, 5]), label="walk_steps")

    def make() -> FramedDecoder | BufferedDecoder:
        if transport is FRAMED:
            return FramedDecoder(1000)
        return BufferedDecoder(1000, walk_steps=walk_steps)

    wire = bytearray(b"".join(m.wire(transport) for m in msgs))
    if data.draw(st.booleans(), label="corrupt"):
        at = data.draw(st.integers(0, len(wire) - 1), label="at")
        wire[at] = data.draw(st.integers(0, 255), label="byte")
    cuts = data.draw(split_points(len(wire)), label="cuts")
    pieces = chunks(bytes(wire), cuts)
    assert _decoded(pieces, make) == _decoded([bytearray(piece) for piece in pieces], make)
    whole = [m.wire(transport) for m in msgs]  # one whole message per read: in place
    assert _decoded(whole, make) == _decoded([bytearray(w) for w in whole], make)


def test_a_buffered_decoder_keeps_a_whole_message_in_the_bytes_of_its_read() -> None:
    # No copy into the decoder's buffer and out again: the message is the read's
    # bytes, as a framed decoder's is; a read of a message and a half is walked.
    one = Sent("echo", 1, 7, True, b"\x0b\x00\x01\x00\x00\x00\x02hi\x00").wire(BUFFERED)
    decoder = BufferedDecoder(1000)
    [message] = decoder.receive_data(one)
    assert message.buf is one
    assert message.header.seqid == 7
    [first] = decoder.receive_data(one + one[:5])
    assert bytes(first.buf) == one
    [second] = decoder.receive_data(one[5:])
    assert bytes(second.buf) == one


@settings(max_examples=100, deadline=None)
@given(all_messages, seqids)
def test_wire_with_seqid_is_set_seqid_then_to_wire(msg: Sent, new_seqid: int) -> None:
    for arrived, transport, read_as in itertools.product(
        (FRAMED, BUFFERED), (FRAMED, BUFFERED, Transport.THEADER), (bytes, bytearray)
    ):
        [one] = make_decoder(arrived).receive_data(read_as(msg.wire(arrived)))
        [two] = make_decoder(arrived).receive_data(read_as(msg.wire(arrived)))
        two.set_seqid(new_seqid)
        came = one.buf
        assert bytes(one.wire_with_seqid(new_seqid, transport)) == bytes(two.to_wire(transport))
        in_form = (arrived, transport) in ((FRAMED, FRAMED), (BUFFERED, BUFFERED))
        if in_form and isinstance(came, bytes) and len(came) <= SMALL_WIRE_BYTES:
            # A small message in the bytes of its read: written as a patched copy,
            # its own bytes left as they came.
            assert one.buf is came
        else:  # patched in place
            assert one == two


@settings(max_examples=100, deadline=None)
@given(st.lists(all_messages, min_size=1, max_size=3), seqids)
def test_set_seqid_then_forward_either_way(msgs: list[Sent], new_seqid: int) -> None:
    for transport in (FRAMED, BUFFERED):
        decoded = make_decoder(transport).receive_data(b"".join(m.wire(transport) for m in msgs))
        for msg, want in zip(decoded, msgs, strict=True):
            msg.set_seqid(new_seqid)
            patched = Sent(want.name, want.mtype, new_seqid, want.strict, want.body)
            assert bytes(msg.to_wire(FRAMED)) == patched.wire(FRAMED)
            assert bytes(msg.to_wire(BUFFERED)) == patched.wire(BUFFERED)


def test_every_decoder_reads_bytes_with_a_receive_data_of_its_own() -> None:
    """`DecoderBase` declares `receive_data` so that a connection holding any decoder
    calls it directly; each decoder must define it (the base's only says it was not)."""
    decoders = DecoderBase.__subclasses__()
    assert {d.__name__ for d in decoders} == {"FramedDecoder", "BufferedDecoder", "THeaderDecoder"}
    for decoder in decoders:
        assert decoder.receive_data is not DecoderBase.receive_data, decoder.__name__
    with pytest.raises(NotImplementedError, match="DecoderBase defines no receive_data"):
        DecoderBase(1024).receive_data(b"x")


def test_a_large_message_is_patched_in_place_and_a_small_one_copied() -> None:
    # Past SMALL_WIRE_BYTES the second copy would cost more than struct's call:
    # the message's bytes become its own bytearray, patched; below, a patched copy.
    for size, copied in ((SMALL_WIRE_BYTES - 100, True), (SMALL_WIRE_BYTES + 1, False)):
        body = b"\x0b\x00\x01" + struct.pack(">i", size) + b"x" * size + b"\x00"
        wire = Sent("echo", 1, 7, True, body).wire(FRAMED)
        [message] = make_decoder(FRAMED).receive_data(wire)
        came = message.buf
        sent = message.wire_with_seqid(99, FRAMED)
        [read_back] = make_decoder(FRAMED).receive_data(bytes(sent))
        assert read_back.header.seqid == 99
        assert bytes(read_back.body()) == body
        assert (message.buf is came) is copied
        assert (sent is message.buf) is not copied
