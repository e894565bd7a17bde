"""The struct skipper against thriftpy2's encoder, whole and fed in pieces, and its limits."""

from __future__ import annotations

import io
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.skip import (
    DEFAULT_MAX_DEPTH,
    FIXED_SIZE,
    StructSkipper,
    TType,
    struct_end,
    value_end,
)
from tests.protocol.thrift_strategies import (
    Schema,
    chunks,
    depth,
    encode_by_hand,
    encode_struct,
    encode_thriftpy2,
    has_uuid,
    split_points,
    structs,
)

NO_LIMIT = 1 << 40


def field(ftype: int, fid: int, value: bytes) -> bytes:
    return struct.pack(">bh", ftype, fid) + value


def string(raw: bytes) -> bytes:
    return struct.pack(">i", len(raw)) + raw


def seq(etype: int, count: int, *elements: bytes) -> bytes:
    return struct.pack(">bi", etype, count) + b"".join(elements)


def mapping(ktype: int, vtype: int, count: int, *items: bytes) -> bytes:
    return struct.pack(">bbi", ktype, vtype, count) + b"".join(items)


def nested_structs(levels: int) -> bytes:
    """``levels`` structs, each the only field of the one around it."""
    return field(TType.STRUCT, 1, b"") * (levels - 1) + b"\x00" * levels


def feed(data: bytes, cuts: list[int], limit: int = NO_LIMIT) -> tuple[bool, int]:
    """Walk a struct fed in chunks into a growing buffer; (done, position)."""
    skipper = StructSkipper()
    buf = bytearray()
    pos = 0
    for chunk in chunks(data, cuts):
        buf += chunk
        pos = skipper.advance(buf, pos, len(buf), limit)
        assert pos <= len(buf)
        if skipper.done:
            break
    return skipper.done, pos


def kind_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(RemoteProtocolError) as info:
        call(*args, **kwargs)
    return info.value.kind


UUID_VALUE = bytes(range(16))
EDGE_STRUCTS = {
    "empty": b"\x00",
    "bool": field(TType.BOOL, 1, b"\x01") + b"\x00",
    "byte": field(TType.BYTE, -1, b"\xff") + b"\x00",
    "double": field(TType.DOUBLE, 2, b"\x7f\xf8" + b"\x00" * 6) + b"\x00",
    "i16": field(TType.I16, 32767, b"\x00\x01") + b"\x00",
    "i32": field(TType.I32, -32768, b"\x00\x00\x00\x01") + b"\x00",
    "i64": field(TType.I64, 3, b"\x01" * 8) + b"\x00",
    "uuid": field(TType.UUID, 4, UUID_VALUE) + b"\x00",
    "empty string": field(TType.STRING, 5, string(b"")) + b"\x00",
    "string": field(TType.STRING, 5, string(b"\x00hello\x00")) + b"\x00",
    "struct in struct": field(TType.STRUCT, 6, field(TType.I32, 1, b"\0\0\0\7") + b"\0") + b"\0",
    "empty list": field(TType.LIST, 7, seq(TType.STRING, 0)) + b"\x00",
    "list<i32>": field(TType.LIST, 7, seq(TType.I32, 2, b"\0\0\0\1", b"\0\0\0\2")) + b"\x00",
    "set<uuid>": field(TType.SET, 8, seq(TType.UUID, 2, UUID_VALUE, UUID_VALUE)) + b"\x00",
    "list<string>": field(TType.LIST, 9, seq(TType.STRING, 2, string(b"a"), string(b""))) + b"\0",
    "list<struct>": field(TType.LIST, 9, seq(TType.STRUCT, 3, b"\0", b"\0", b"\0")) + b"\0",
    "list<list<byte>>": field(
        TType.LIST, 10, seq(TType.LIST, 2, seq(TType.BYTE, 1, b"\x05"), seq(TType.BYTE, 0))
    )
    + b"\x00",
    "map<i32,i64>": field(TType.MAP, 11, mapping(TType.I32, TType.I64, 1, b"\0\0\0\1", b"\0" * 8))
    + b"\x00",
    "map<string,uuid>": field(
        TType.MAP, 12, mapping(TType.STRING, TType.UUID, 1, string(b"k"), UUID_VALUE)
    )
    + b"\x00",
    "map<i16,list<string>>": field(
        TType.MAP,
        13,
        mapping(TType.I16, TType.LIST, 2, b"\0\1", seq(TType.STRING, 0), b"\0\2", seq(11, 0)),
    )
    + b"\x00",
    "empty map": field(TType.MAP, 14, mapping(TType.STRUCT, TType.STRUCT, 0)) + b"\x00",
    "several fields": field(TType.BOOL, 1, b"\x00")
    + field(TType.STRING, 2, string(b"xyz"))
    + field(TType.STRUCT, 3, b"\x00")
    + b"\x00",
}


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("name", EDGE_STRUCTS)
def test_edge_structs(name: str) -> None:
    data = EDGE_STRUCTS[name]
    trailing = b"\x0b\xff\xff\xff\xff garbage after the struct"
    assert struct_end(data) == len(data)
    assert struct_end(data + trailing) == len(data)
    assert struct_end(b"\xee" * 3 + data + trailing, 3) == 3 + len(data)
    assert struct_end(memoryview(bytearray(data + trailing))) == len(data)
    assert feed(data + trailing, list(range(1, len(data) + len(trailing)))) == (True, len(data))
    assert value_end(data + trailing, 0, TType.STRUCT) == len(data)


@pytest.mark.parametrize("name", EDGE_STRUCTS)
def test_every_proper_prefix_is_truncated(name: str) -> None:
    data = EDGE_STRUCTS[name]
    for n in range(len(data)):
        assert kind_of(struct_end, data[:n]) == "truncated"
        done, pos = feed(data[:n], [])
        assert not done
        assert pos <= n


@pytest.mark.parametrize(
    ("vtype", "value"),
    [
        *[(t, b"\x01" * n) for t, n in FIXED_SIZE.items()],
        (TType.STRING, string(b"abc")),
        (TType.STRUCT, b"\x00"),
        (TType.LIST, seq(TType.STRUCT, 1, b"\x00")),
        (TType.SET, seq(TType.I16, 1, b"\x00\x01")),
        (TType.MAP, mapping(TType.STRING, TType.BOOL, 1, string(b"k"), b"\x01")),
    ],
)
def test_value_end(vtype: int, value: bytes) -> None:
    assert value_end(b"\xaa" + value + b"\xbb\xcc", 1, vtype) == 1 + len(value)
    assert value_end(value, 0, vtype) == len(value)  # ending exactly at the end of the data
    assert kind_of(value_end, value[:-1], 0, vtype) == "truncated"


def test_skipper_is_reusable_after_reset() -> None:
    skipper = StructSkipper()
    one, two = EDGE_STRUCTS["list<struct>"], EDGE_STRUCTS["map<string,uuid>"]
    data = one + two
    assert skipper.advance(data, 0, len(data), NO_LIMIT) == len(one)
    assert skipper.done
    skipper.reset()
    assert not skipper.done
    assert skipper.advance(data, len(one), len(data), NO_LIMIT) == len(data)
    assert skipper.done


def test_resumes_inside_every_kind_of_value() -> None:
    # One field of each kind, fed one byte at a time: every resume point is exercised.
    data = b"".join(v[:-1] for v in EDGE_STRUCTS.values()) + b"\x00"
    assert struct_end(data) == len(data)
    assert feed(data, list(range(1, len(data)))) == (True, len(data))


# Depth: the outermost struct counts as 1, as in Apache Thrift's and thriftpy2's readers.


@pytest.mark.parametrize("max_depth", [1, 2, 3, DEFAULT_MAX_DEPTH])
def test_nesting_up_to_max_depth_is_fine(max_depth: int) -> None:
    data = nested_structs(max_depth)
    assert struct_end(data, max_depth=max_depth) == len(data)


@pytest.mark.parametrize("max_depth", [1, 2, 3, DEFAULT_MAX_DEPTH])
def test_nesting_past_max_depth_is_too_deep(max_depth: int) -> None:
    assert kind_of(struct_end, nested_structs(max_depth + 1), max_depth=max_depth) == "too_deep"


def test_depth_limit_matches_thriftpy2() -> None:
    from thriftpy2.protocol.binary import DEFAULT_MAX_DEPTH as THRIFTPY2_DEPTH
    from thriftpy2.protocol.binary import skip

    assert DEFAULT_MAX_DEPTH == THRIFTPY2_DEPTH
    ok, too_deep = nested_structs(DEFAULT_MAX_DEPTH), nested_structs(DEFAULT_MAX_DEPTH + 1)
    skip(io.BytesIO(ok), TType.STRUCT)
    with pytest.raises(RecursionError):
        skip(io.BytesIO(too_deep), TType.STRUCT)
    assert struct_end(ok) == len(ok)
    assert kind_of(struct_end, too_deep) == "too_deep"


def test_containers_count_towards_depth() -> None:
    # struct { 1: list<list<...<struct>...>> }: the lists are levels too.
    lists = 5
    inner = seq(TType.STRUCT, 1, b"\x00")
    for _ in range(lists - 1):
        inner = seq(TType.LIST, 1, inner)
    data = field(TType.LIST, 1, inner) + b"\x00"
    levels = 1 + lists + 1
    assert struct_end(data, max_depth=levels) == len(data)
    assert kind_of(struct_end, data, max_depth=levels - 1) == "too_deep"
    nested_maps = field(
        TType.MAP, 1, mapping(TType.I32, TType.MAP, 1, b"\0\0\0\1", mapping(8, 12, 1, b"\0" * 4))
    )
    data = nested_maps + b"\x00" * 2
    assert struct_end(data, max_depth=4) == len(data)
    assert kind_of(struct_end, data, max_depth=3) == "too_deep"


@pytest.mark.parametrize(
    "hostile",
    [
        field(TType.STRUCT, 1, b"") * 1_000_000,
        field(TType.LIST, 1, b"") + seq(TType.LIST, 1) * 1_000_000,
        field(TType.MAP, 1, b"") + mapping(TType.MAP, TType.MAP, 1) * 1_000_000,
        field(TType.SET, 1, b"")
        + seq(TType.STRUCT, 1)
        + (field(TType.SET, 1, b"") + seq(12, 1)) * 500_000,
    ],
    ids=["structs", "lists", "maps", "sets-and-structs"],
)
def test_million_deep_input_is_refused_fast(hostile: bytes) -> None:
    started = time.perf_counter()
    assert kind_of(struct_end, hostile) == "too_deep"
    assert kind_of(feed, hostile[:1000], list(range(1, 1000))) == "too_deep"
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    "data",
    [
        field(TType.STRING, 1, struct.pack(">i", -1)),
        field(TType.STRING, 1, struct.pack(">i", -(2**31))),
        field(TType.LIST, 1, seq(TType.I32, -1)),
        field(TType.LIST, 1, seq(TType.STRING, -1)),
        field(TType.SET, 1, seq(TType.STRUCT, -(2**31))),
        field(TType.MAP, 1, mapping(TType.I32, TType.I32, -1)),
        field(TType.MAP, 1, mapping(TType.STRING, TType.LIST, -7)),
        field(TType.LIST, 1, seq(TType.LIST, 1, seq(TType.I64, -2))),
        field(TType.LIST, 1, seq(TType.STRING, 1, struct.pack(">i", -3))),
    ],
)
def test_negative_sizes(data: bytes) -> None:
    for end in (len(data), len(data) + 10):
        with pytest.raises(RemoteProtocolError) as info:
            struct_end(data.ljust(end, b"\x00"))
        assert info.value.kind == "garbage"
    with pytest.raises(RemoteProtocolError):
        feed(data, list(range(1, len(data))))


@pytest.mark.parametrize("ftype", [TType.VOID, 5, 7, 9, 16 + 1, 18, 0x7F, 0x80, 0xFF])
def test_unknown_field_type(ftype: int) -> None:
    data = bytes((ftype,)) + b"\x00\x01" + b"\x00" * 20
    with pytest.raises(RemoteProtocolError) as info:
        struct_end(data)
    assert info.value.kind == "garbage"


@pytest.mark.parametrize("etype", [TType.STOP, TType.VOID, 5, 7, 9, 17, -1, -128])
def test_unknown_element_type(etype: int) -> None:
    cases = [
        seq(etype, 1) + b"\x00" * 20,
        mapping(etype, TType.I32, 1) + b"\x00" * 20,
        mapping(TType.I32, etype, 1) + b"\x00" * 20,
    ]
    for ctype, body in zip((TType.LIST, TType.MAP, TType.MAP), cases, strict=True):
        with pytest.raises(RemoteProtocolError):
            struct_end(field(ctype, 1, body))
    with pytest.raises(RemoteProtocolError):
        struct_end(field(TType.SET, 1, seq(etype, 3)) + b"\x00" * 20)


LIMIT = 1000
HUGE = [
    ("string", field(TType.STRING, 1, struct.pack(">i", 2**31 - 1))),
    ("string just over", field(TType.STRING, 1, struct.pack(">i", LIMIT - 7 + 1))),
    ("list<i64>", field(TType.LIST, 1, seq(TType.I64, 2**31 - 1))),
    ("set<uuid>", field(TType.SET, 1, seq(TType.UUID, 2**27))),
    ("map<i32,double>", field(TType.MAP, 1, mapping(TType.I32, TType.DOUBLE, 2**28))),
    ("list<string>", field(TType.LIST, 1, seq(TType.STRING, 2**31 - 1))),
    ("list<struct>", field(TType.LIST, 1, seq(TType.STRUCT, 2**31 - 1))),
    ("set<list<i32>>", field(TType.SET, 1, seq(TType.LIST, 2**30))),
    ("map<string,struct>", field(TType.MAP, 1, mapping(TType.STRING, TType.STRUCT, 2**30))),
    ("map<struct,i32>", field(TType.MAP, 1, mapping(TType.STRUCT, TType.I32, 2**30))),
    ("nested string", field(TType.LIST, 1, seq(TType.STRING, 1, struct.pack(">i", 2**30)))),
]


@pytest.mark.parametrize("data", [d for _, d in HUGE], ids=[n for n, _ in HUGE])
def test_huge_declared_size_is_oversized_before_the_bytes_arrive(data: bytes) -> None:
    skipper = StructSkipper()
    with pytest.raises(RemoteProtocolError) as info:
        skipper.advance(data, 0, len(data), LIMIT)
    assert info.value.kind == "oversized"
    # Without a limit the same bytes are just unfinished.
    assert kind_of(struct_end, data) == "truncated"


@pytest.mark.parametrize("name", EDGE_STRUCTS)
def test_limit_is_inclusive(name: str) -> None:
    data = EDGE_STRUCTS[name]
    for start in (0, 5):
        buf = b"\xee" * start + data + b"\x00" * 40
        skipper = StructSkipper()
        assert skipper.advance(buf, start, len(buf), start + len(data)) == start + len(data)
        assert skipper.done
        skipper = StructSkipper()
        with pytest.raises(RemoteProtocolError) as info:
            skipper.advance(buf, start, len(buf), start + len(data) - 1)
        assert info.value.kind == "oversized"


# ----------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(structs(uuid=False))
def test_hand_encoder_agrees_with_thriftpy2(sv: tuple[Schema, Any]) -> None:
    schema, value = sv
    assert encode_by_hand(schema, value) == encode_thriftpy2(schema, value)


@settings(max_examples=400, deadline=None)
@given(structs(), st.binary(max_size=20), st.binary(max_size=3), st.data())
def test_struct_end_agrees_with_the_encoder(
    sv: tuple[Schema, Any], trailing: bytes, before: bytes, data: st.DataObject
) -> None:
    schema, value = sv
    encoded = encode_struct(schema, value)
    assert struct_end(encoded + trailing) == len(encoded)
    assert struct_end(before + encoded + trailing, len(before)) == len(before) + len(encoded)
    # Depth: the outer struct plus its deepest field.
    assert struct_end(encoded, max_depth=depth(schema)) == len(encoded)
    # Fed in random pieces into a growing buffer: the same end.
    whole = encoded + trailing
    cuts = data.draw(split_points(len(whole)), label="cuts")
    assert feed(whole, cuts) == (True, len(encoded))
    # A limit of exactly the struct's size is enough; one byte less is not.
    assert feed(whole, cuts, limit=len(encoded)) == (True, len(encoded))
    with pytest.raises(RemoteProtocolError) as info:
        feed(whole, cuts, limit=len(encoded) - 1)
    assert info.value.kind == "oversized"
    if not has_uuid(schema):
        assert encoded == encode_by_hand(schema, value)


@settings(max_examples=200, deadline=None)
@given(structs(), st.data())
def test_truncated_struct_never_ends(sv: tuple[Schema, Any], data: st.DataObject) -> None:
    encoded = encode_struct(*sv)
    n = data.draw(st.integers(0, len(encoded) - 1), label="n")
    assert kind_of(struct_end, encoded[:n]) == "truncated"
    cuts = data.draw(split_points(n), label="cuts")
    done, pos = feed(encoded[:n], cuts)
    assert not done
    assert pos <= n
