"""Any bytes at all: the protocol code returns or raises ProtocolError, never anything else."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import ProtocolError
from sidecar.protocol.appexc import parse_application_exception
from sidecar.protocol.envelope import MessageType, encode_header, parse_header
from sidecar.protocol.framing import (
    AutoDecoder,
    BufferedDecoder,
    FramedDecoder,
    Transport,
    detect_transport,
    encode_frame,
    make_decoder,
)
from sidecar.protocol.skip import StructSkipper, struct_end, value_end
from tests.protocol.thrift_strategies import chunks, split_points, struct_bodies

# Bytes that mean something in the binary protocol (type ids, version bytes, small
# sizes, sign bits) turn up far more often than in uniform random bytes.
_MEANINGFUL = st.sampled_from([0, 1, 2, 3, 4, 6, 8, 10, 11, 12, 13, 14, 15, 16, 0x7F, 0x80, 0xFF])
_BYTE = st.integers(0, 255) | _MEANINGFUL
garbage = st.binary(max_size=200) | st.lists(_BYTE, max_size=200).map(bytes)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Valid messages, then bytes overwritten, inserted or deleted."""
    body = draw(struct_bodies())
    envelope = encode_header(draw(st.text(max_size=8)), MessageType.CALL, 1, draw(st.booleans()))
    wire = bytearray(envelope + body)
    if draw(st.booleans()):
        wire = bytearray(encode_frame(wire))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(wire)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "insert" or at == len(wire):
            wire[at:at] = bytes([draw(_BYTE)])
        elif op == "set":
            wire[at] = draw(_BYTE)
        else:
            del wire[at]
    return bytes(wire)


@st.composite
def after_envelope(draw: st.DrawFn) -> bytes:
    """A valid envelope, then garbage where the struct should be: the skipper's input."""
    strict = draw(st.booleans())
    return encode_header("m", MessageType.CALL, 5, strict) + draw(garbage)


inputs = garbage | mangled() | after_envelope()

DECODERS: list[Callable[[], FramedDecoder | BufferedDecoder | AutoDecoder]] = [
    lambda: FramedDecoder(300),
    lambda: make_decoder(Transport.FRAMED),
    lambda: BufferedDecoder(300),
    lambda: BufferedDecoder(300, max_depth=3),
    lambda: make_decoder(Transport.BUFFERED),
    lambda: AutoDecoder(make_decoder),
    lambda: AutoDecoder(lambda t: make_decoder(t, 100)),
]


def _only_protocol_errors(call: Callable[[], object]) -> None:
    error: ProtocolError | None = None
    try:
        call()
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert isinstance(error.kind, str)
        assert error.seqid is None or isinstance(error.seqid, int)


@settings(max_examples=600, deadline=None)
@given(inputs, st.data())
def test_decoders_raise_only_protocol_errors(data: bytes, draw: st.DataObject) -> None:
    cuts = draw.draw(split_points(len(data)), label="cuts")
    for make in DECODERS:
        decoder = make()
        error: ProtocolError | None = None
        for piece in [*chunks(data, cuts), b""]:
            try:
                for msg in decoder.receive_data(piece):
                    assert msg.size > 0
            except ProtocolError as exc:
                error = exc
                break
        if error is not None:
            with pytest.raises(ProtocolError) as again:
                decoder.receive_data(b"\x00")
            assert again.value is error


@settings(max_examples=500, deadline=None)
@given(inputs, st.integers(0, 8))
def test_parsers_raise_only_protocol_errors(data: bytes, start: int) -> None:
    start = min(start, len(data))
    _only_protocol_errors(lambda: parse_header(data, start))
    _only_protocol_errors(lambda: parse_header(memoryview(data)))
    _only_protocol_errors(lambda: struct_end(data, start))
    _only_protocol_errors(lambda: struct_end(data, max_depth=2))
    _only_protocol_errors(lambda: value_end(data, start, data[0] if data else 0))
    _only_protocol_errors(lambda: parse_application_exception(data))
    _only_protocol_errors(lambda: parse_application_exception(memoryview(data)[start:]))
    for n in (1, 2, 4, 6, 8, 16, len(data)):
        _only_protocol_errors(lambda n=n: detect_transport(data[:n]))


@settings(max_examples=400, deadline=None)
@given(inputs, st.data(), st.integers(0, 300))
def test_skipper_fed_in_pieces_raises_only_protocol_errors(
    data: bytes, draw: st.DataObject, limit: int
) -> None:
    cuts = draw.draw(split_points(len(data)), label="cuts")
    skipper = StructSkipper()
    pos = 0
    try:
        for cut in [*cuts, len(data)]:
            pos = skipper.advance(data, pos, cut, limit)
            assert pos <= cut
            if skipper.done:
                assert pos <= limit
                break
    except ProtocolError:
        pass
