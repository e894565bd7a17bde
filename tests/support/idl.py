"""Where the IDL files are, and the thriftpy2 module of the interop IDL.

thriftpy2 builds a module from the IDL at run time. Every server and client in
`tests.support` shares one module object, so that exception classes compare
by identity (``except module.NotFound``) whoever loaded them.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType
from typing import Any

import thriftpy2
from thriftpy2.thrift import TType

REPO_ROOT = Path(__file__).resolve().parents[2]
IDL_DIR = REPO_ROOT / "idl"
INTEROP_IDL = IDL_DIR / "interop.thrift"


@functools.cache
def load_thriftpy2_interop() -> ModuleType:
    """The thriftpy2 module of ``idl/interop.thrift`` (loaded once per process)."""
    return thriftpy2.load(str(INTEROP_IDL), module_name="interop_thrift")


def canonical(value: Any, type_name: str = "AllTypes") -> Any:
    """A hashable form of a value of the interop IDL, the same for both libraries.

    Needed because the libraries disagree on Python types: thriftpy2 decodes a
    ``set<...>`` as a *list* (in arbitrary order), Apache as a ``set``. Here a
    struct becomes ``(name, ((field, value), ...))``, a set a frozenset, a map
    a frozenset of pairs and a list a tuple, following the IDL's types.

    Args:
        value: an instance of struct ``type_name`` from either library.
        type_name: the IDL struct it is an instance of.
    """
    return _canonical(value, TType.STRUCT, getattr(load_thriftpy2_interop(), type_name))


def _split(spec: Any) -> tuple[int, Any]:
    """``(ttype, sub-spec)`` from a container element spec (an int or a pair)."""
    if isinstance(spec, tuple):
        return spec[0], spec[1]
    return spec, None


def _canonical(value: Any, ttype: int, sub: Any) -> Any:
    if value is None:
        return None
    if ttype == TType.STRUCT:
        fields = []
        for _, field in sorted(sub.thrift_spec.items()):
            name = field[1]
            fsub = field[2] if len(field) == 4 else None
            fields.append((name, _canonical(getattr(value, name, None), field[0], fsub)))
        return (sub.__name__, tuple(fields))
    if ttype == TType.LIST:
        etype, esub = _split(sub)
        return tuple(_canonical(v, etype, esub) for v in value)
    if ttype == TType.SET:
        etype, esub = _split(sub)
        return frozenset(_canonical(v, etype, esub) for v in value)
    if ttype == TType.MAP:
        (ktype, ksub), (vtype, vsub) = _split(sub[0]), _split(sub[1])
        return frozenset(
            (_canonical(k, ktype, ksub), _canonical(v, vtype, vsub)) for k, v in value.items()
        )
    if ttype in (TType.I08, TType.I16, TType.I32, TType.I64):
        return int(value)
    return value


def sample_all_types(ns: Any) -> Any:
    """An ``AllTypes`` with every field set to a value that is easy to get wrong.

    Args:
        ns: where the generated classes live: the thriftpy2 module
            (`load_thriftpy2_interop()`) or the Apache ``ttypes`` module
            (`tests.support.apache_gen.load_apache_interop().ttypes`). Both
            take keyword arguments, and enums are plain ints in both.

    Returns:
        A new ``ns.AllTypes``; equal (``==``) to what ``echoAll`` returns for it.
    """
    status = ns.Status
    leaf = ns.Leaf(label="leaf-ü", weight=-7)
    items = [
        ns.Item(
            id=i,
            name=f"item-{i}",
            price=i * 1.5,
            tags={"a", "b"} if i else set(),
            attributes={"k": "v", "": ""},
            status=status.BACKORDERED,
            description=None if i else "zero",
        )
        for i in range(3)
    ]
    return ns.AllTypes(
        aBool=True,
        aByte=-128,
        anI16=32767,
        anI32=-(2**31),
        anI64=2**63 - 1,
        aDouble=-2.5e-308,
        aString="héllo wörld ✓ 日本語 🎉",
        aBinary=bytes(range(256)),
        aList=[0, -1, 2**31 - 1],
        aSet={"x", "y", "ünïcode"},
        aMap={"min": -(2**63), "max": 2**63 - 1},
        itemsByGroup={"all": items, "none": []},
        inner=ns.Inner(name="inner", leaf=leaf, leaves=[leaf, ns.Leaf(label="", weight=0)]),
        status=status.ARCHIVED,
        aUnion=ns.Value(listValue=["one", "two"]),
        anOptional="present",
        withDefault=-1,
        stringWithDefault="",
        deep=[{1: {1, 2}, -5: set()}, {}],
        binariesByStatus={status.AVAILABLE: [b"\x00\xff", b""], status.ARCHIVED: [b"\x80\x01"]},
        optionalInners=[ns.Inner(name="only", leaf=leaf, leaves=[])],
        smallNumbers={-(2**15), 0, 2**15 - 1},
        flags=[True, False, True],
        byteToDouble={127: float("inf"), -1: 0.1},
        matrix=[["a"], [], ["b", "c"]],
    )
