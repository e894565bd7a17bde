"""Detection against the first bytes of real clients: every protocol and transport of Apache Thrift.

Before the fix, framed THeader (a frame length, then the THeader frame with its
own length) and framed JSON made the auto decoder wait for bytes that never
come; buffered JSON was closed without an answer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.auto import EVERYTHING, AutoDecoder, decoder_for, make_decoder
from sidecar.protocol.decoders import BufferedDecoder, FramedDecoder
from sidecar.protocol.detect import Detected, detect
from sidecar.protocol.envelope import MessageType, Protocol
from sidecar.protocol.message import Message, Transport
from sidecar.protocol.theader_decoder import THeaderDecoder
from sidecar.protocol.tjson import UnsupportedProtocolError, encode_json_application_exception
from tests.protocol.apache_wire import PROTOCOLS, call_wire, read_exception
from tests.protocol.thrift_strategies import chunks, one_by_one, split_points

TRANSPORTS = ("buffered", "framed")
EXPECTED = {
    ("binary", "buffered"): Detected(Transport.BUFFERED, Protocol.BINARY),
    ("binary", "framed"): Detected(Transport.FRAMED, Protocol.BINARY),
    ("compact", "buffered"): Detected(Transport.BUFFERED, Protocol.COMPACT),
    ("compact", "framed"): Detected(Transport.FRAMED, Protocol.COMPACT),
    ("header-binary", "buffered"): Detected(Transport.THEADER, Protocol.BINARY),
    ("header-binary", "framed"): Detected(Transport.THEADER, Protocol.BINARY),
    ("header-compact", "buffered"): Detected(Transport.THEADER, Protocol.COMPACT),
    ("header-compact", "framed"): Detected(Transport.THEADER, Protocol.COMPACT),
}
ALL = [(p, t) for p in PROTOCOLS for t in TRANSPORTS]


def feed(decoder: AutoDecoder, pieces: list[bytes]) -> list[Message]:
    out: list[Message] = []
    for piece in pieces:
        out += decoder.receive_data(piece)
    return out


@pytest.mark.parametrize(("protocol", "transport"), ALL)
def test_no_client_is_left_waiting(protocol: str, transport: str) -> None:
    """A whole first call is either decoded or refused at once: never a wait for more bytes."""
    wire = call_wire(protocol, transport)
    for decoder in (AutoDecoder(), AutoDecoder(accept=EVERYTHING)):
        try:
            messages = decoder.receive_data(wire)
        except RemoteProtocolError:
            continue
        assert len(messages) == 1


@pytest.mark.parametrize(("protocol", "transport"), sorted(EXPECTED))
def test_detects_every_supported_client(protocol: str, transport: str) -> None:
    wire = call_wire(protocol, transport, name="getItem", seqid=-3)
    expected = EXPECTED[(protocol, transport)]
    assert detect(wire) == expected
    for pieces in ([wire], one_by_one(wire)):
        decoder = AutoDecoder(accept=EVERYTHING)
        [message] = feed(decoder, pieces)
        assert (decoder.transport, decoder.protocol) == expected
        assert message.protocol is expected.protocol
        assert (message.header.name, message.header.seqid) == ("getItem", -3)
        assert message.header.type is MessageType.CALL
        assert (message.theader is not None) == (expected.transport is Transport.THEADER)
        if message.theader is not None:
            assert message.theader.outer_framed == (transport == "framed")


@pytest.mark.parametrize(
    ("protocol", "transport", "kind"),
    [
        ("compact", "buffered", "compact"),
        ("compact", "framed", "compact"),
        ("header-binary", "buffered", "unsupported"),
        ("header-binary", "framed", "unsupported"),
        ("header-compact", "framed", "unsupported"),
    ],
)
def test_binary_only_decoder_refuses_the_rest_at_once(
    protocol: str, transport: str, kind: str
) -> None:
    """The default (today's proxy) refuses what it cannot forward, with the kinds it counts."""
    with pytest.raises(RemoteProtocolError) as info:
        AutoDecoder().receive_data(call_wire(protocol, transport))
    assert info.value.kind == kind


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(EXPECTED)), st.data())
def test_detection_in_random_splits(combo: tuple[str, str], data: st.DataObject) -> None:
    wire = call_wire(*combo) + call_wire(*combo, seqid=8)
    cuts = data.draw(split_points(len(wire)), label="cuts")
    decoder = AutoDecoder(accept=EVERYTHING)
    messages = feed(decoder, chunks(wire, cuts))
    assert [m.header.seqid for m in messages] == [7, 8]
    assert decoder.receive_data(b"") == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "byte-by-byte"])
def test_json_client_is_refused_with_an_answer_it_decodes(transport: str, whole: bool) -> None:
    wire = call_wire("json", transport, name="Svc:getItem", seqid=41)
    decoder = AutoDecoder(accept=EVERYTHING)
    with pytest.raises(UnsupportedProtocolError) as info:
        feed(decoder, [wire] if whole else one_by_one(wire))
    error = info.value
    assert (error.kind, error.protocol, error.framed) == ("json", "json", transport == "framed")
    assert (error.seqid, error.name) == (41, "Svc:getItem")
    reply = error.answer(9, "JSON is not supported; see http://127.0.0.1:9000/")
    assert reply is not None
    assert read_exception(reply, "json", transport) == (
        "getItem",
        MessageType.EXCEPTION,
        41,
        9,
        "JSON is not supported; see http://127.0.0.1:9000/",
    )
    with pytest.raises(UnsupportedProtocolError):
        decoder.receive_data(b"more")


@pytest.mark.parametrize(
    "text", ["", "plain", 'quote " and \\ backslash', "ünïcödé ✓", "control \x01\n\t", "🚀"]
)
def test_json_exception_text_survives_apache_reader(text: str) -> None:
    wire = encode_json_application_exception('m"x', -5, 6, text)
    assert read_exception(wire, "json", "buffered") == ('m"x', MessageType.EXCEPTION, -5, 6, text)


def test_a_json_name_that_is_not_text_is_echoed_as_it_was_escaped() -> None:
    """A JSON client may escape a lone surrogate (``"\\udcff"``): the same escape back."""
    decoder = AutoDecoder()
    with pytest.raises(UnsupportedProtocolError) as info:
        decoder.receive_data(b'[1,"get\\udcff",1,3,{}]')
    answer = info.value.answer(9, "not supported")
    assert answer is not None
    assert answer.startswith(b'[1,"get\\udcff",3,3,')


def test_json_envelope_that_cannot_be_read_is_refused_without_seqid() -> None:
    with pytest.raises(UnsupportedProtocolError) as info:
        AutoDecoder().receive_data(b'[1,"name",1,{"1":{}}]')
    assert info.value.seqid is None
    assert info.value.answer(6, "x") is None


def test_framed_json_with_an_unreadable_envelope_is_refused_once_the_frame_is_whole() -> None:
    body = b'[1,"m" ,x]'
    wire = len(body).to_bytes(4, "big") + body
    for n in range(len(wire)):
        assert detect(wire[:n]) is None, n
    with pytest.raises(UnsupportedProtocolError):
        detect(wire)


def test_theader_with_an_unknown_payload_protocol_is_unsupported() -> None:
    wire = bytearray(call_wire("header-binary", "buffered"))
    wire[14] = 1  # protocol id 1: JSON inside THeader
    with pytest.raises(RemoteProtocolError) as info:
        AutoDecoder(accept=EVERYTHING).receive_data(bytes(wire))
    assert info.value.kind == "unsupported"


def test_make_decoder_keeps_to_framed_and_buffered() -> None:
    with pytest.raises(ValueError, match="not theader"):
        make_decoder(Transport.THEADER)
    assert isinstance(decoder_for(Transport.THEADER), THeaderDecoder)
    assert decoder_for(Transport.FRAMED, Protocol.COMPACT).protocol is Protocol.COMPACT


def test_the_original_make_callback_is_still_used_for_binary() -> None:
    made: list[Transport] = []

    def make(transport: Transport) -> FramedDecoder | BufferedDecoder:
        made.append(transport)
        return make_decoder(transport, 1000)

    decoder = AutoDecoder(make, accept=EVERYTHING)
    assert len(decoder.receive_data(call_wire("binary", "framed"))) == 1
    assert made == [Transport.FRAMED]
    compact = AutoDecoder(make, accept=EVERYTHING)
    assert len(compact.receive_data(call_wire("compact", "framed"))) == 1
    assert made == [Transport.FRAMED]


@pytest.mark.parametrize(
    "prefix",
    [
        b"\x00\x00\x00\x06\x0f\xff\x00\x00\x00\x00",
        b"\x00\x00\x00\x0a\x00\x00\x00\x06\x0f\xff\x00\x00\x00\x00",
    ],
    ids=["theader", "framed theader"],
)
def test_theader_frame_too_short_for_its_header_is_refused_at_once(prefix: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        AutoDecoder(accept=EVERYTHING).receive_data(prefix)
    assert info.value.kind == "garbage"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_non_strict_call_with_an_empty_name_is_read_whole(transport: str) -> None:
    """Non-strict binary with an empty method name (name length 0, legal on the wire;
    an upstream answers it). Framed, detection took the frame length for a buffered
    name length and waited for bytes that never come; buffered, it was garbage."""
    body = b"\x00\x00\x00\x00" + bytes([MessageType.CALL]) + b"\x00\x00\x00\x07" + b"\x00"
    wire = (len(body).to_bytes(4, "big") + body) if transport == "framed" else body
    decoder = AutoDecoder()
    [message] = decoder.receive_data(wire)
    assert (message.header.name, message.header.seqid) == ("", 7)
    assert detect(wire) == Detected(Transport(transport), Protocol.BINARY)
