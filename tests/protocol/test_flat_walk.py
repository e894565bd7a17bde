"""`flat_struct_end`, the skipper's fast path: where it answers, `StructSkipper` agrees."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.skip import StructSkipper, TType, flat_struct_end
from tests.protocol.thrift_strategies import struct_bodies

NO_LIMIT = 1 << 40


def skipper_end(data: bytes, pos: int, end: int, steps: int) -> int | None:
    """Where `StructSkipper` ends the struct; None when it does not (an error, short, steps)."""
    skipper = StructSkipper()
    try:
        stop = skipper.advance(data, pos, end, NO_LIMIT, steps)
    except RemoteProtocolError:
        return None
    return stop if skipper.done else None


def flat_field(ftype: int, fid: int, value: bytes) -> bytes:
    return struct.pack(">bh", ftype, fid) + value


FLAT_VALUES = {
    TType.BOOL: st.binary(min_size=1, max_size=1),
    TType.BYTE: st.binary(min_size=1, max_size=1),
    TType.I16: st.binary(min_size=2, max_size=2),
    TType.I32: st.binary(min_size=4, max_size=4),
    TType.I64: st.binary(min_size=8, max_size=8),
    TType.DOUBLE: st.binary(min_size=8, max_size=8),
    TType.UUID: st.binary(min_size=16, max_size=16),
    TType.STRING: st.binary(max_size=40).map(lambda b: struct.pack(">i", len(b)) + b),
}
flat_fields = st.sampled_from(sorted(FLAT_VALUES)).flatmap(
    lambda t: FLAT_VALUES[t].map(lambda v: flat_field(t, 1, v))
)
flat_bodies = st.lists(flat_fields, max_size=8).map(lambda fs: b"".join(fs) + b"\x00")


@given(flat_bodies, st.binary(max_size=8), st.integers(0, 20))
def test_a_flat_struct_is_walked_as_the_skipper_walks_it(
    body: bytes, tail: bytes, steps: int
) -> None:
    data = b"head" + body + tail
    found = flat_struct_end(data, 4, len(data), steps)
    expected = skipper_end(data, 4, len(data), steps)
    if steps >= 20:
        assert found == 4 + len(body)
    assert found == -1 or found == expected


@given(st.one_of(struct_bodies(), flat_bodies), st.data())
def test_it_answers_only_where_the_skipper_agrees(body: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(body)))
    steps = data.draw(st.integers(0, 64))
    found = flat_struct_end(body, 0, cut, steps)
    assert found == -1 or found == skipper_end(body, 0, cut, steps)


@given(st.binary(max_size=48), st.integers(0, 64))
def test_garbage_is_declined_or_agreed(data: bytes, steps: int) -> None:
    found = flat_struct_end(data, 0, len(data), steps)
    assert found == -1 or found == skipper_end(data, 0, len(data), steps)


def test_what_it_declines() -> None:
    nested = flat_field(TType.STRUCT, 1, b"\x00") + b"\x00"
    negative = flat_field(TType.STRING, 1, struct.pack(">i", -1)) + b"\x00"
    short = flat_field(TType.STRING, 1, struct.pack(">i", 10) + b"abc")
    unknown = flat_field(99, 1, b"") + b"\x00"
    for body in (nested, negative, short, unknown, b""):
        assert flat_struct_end(body, 0, len(body), 100) == -1
    # Steps as the skipper counts them: a field, a string's bytes, the STOP.
    two = flat_field(TType.STRING, 1, struct.pack(">i", 1) + b"x") + b"\x00"
    assert flat_struct_end(two, 0, len(two), 2) == -1
    assert flat_struct_end(two, 0, len(two), 3) == len(two)
    assert skipper_end(two, 0, len(two), 2) is None
    assert skipper_end(two, 0, len(two), 3) == len(two)


@given(
    st.one_of(struct_bodies(), flat_bodies, st.binary(max_size=48)),
    st.binary(max_size=6),
    st.data(),
)
def test_bytes_bytearray_and_memoryview_are_walked_alike(
    body: bytes, head: bytes, data: st.DataObject
) -> None:
    """Bytes take a loop of their own (`_flat_struct_end_of_bytes`): it answers as the
    general one does, for any bytes, cut anywhere, with any step budget."""
    whole = head + body
    end = data.draw(st.integers(len(head), len(whole)))
    steps = data.draw(st.integers(0, 64))
    answers = {
        kind.__name__: flat_struct_end(kind(whole), len(head), end, steps)
        for kind in (bytes, bytearray, memoryview)
    }
    assert len(set(answers.values())) == 1, answers
