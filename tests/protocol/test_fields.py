"""`mistyped_field`: a struct's top-level field types against those an IDL declares."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import RemoteProtocolError
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.fields import TYPE_NAMES, mistyped_field
from sidecar.protocol.skip import TType
from sidecar.protocol.transcode import transcode_struct
from sidecar.protocol.transcode_read import BinaryReader

I64_ID = {1: TType.I64}


def binary_i64(fid: int, value: int) -> bytes:
    return struct.pack(">bhq", TType.I64, fid, value)


def binary_string(fid: int, value: bytes) -> bytes:
    return struct.pack(">bhi", TType.STRING, fid, len(value)) + value


def compact(binary_struct: bytes) -> bytes:
    """The same struct in the compact protocol (the sidecar's transcoder)."""
    out = bytearray()
    transcode_struct(BinaryReader(binary_struct, 0), out, Protocol.COMPACT, 64, 1 << 20)
    return bytes(out)


@pytest.mark.parametrize("protocol", [Protocol.BINARY, Protocol.COMPACT])
def test_a_field_of_another_type_than_declared_is_named(protocol: Protocol) -> None:
    right = binary_i64(1, 7) + b"\x00"
    wrong = binary_string(1, b"abc") + b"\x00"
    if protocol is Protocol.COMPACT:
        right, wrong = compact(right), compact(wrong)
    assert mistyped_field(right, protocol, I64_ID) is None
    assert mistyped_field(wrong, protocol, I64_ID) == (1, TType.STRING)


@pytest.mark.parametrize("protocol", [Protocol.BINARY, Protocol.COMPACT])
def test_fields_the_idl_does_not_declare_are_not_compared(protocol: Protocol) -> None:
    body = binary_string(9, b"extra") + binary_i64(1, 7) + b"\x00"
    if protocol is Protocol.COMPACT:
        body = compact(body)
    assert mistyped_field(body, protocol, I64_ID) is None
    assert mistyped_field(b"\x00", protocol, I64_ID) is None  # no arguments at all


def test_a_compact_bool_of_either_value_is_a_bool() -> None:
    declared = {1: TType.BOOL, 2: TType.BOOL}
    fields = struct.pack(">bhb", TType.BOOL, 1, 1) + struct.pack(">bhb", TType.BOOL, 2, 0)
    body = compact(fields + b"\x00")
    assert mistyped_field(body, Protocol.COMPACT, declared) is None
    assert mistyped_field(body, Protocol.COMPACT, {2: TType.I32}) == (2, TType.BOOL)


def test_a_struct_cut_short_is_an_error_not_an_answer() -> None:
    with pytest.raises(RemoteProtocolError):
        mistyped_field(binary_i64(1, 7)[:-2], Protocol.BINARY, I64_ID)


@given(st.lists(st.tuples(st.integers(1, 200), st.sampled_from(sorted(TYPE_NAMES))), max_size=6))
def test_declared_types_that_match_find_nothing(fields: list[tuple[int, int]]) -> None:
    """Any struct of scalars and strings: declared as sent, nothing is mistyped; each
    field declared otherwise is found, in both protocols."""
    scalars = {
        TType.BOOL: b"\x01",
        TType.BYTE: b"\x05",
        TType.DOUBLE: struct.pack(">d", 1.5),
        TType.I16: struct.pack(">h", -2),
        TType.I32: struct.pack(">i", 70000),
        TType.I64: struct.pack(">q", 1 << 40),
        TType.STRING: struct.pack(">i", 2) + b"hi",
        TType.UUID: bytes(range(16)),
        TType.STRUCT: b"\x00",
        TType.LIST: struct.pack(">bi", TType.I32, 1) + struct.pack(">i", 3),
        TType.SET: struct.pack(">bi", TType.STRING, 0),
        TType.MAP: struct.pack(">bbi", TType.I16, TType.BOOL, 1) + b"\x00\x01\x01",
    }
    seen: dict[int, int] = {}
    body = b""
    for fid, ttype in fields:
        if fid in seen:
            continue
        seen[fid] = ttype
        body += struct.pack(">bh", ttype, fid) + scalars[ttype]
    body += b"\x00"
    for protocol, wire in ((Protocol.BINARY, body), (Protocol.COMPACT, compact(body))):
        assert mistyped_field(wire, protocol, seen) is None
        for fid, ttype in seen.items():
            other = TType.I32 if ttype != TType.I32 else TType.STRING
            assert mistyped_field(wire, protocol, {**seen, fid: other})[0] == fid
