"""The nesting limit counts every struct and container, in both protocols (issue 13 #11).

Before the fix a list of fixed-size elements (and any empty container) was not
counted as a level when it was the innermost one: depth 65 passed with a limit
of 64.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.compact import encode_varint
from sidecar.protocol.compact_skip import CType, compact_struct_end
from sidecar.protocol.skip import DEFAULT_MAX_DEPTH, TType, struct_end
from tests.protocol.apache_codec import encode_apache, value_depth
from tests.protocol.thrift_strategies import Schema, structs


def binary_field(ftype: int, fid: int, value: bytes = b"") -> bytes:
    return struct.pack(">bh", ftype, fid) + value


# The innermost level of each case, as a field value of a struct, in binary.
BINARY_INNER = {
    "list<i32>": binary_field(TType.LIST, 1, struct.pack(">bi", TType.I32, 2) + b"\0" * 8),
    "empty list<struct>": binary_field(TType.LIST, 1, struct.pack(">bi", TType.STRUCT, 0)),
    "set<byte>": binary_field(TType.SET, 1, struct.pack(">bi", TType.BYTE, 1) + b"\7"),
    "map<i32,i64>": binary_field(TType.MAP, 1, struct.pack(">bbi", 8, 10, 1) + b"\0" * 12),
    "empty map<string,list>": binary_field(TType.MAP, 1, struct.pack(">bbi", 11, 15, 0)),
}
COMPACT_INNER = {
    "list<i32>": bytes(((1 << 4) | CType.LIST, (2 << 4) | CType.I32, 2, 4)),
    "empty list<struct>": bytes(((1 << 4) | CType.LIST, CType.STRUCT)),
    "set<byte>": bytes(((1 << 4) | CType.SET, (1 << 4) | CType.BYTE, 7)),
    "map<i32,i64>": bytes(((1 << 4) | CType.MAP, 1, (CType.I32 << 4) | CType.I64, 2, 2)),
    "empty map": bytes(((1 << 4) | CType.MAP, 0)),
    "long list<double>": bytes(((1 << 4) | CType.LIST, 0xF0 | CType.DOUBLE))
    + encode_varint(15)
    + b"\0" * 120,
}


def binary_nested(levels: int, inner: bytes) -> bytes:
    """``levels`` structs, the innermost holding ``inner`` (one more level)."""
    return binary_field(TType.STRUCT, 1) * (levels - 1) + inner + b"\x00" * levels


def compact_nested(levels: int, inner: bytes) -> bytes:
    return bytes(((1 << 4) | CType.STRUCT,)) * (levels - 1) + inner + b"\x00" * levels


@pytest.mark.parametrize("name", sorted(BINARY_INNER))
@pytest.mark.parametrize("max_depth", [2, 5, DEFAULT_MAX_DEPTH])
def test_binary_innermost_container_is_a_level(name: str, max_depth: int) -> None:
    fits = binary_nested(max_depth - 1, BINARY_INNER[name])
    assert struct_end(fits, max_depth=max_depth) == len(fits)
    with pytest.raises(RemoteProtocolError) as info:
        struct_end(binary_nested(max_depth, BINARY_INNER[name]), max_depth=max_depth)
    assert info.value.kind == "too_deep"


@pytest.mark.parametrize("name", sorted(COMPACT_INNER))
@pytest.mark.parametrize("max_depth", [2, 5, DEFAULT_MAX_DEPTH])
def test_compact_innermost_container_is_a_level(name: str, max_depth: int) -> None:
    fits = compact_nested(max_depth - 1, COMPACT_INNER[name])
    assert compact_struct_end(fits, max_depth=max_depth) == len(fits)
    with pytest.raises(RemoteProtocolError) as info:
        compact_struct_end(compact_nested(max_depth, COMPACT_INNER[name]), max_depth=max_depth)
    assert info.value.kind == "too_deep"


@settings(max_examples=300, deadline=None)
@given(structs())
def test_limit_is_exactly_the_value_depth(sv: tuple[Schema, Any]) -> None:
    """A value of depth d passes a limit of d and is too deep for d - 1, in both protocols."""
    schema, value = sv
    d = value_depth(schema, value)
    for protocol, end in (("binary", struct_end), ("compact", compact_struct_end)):
        data = encode_apache(schema, value, protocol)
        assert end(data, max_depth=d) == len(data)
        if d > 1:
            with pytest.raises(RemoteProtocolError) as info:
                end(data, max_depth=d - 1)
            assert info.value.kind == "too_deep"
