"""A buffered walk in slices: at most ``walk_steps`` steps per call, then `resume`.

A message that costs a step per byte (a long list of empty structs) would
otherwise hold the caller for as long as its bytes take to walk; the client
connection gives the loop back between slices (tests/integration/test_walk_budget.py).
"""

from __future__ import annotations

import struct

import pytest

from sidecar.protocol.compact_skip import CompactSkipper
from sidecar.protocol.decoders import BufferedDecoder
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.skip import StructSkipper

MAX = 64 << 20
STRUCT, LIST, STOP = 12, 15, 0


def empty_structs_call(count: int, seqid: int = 1, name: bytes = b"ping") -> bytes:
    """A strict binary CALL whose argument 1 is a list of ``count`` empty structs."""
    header = struct.pack(">iI", -2147418111, len(name)) + name + struct.pack(">i", seqid)
    field = struct.pack(">bh", LIST, 1) + struct.pack(">bi", STRUCT, count) + bytes(count)
    return header + field + bytes([STOP])


def compact_empty_structs(count: int) -> bytes:
    """A compact struct whose field 1 is a list of ``count`` empty structs."""
    varint = bytearray()
    n = count
    while n >= 0x80:
        varint.append((n & 0x7F) | 0x80)
        n >>= 7
    varint.append(n)
    return bytes([(1 << 4) | 9, 0xF0 | 12]) + bytes(varint) + bytes(count) + bytes([STOP])


def walk_in_slices(decoder: BufferedDecoder, data: bytes, limit: int) -> tuple[list[bytes], int]:
    """Feed ``data`` (if any), then resume until nothing is pending; the messages, the resumes."""
    out = [bytes(m.buf) for m in decoder.receive_data(data)] if data else []
    resumes = 0
    while decoder.walk_pending:
        resumes += 1
        assert resumes <= limit, "the walk never ends"
        out += [bytes(m.buf) for m in decoder.resume()]
    return out, resumes


def test_a_walk_stops_after_its_steps_and_resumes_where_it_stopped() -> None:
    call = empty_structs_call(100_000)
    decoder = BufferedDecoder(MAX, walk_steps=1_000)
    assert decoder.receive_data(call) == []
    assert decoder.walk_pending
    messages, resumes = walk_in_slices(decoder, b"", 1_000)
    assert messages == [call]
    # About two steps an element (the element, then its STOP); each slice is 1,000.
    assert 150 <= resumes <= 250
    assert not decoder.walk_pending


def test_without_a_budget_one_call_walks_it_all() -> None:
    call = empty_structs_call(100_000)
    decoder = BufferedDecoder(MAX)
    assert [bytes(m.buf) for m in decoder.receive_data(call)] == [call]
    assert not decoder.walk_pending


def test_bytes_that_arrive_during_a_walk_wait_their_turn_in_order() -> None:
    big, small = empty_structs_call(20_000, seqid=1), empty_structs_call(0, seqid=2)
    decoder = BufferedDecoder(MAX, walk_steps=500)
    assert decoder.receive_data(big[:-10]) == []
    assert decoder.walk_pending
    assert decoder.receive_data(big[-10:] + small) == []  # kept, not walked out of turn
    messages, _ = walk_in_slices(decoder, b"", 1_000)
    assert messages == [big, small]


def test_a_budget_that_runs_out_with_the_bytes_is_not_pending() -> None:
    """Waiting for bytes is not a walk to resume."""
    call = empty_structs_call(1_000)
    decoder = BufferedDecoder(MAX, walk_steps=1_000_000)
    assert decoder.receive_data(call[:500]) == []
    assert not decoder.walk_pending
    assert [bytes(m.buf) for m in decoder.receive_data(call[500:])] == [call]


def test_compact_buffered_walks_in_slices_too() -> None:
    body = compact_empty_structs(50_000)
    name = b"ping"
    # Compact envelope: protocol id, version|type (CALL = 1), seqid varint, name.
    call = bytes([0x82, 0x21, 0x01, len(name)]) + name + body
    decoder = BufferedDecoder(MAX, walk_steps=1_000, protocol=Protocol.COMPACT)
    messages, resumes = walk_in_slices(decoder, call, 1_000)
    assert messages == [call]
    assert resumes >= 50


@pytest.mark.parametrize("skipper_type", [StructSkipper, CompactSkipper])
def test_a_skipper_out_of_steps_reports_it(skipper_type: type) -> None:
    body = (
        compact_empty_structs(10)
        if skipper_type is CompactSkipper
        else struct.pack(">bh", LIST, 1) + struct.pack(">bi", STRUCT, 10) + bytes(10) + b"\x00"
    )
    skipper = skipper_type()
    pos = skipper.advance(body, 0, len(body), len(body), 3)
    assert skipper.out_of_steps
    assert not skipper.done
    end = skipper.advance(body, pos, len(body), len(body))
    assert skipper.done
    assert not skipper.out_of_steps
    assert end == len(body)
