"""Random Thrift schemas, values and messages for the protocol tests.

A *schema* is a small tree:

    "bool" "byte" "i16" "i32" "i64" "double" "string" "binary" "uuid"
    ("list", elem)  ("set", elem)  ("map", key, value)
    ("struct", ((field_id, schema), ...))

A *value* of a struct schema is a tuple with one entry per field, ``None``
for a field left out (optional and unset); maps are lists of (key, value)
pairs so that any type can be a key.

Two encoders turn a (schema, value) pair into binary-protocol bytes:
`encode_thriftpy2` goes through thriftpy2's own writer
(``thriftpy2.protocol.binary.write_val`` on dynamically built ``TPayload``
classes) and `encode_by_hand` is written here from the spec. thriftpy2 has
no UUID type (its type id 16 means UTF8 and writes nothing), so schemas with
a UUID use the hand encoder; everywhere else the two must agree
(test_skip checks that).
"""

from __future__ import annotations

import io
import itertools
import struct
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st
from thriftpy2.protocol.binary import write_message_begin, write_val
from thriftpy2.thrift import TPayload, TType

Schema = Any
UUID = 16

SCALARS = ("bool", "byte", "i16", "i32", "i64", "double", "string", "binary", "uuid")

# Wire type id of each schema kind; "binary" is written as STRING (11) on the wire.
WIRE_TYPE = {
    "bool": TType.BOOL,
    "byte": TType.BYTE,
    "i16": TType.I16,
    "i32": TType.I32,
    "i64": TType.I64,
    "double": TType.DOUBLE,
    "string": TType.STRING,
    "binary": TType.STRING,
    "uuid": UUID,
    "list": TType.LIST,
    "set": TType.SET,
    "map": TType.MAP,
    "struct": TType.STRUCT,
}
# thriftpy2's own type ids (BINARY is 18 there, written as 11).
_TP_TYPE = {**WIRE_TYPE, "binary": TType.BINARY}


def kind(schema: Schema) -> str:
    return schema if isinstance(schema, str) else schema[0]


def contains(schema: Schema, name: str) -> bool:
    """Does ``schema`` use the scalar kind ``name`` anywhere?"""
    if isinstance(schema, str):
        return schema == name
    if schema[0] == "struct":
        return any(contains(s, name) for _, s in schema[1])
    return any(contains(s, name) for s in schema[1:])


def has_uuid(schema: Schema) -> bool:
    return contains(schema, "uuid")


def depth(schema: Schema) -> int:
    """Nesting depth counting structs and containers (a scalar is 0)."""
    if isinstance(schema, str):
        return 0
    if schema[0] == "struct":
        return 1 + max((depth(s) for _, s in schema[1]), default=0)
    return 1 + max(depth(s) for s in schema[1:])


# ----------------------------------------------------------------------------- strategies


def _struct_of(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    fields = st.lists(
        st.tuples(st.integers(-32768, 32767), children),
        max_size=4,
        unique_by=lambda f: f[0],
    )
    return fields.map(lambda fs: ("struct", tuple(fs)))


def _extend(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    return st.one_of(
        st.tuples(st.just("list"), children),
        st.tuples(st.just("set"), children),
        st.tuples(st.just("map"), children, children),
        _struct_of(children),
    )


def schemas(uuid: bool = True, exclude: tuple[str, ...] = ()) -> st.SearchStrategy[Schema]:
    """Any type: scalars, containers of anything, nested structs."""
    skip = (*exclude, *(() if uuid else ("uuid",)))
    scalars = tuple(s for s in SCALARS if s not in skip)
    return st.recursive(st.sampled_from(scalars), _extend, max_leaves=10)


def struct_schemas(uuid: bool = True) -> st.SearchStrategy[Schema]:
    return _struct_of(schemas(uuid))


_SCALAR_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "bool": st.booleans(),
    "byte": st.integers(-(2**7), 2**7 - 1),
    "i16": st.integers(-(2**15), 2**15 - 1),
    "i32": st.integers(-(2**31), 2**31 - 1),
    "i64": st.integers(-(2**63), 2**63 - 1),
    "double": st.floats(allow_nan=True, allow_infinity=True),
    "string": st.text(max_size=8),
    "binary": st.binary(max_size=8),
    "uuid": st.binary(min_size=16, max_size=16),
}


def values(schema: Schema) -> st.SearchStrategy[Any]:
    """Values that fit ``schema``; containers hold at most three elements."""
    if isinstance(schema, str):
        return _SCALAR_VALUES[schema]
    k = schema[0]
    if k in ("list", "set"):
        return st.lists(values(schema[1]), max_size=3)
    if k == "map":
        return st.lists(st.tuples(values(schema[1]), values(schema[2])), max_size=3)
    return st.tuples(*(st.none() | values(s) for _, s in schema[1]))


def structs(uuid: bool = True) -> st.SearchStrategy[tuple[Schema, Any]]:
    """(schema, value) of a random struct."""
    return struct_schemas(uuid).flatmap(lambda s: st.tuples(st.just(s), values(s)))


def struct_bodies(uuid: bool = True) -> st.SearchStrategy[bytes]:
    """Encoded random structs."""
    return structs(uuid).map(lambda sv: encode_struct(*sv))


# ----------------------------------------------------------------------------- encoders


def encode_struct(schema: Schema, value: Any) -> bytes:
    """thriftpy2's bytes where it can write the schema, else the hand encoder's."""
    if has_uuid(schema):
        return encode_by_hand(schema, value)
    return encode_thriftpy2(schema, value)


def encode_by_hand(schema: Schema, value: Any) -> bytes:
    out = bytearray()
    _write(out, schema, value)
    return bytes(out)


def _write(out: bytearray, schema: Schema, value: Any) -> None:
    k = kind(schema)
    if k == "bool":
        out += b"\x01" if value else b"\x00"
    elif k == "byte":
        out += struct.pack(">b", value)
    elif k == "i16":
        out += struct.pack(">h", value)
    elif k == "i32":
        out += struct.pack(">i", value)
    elif k == "i64":
        out += struct.pack(">q", value)
    elif k == "double":
        out += struct.pack(">d", value)
    elif k in ("string", "binary"):
        raw = value.encode("utf-8") if isinstance(value, str) else value
        out += struct.pack(">i", len(raw)) + raw
    elif k == "uuid":
        assert len(value) == 16
        out += value
    elif k in ("list", "set"):
        out += struct.pack(">bi", WIRE_TYPE[kind(schema[1])], len(value))
        for element in value:
            _write(out, schema[1], element)
    elif k == "map":
        ktype, vtype = WIRE_TYPE[kind(schema[1])], WIRE_TYPE[kind(schema[2])]
        out += struct.pack(">bbi", ktype, vtype, len(value))
        for key, val in value:
            _write(out, schema[1], key)
            _write(out, schema[2], val)
    else:
        for (fid, fschema), fvalue in zip(schema[1], value, strict=True):
            if fvalue is None:
                continue
            out += struct.pack(">bh", WIRE_TYPE[kind(fschema)], fid)
            _write(out, fschema, fvalue)
        out += b"\x00"


class _Pairs:
    """A "dict" for thriftpy2's map writer that allows unhashable and repeated keys.

    thriftpy2 writes a map as ``for k in iter(val): write(k); write(val[k])``,
    so ``val[k]`` is answered from the pair the iterator is on.
    """

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self._pairs = pairs
        self._at = -1

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Iterator[Any]:
        for i, (key, _) in enumerate(self._pairs):
            self._at = i
            yield key

    def __getitem__(self, key: Any) -> Any:
        return self._pairs[self._at][1]


def _tp_spec(schema: Schema) -> Any:
    """thriftpy2's container spec of a schema: a type id, or (type id, spec)."""
    k = kind(schema)
    if isinstance(schema, str):
        return _TP_TYPE[k]
    if k in ("list", "set"):
        return (_TP_TYPE[k], _tp_spec(schema[1]))
    if k == "map":
        return (_TP_TYPE[k], (_tp_spec(schema[1]), _tp_spec(schema[2])))
    return (_TP_TYPE[k], _payload_class(schema))


def _payload_class(schema: Schema) -> type[TPayload]:
    spec: dict[int, tuple[Any, ...]] = {}
    for i, (fid, fschema) in enumerate(schema[1]):
        sub = _tp_spec(fschema)
        if isinstance(sub, int):
            spec[fid] = (sub, f"f{i}", False)
        else:
            spec[fid] = (sub[0], f"f{i}", sub[1], False)
    cls: type[TPayload] = type("RandomStruct", (TPayload,), {"thrift_spec": spec})
    return cls


def _to_thriftpy2(schema: Schema, value: Any) -> Any:
    k = kind(schema)
    if isinstance(schema, str):
        assert k != "uuid", "thriftpy2 cannot write a UUID"
        return value
    if k in ("list", "set"):
        return [_to_thriftpy2(schema[1], v) for v in value]
    if k == "map":
        return _Pairs(
            [(_to_thriftpy2(schema[1], a), _to_thriftpy2(schema[2], b)) for a, b in value]
        )
    obj = _payload_class(schema)()
    for i, ((_, fschema), fvalue) in enumerate(zip(schema[1], value, strict=True)):
        if fvalue is not None:
            setattr(obj, f"f{i}", _to_thriftpy2(fschema, fvalue))
    return obj


def encode_thriftpy2(schema: Schema, value: Any) -> bytes:
    """The struct as thriftpy2's pure-Python binary writer encodes it."""
    out = io.BytesIO()
    write_val(out, TType.STRUCT, _to_thriftpy2(schema, value))
    return out.getvalue()


def encode_envelope_thriftpy2(name: str, mtype: int, seqid: int, strict: bool) -> bytes:
    out = io.BytesIO()
    write_message_begin(out, name, mtype, seqid, strict=strict)
    return out.getvalue()


# ----------------------------------------------------------------------------- splitting


def split_points(length: int) -> st.SearchStrategy[list[int]]:
    """Sorted cut points strictly inside ``[0, length]``."""
    if length <= 1:
        return st.just([])
    return st.lists(st.integers(1, length - 1), max_size=8, unique=True).map(sorted)


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def one_by_one(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]
