"""check_body: a framed call's arguments are one whole struct, or the call is malformed."""

from __future__ import annotations

import pytest

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import encode_compact_header
from sidecar.protocol.envelope import MessageType, encode_header
from sidecar.protocol.framing import FramedDecoder, Message, encode_frame
from sidecar.protocol.validate import check_body

# struct { 1: i64 id = 7 }, binary and compact
BINARY_ARGS = b"\x0a\x00\x01" + (7).to_bytes(8, "big") + b"\x00"
COMPACT_ARGS = b"\x16\x0e\x00"  # field 1, i64 (6), zigzag(7) = 14, stop


def framed(data: bytes) -> Message:
    [message] = FramedDecoder(1 << 20).receive_data(encode_frame(data))
    return message


def framed_compact(data: bytes) -> Message:
    from sidecar.protocol.envelope import Protocol

    [message] = FramedDecoder(1 << 20, Protocol.COMPACT).receive_data(encode_frame(data))
    return message


def test_whole_arguments_pass() -> None:
    check_body(framed(encode_header("getItem", MessageType.CALL, 1) + BINARY_ARGS))
    check_body(framed_compact(encode_compact_header("getItem", MessageType.CALL, 1) + COMPACT_ARGS))


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_arguments_cut_short_inside_a_correct_frame_are_truncated(cut: int) -> None:
    message = framed(encode_header("getItem", MessageType.CALL, 1) + BINARY_ARGS[:-cut])
    with pytest.raises(RemoteProtocolError) as raised:
        check_body(message)
    assert raised.value.kind == "truncated"


def test_bytes_after_the_arguments_are_garbage() -> None:
    message = framed(encode_header("getItem", MessageType.CALL, 1) + BINARY_ARGS + b"\x00\x00")
    with pytest.raises(RemoteProtocolError) as raised:
        check_body(message)
    assert raised.value.kind == "garbage"


def test_a_compact_call_cut_short() -> None:
    message = framed_compact(encode_compact_header("getItem", MessageType.CALL, 1) + b"\x16")
    with pytest.raises(RemoteProtocolError):
        check_body(message)
