"""Any bytes into the compact, THeader, JSON and detection code: a result or a ProtocolError."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import ProtocolError
from sidecar.protocol.appexc import parse_application_exception
from sidecar.protocol.auto import EVERYTHING, AutoDecoder
from sidecar.protocol.compact import parse_compact_header
from sidecar.protocol.compact_skip import CompactSkipper, compact_struct_end, compact_value_end
from sidecar.protocol.decoders import BufferedDecoder, FramedDecoder
from sidecar.protocol.detect import detect
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.fields import first_field_id, iter_compact_fields
from sidecar.protocol.theader_decoder import THeaderDecoder
from sidecar.protocol.tjson import parse_json_envelope
from tests.protocol.apache_codec import encode_apache, encode_message
from tests.protocol.apache_wire import PROTOCOLS, call_wire
from tests.protocol.thrift_strategies import chunks, split_points, structs

_MEANINGFUL = st.sampled_from(
    [0, 1, 2, 3, 5, 8, 9, 11, 12, 13, 15, 0x0F, 0x19, 0x21, 0x5B, 0x80, 0x82, 0xF9, 0xFF]
)
garbage = st.binary(max_size=200) | st.lists(st.integers(0, 255) | _MEANINGFUL, max_size=200).map(
    bytes
)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Real messages of every protocol and transport, then bytes changed, added or dropped."""
    if draw(st.booleans()):
        sv = draw(structs())
        wire = bytearray(encode_message("m", 1, 3, encode_apache(*sv, "compact"), "compact"))
    else:
        wire = bytearray(
            call_wire(
                draw(st.sampled_from(PROTOCOLS)), draw(st.sampled_from(["buffered", "framed"]))
            )
        )
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(wire)))
        op = draw(st.sampled_from(["set", "insert", "delete"]))
        if op == "insert" or at == len(wire):
            wire[at:at] = bytes([draw(st.integers(0, 255) | _MEANINGFUL)])
        elif op == "set":
            wire[at] = draw(st.integers(0, 255) | _MEANINGFUL)
        else:
            del wire[at]
    return bytes(wire)


# Every kind the protocol package raises.
KINDS = frozenset(
    {"garbage", "oversized", "truncated", "too_deep", "bad_version", "bad_type", "compact"}
    | {"http", "unsupported", "json"}
)


inputs = garbage | mangled()
DECODERS: list[Callable[[], FramedDecoder | BufferedDecoder | THeaderDecoder | AutoDecoder]] = [
    lambda: FramedDecoder(300, Protocol.COMPACT),
    lambda: BufferedDecoder(300, protocol=Protocol.COMPACT),
    lambda: BufferedDecoder(300, max_depth=3, protocol=Protocol.COMPACT),
    lambda: THeaderDecoder(300),
    lambda: AutoDecoder(),
    lambda: AutoDecoder(accept=EVERYTHING, max_size=300),
]


@settings(max_examples=600, deadline=None)
@given(inputs, st.data())
def test_decoders_raise_only_protocol_errors(data: bytes, draw: st.DataObject) -> None:
    cuts = draw.draw(split_points(len(data)), label="cuts")
    for make in DECODERS:
        decoder = make()
        error: ProtocolError | None = None
        for piece in [*chunks(data, cuts), b""]:
            try:
                for message in decoder.receive_data(piece):
                    assert message.size > 0
            except ProtocolError as exc:
                error = exc
                break
        if error is not None:
            with pytest.raises(ProtocolError) as again:
                decoder.receive_data(b"\x00")
            assert again.value is error


def _only_protocol_errors(call: Callable[[], object]) -> None:
    error: ProtocolError | None = None
    try:
        call()
    except ProtocolError as exc:
        error = exc
    assert error is None or error.kind in KINDS


@settings(max_examples=600, deadline=None)
@given(inputs, st.integers(0, 8))
def test_parsers_raise_only_protocol_errors(data: bytes, start: int) -> None:
    start = min(start, len(data))
    _only_protocol_errors(lambda: parse_compact_header(data, start))
    _only_protocol_errors(lambda: compact_struct_end(data, start))
    _only_protocol_errors(lambda: compact_struct_end(data, max_depth=2))
    _only_protocol_errors(lambda: compact_value_end(data, start, data[0] & 0x0F if data else 0))
    _only_protocol_errors(lambda: parse_application_exception(data, Protocol.COMPACT))
    _only_protocol_errors(lambda: list(iter_compact_fields(data)))
    _only_protocol_errors(lambda: parse_json_envelope(data, start))
    for protocol in Protocol:
        _only_protocol_errors(lambda p=protocol: first_field_id(data[start:], p))
    for n in (1, 2, 4, 6, 8, 10, 15, 19, len(data)):
        _only_protocol_errors(lambda n=n: detect(data[:n]))


@settings(max_examples=400, deadline=None)
@given(inputs, st.data(), st.integers(0, 300))
def test_compact_skipper_fed_in_pieces_raises_only_protocol_errors(
    data: bytes, draw: st.DataObject, limit: int
) -> None:
    cuts = draw.draw(split_points(len(data)), label="cuts")
    skipper = CompactSkipper()
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
