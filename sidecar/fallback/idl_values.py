"""Config values typed by the IDL: a YAML value checked against a Thrift type, and encoded.

`convert` turns plain YAML (structs as mappings by field name, enums by name
or number, binary as UTF-8 text, lists and sets as sequences, maps as
mappings) into the Python value thriftpy2 encodes for a declared type,
checking it field by field; a value that does not fit is a ConfigError
naming its key path. `encode` writes a struct in the binary protocol. Both
run once, at start-up (static.py).
"""

from __future__ import annotations

import math
from typing import Any, Final

from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TType
from thriftpy2.utils import serialize

from sidecar.errors import ConfigError

_INT_RANGES: Final = {
    TType.BYTE: (-(2**7), 2**7 - 1, "byte"),
    TType.I16: (-(2**15), 2**15 - 1, "i16"),
    TType.I32: (-(2**31), 2**31 - 1, "i32"),
    TType.I64: (-(2**63), 2**63 - 1, "i64"),
}


def encode(result: Any) -> bytes:
    """The binary-protocol bytes of a result struct."""
    factory = TBinaryProtocolFactory()  # type: ignore[no-untyped-call]
    return bytes(serialize(result, factory))


def _type_name(ttype: int, args: Any) -> str:
    names = {
        TType.BOOL: "bool",
        TType.DOUBLE: "double",
        TType.STRING: "string",
        TType.BINARY: "binary",
        TType.LIST: "list",
        TType.SET: "set",
        TType.MAP: "map",
    }
    if ttype in _INT_RANGES:
        return "enum " + args.__name__ if args is not None else _INT_RANGES[ttype][2]
    if ttype == TType.STRUCT:
        return f"struct {args.__name__}"
    return names.get(ttype, f"type {ttype}")


def _split(spec: Any) -> tuple[int, Any]:
    """A container's element spec: ``TType`` or ``(TType, args)``."""
    if isinstance(spec, tuple):
        return spec[0], spec[1]
    return spec, None


def convert(ttype: int, args: Any, value: Any, key: str, unions: set[Any]) -> Any:
    """A YAML value as the Python value thriftpy2 encodes for (ttype, args); checked."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key}: expected {expected}, got {value!r}")

    if ttype == TType.BOOL:
        if not isinstance(value, bool):
            raise bad("bool (true or false)")
        return value
    if ttype in _INT_RANGES:
        low, high, name = _INT_RANGES[ttype]
        if args is not None:  # an enum
            members = args._NAMES_TO_VALUES
            if isinstance(value, str) and value in members:
                return members[value]
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value in args._VALUES_TO_NAMES
            ):
                return value
            raise bad(f"one of {', '.join(members)} (enum {args.__name__})")
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad(f"an integer that fits {name}")
        return value
    if ttype == TType.DOUBLE:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad("a number (double)")
        if not math.isfinite(float(value)):
            raise bad("a finite number")
        return float(value)
    if ttype == TType.STRING:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if ttype == TType.BINARY:
        if not isinstance(value, str):
            raise bad("a string (binary values are written as UTF-8 text)")
        return value.encode("utf-8")
    if ttype in (TType.LIST, TType.SET):
        etype, eargs = _split(args)
        if not isinstance(value, list):
            raise bad(f"a sequence ({_type_name(ttype, args)})")
        items = [convert(etype, eargs, v, f"{key}[{i}]", unions) for i, v in enumerate(value)]
        if ttype == TType.SET:
            try:
                return set(items)
            except TypeError:
                raise bad("a set of hashable values") from None
        return items
    if ttype == TType.MAP:
        (ktype, kargs), (vtype, vargs) = _split(args[0]), _split(args[1])
        if not isinstance(value, dict):
            raise bad("a mapping (map)")
        return {
            convert(ktype, kargs, k, f"{key}[{k!r}]", unions): convert(
                vtype, vargs, v, f"{key}[{k!r}]", unions
            )
            for k, v in value.items()
        }
    if ttype == TType.STRUCT:
        if not isinstance(value, dict):
            raise bad(f"a mapping of the fields of {args.__name__}")
        fields = {spec[1]: spec for spec in args.thrift_spec.values()}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}: {args.__name__} has no such field "
                f"(fields: {', '.join(fields)})"
            )
        kwargs: dict[str, Any] = {}
        for fname, spec in fields.items():
            required = spec[-1] is True
            if value.get(fname) is None:  # absent, or YAML null: the field is not set
                if required:
                    raise ConfigError(
                        f"{key}.{fname}: required field of {args.__name__} is missing"
                    )
                continue
            fargs = spec[2] if len(spec) == 4 else None
            kwargs[fname] = convert(spec[0], fargs, value[fname], f"{key}.{fname}", unions)
        if args in unions and len(kwargs) != 1:
            raise ConfigError(f"{key}: union {args.__name__} needs exactly one field set")
        return args(**kwargs)
    raise bad(_type_name(ttype, args))
