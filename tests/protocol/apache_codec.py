"""Random structs (thrift_strategies' schemas and values) written by Apache Thrift's protocols.

`encode_apache(schema, value, "binary" | "compact")` walks the schema and calls
the writer methods of Apache's pure-Python TBinaryProtocol / TCompactProtocol,
so the bytes are the library's own. `value_depth` is the nesting a value really
has (an empty container holds nothing deeper).
"""

from __future__ import annotations

import uuid
from typing import Any

from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.protocol.TCompactProtocol import TCompactProtocol
from thrift.Thrift import TType
from thrift.transport.TTransport import TMemoryBuffer

from tests.protocol.thrift_strategies import Schema, kind

_TTYPE = {
    "bool": TType.BOOL,
    "byte": TType.BYTE,
    "i16": TType.I16,
    "i32": TType.I32,
    "i64": TType.I64,
    "double": TType.DOUBLE,
    "string": TType.STRING,
    "binary": TType.STRING,
    "uuid": TType.UUID,
    "list": TType.LIST,
    "set": TType.SET,
    "map": TType.MAP,
    "struct": TType.STRUCT,
}


def ttype(schema: Schema) -> int:
    return _TTYPE[kind(schema)]


def encode_apache(
    schema: Schema, value: Any, protocol: str, erase_empty_map_types: bool = False
) -> bytes:
    """The struct ``value`` of ``schema`` as Apache's ``protocol`` writer encodes it.

    ``erase_empty_map_types``: write an empty map's key and value types as 0
    (what a binary map decoded from compact can say: compact does not carry them).
    """
    out = TMemoryBuffer()
    proto: Any = TCompactProtocol(out) if protocol == "compact" else TBinaryProtocol(out)
    _write(proto, schema, value, erase_empty_map_types)
    return out.getvalue()


def encode_message(name: str, mtype: int, seqid: int, body: bytes, protocol: str) -> bytes:
    """An envelope written by Apache's ``protocol`` writer, then ``body``."""
    out = TMemoryBuffer()
    proto: Any = TCompactProtocol(out) if protocol == "compact" else TBinaryProtocol(out)
    proto.writeMessageBegin(name, mtype, seqid)
    return out.getvalue() + body


def _write(proto: Any, schema: Schema, value: Any, erase: bool) -> None:
    k = kind(schema)
    if k == "bool":
        proto.writeBool(value)
    elif k == "byte":
        proto.writeByte(value)
    elif k == "i16":
        proto.writeI16(value)
    elif k == "i32":
        proto.writeI32(value)
    elif k == "i64":
        proto.writeI64(value)
    elif k == "double":
        proto.writeDouble(value)
    elif k == "string":
        proto.writeString(value)
    elif k == "binary":
        proto.writeBinary(value)
    elif k == "uuid":
        proto.writeUuid(uuid.UUID(bytes=value))
    elif k in ("list", "set"):
        begin, end = (
            (proto.writeListBegin, proto.writeListEnd)
            if k == "list"
            else (proto.writeSetBegin, proto.writeSetEnd)
        )
        begin(ttype(schema[1]), len(value))
        for element in value:
            _write(proto, schema[1], element, erase)
        end()
    elif k == "map":
        if erase and not value:
            proto.writeMapBegin(0, 0, 0)
        else:
            proto.writeMapBegin(ttype(schema[1]), ttype(schema[2]), len(value))
        for key, val in value:
            _write(proto, schema[1], key, erase)
            _write(proto, schema[2], val, erase)
        proto.writeMapEnd()
    else:
        proto.writeStructBegin("S")
        for (fid, fschema), fvalue in zip(schema[1], value, strict=True):
            if fvalue is None:
                continue
            proto.writeFieldBegin("f", ttype(fschema), fid)
            _write(proto, fschema, fvalue, erase)
            proto.writeFieldEnd()
        proto.writeFieldStop()
        proto.writeStructEnd()


def value_depth(schema: Schema, value: Any) -> int:
    """Levels of structs and containers the value really has (scalars are 0)."""
    if isinstance(schema, str):
        return 0
    k = schema[0]
    if k in ("list", "set"):
        return 1 + max((value_depth(schema[1], v) for v in value), default=0)
    if k == "map":
        inner = [max(value_depth(schema[1], a), value_depth(schema[2], b)) for a, b in value]
        return 1 + max(inner, default=0)
    return 1 + max(
        (value_depth(s, v) for (_, s), v in zip(schema[1], value, strict=True) if v is not None),
        default=0,
    )
