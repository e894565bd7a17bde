"""Static fallback replies, written in the config and checked against the IDL.

``methods.<name>.fallback.static: <value>`` is the method's return value and
``methods.<name>.fallback.static_exception: {name: <Exception>, value: {...}}``
one of its declared exceptions, both in plain YAML: structs as mappings by
field name, enums by name (or number), binary as a string (UTF-8), lists and
sets as sequences, maps as mappings; a field left out or written ``null`` is
not set (an error for a ``required`` field); a ``void`` method takes ``{}``.
Each is checked field by field against the types the IDL declares and
encoded once, at start-up, with thriftpy2; a value that does not fit is a
config error naming the key path. Nothing on the hot path touches the IDL.

Declared exceptions named in the config (``methods.<name>.retry_on_exceptions``,
``breaker.failure_exceptions``) are resolved here too, once, to the field ids
of each method's result struct (`ExceptionIds`): a reply is then classified
by its first field id alone.

The health check's probe arguments (``health_check.arguments``) are typed the
same way, with the method's argument struct, and encoded once
(`health_arguments`); without an IDL only an empty argument list can be sent.
"""

from __future__ import annotations

import itertools
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import thriftpy2
from thriftpy2.protocol import TBinaryProtocolFactory
from thriftpy2.thrift import TType
from thriftpy2.utils import serialize

from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError


@dataclass(frozen=True, slots=True)
class StaticReply:
    """A result struct encoded at start-up, served with a fresh envelope."""

    body: bytes


@dataclass(frozen=True, slots=True)
class ExceptionIds:
    """Result-struct field ids of the declared exceptions the config names.

    Attributes:
        retry: ``methods.<key>.retry_on_exceptions`` by config key, then by the
            service (``""``: a bare wire name, any service that has the method).
        failures: ``breaker.failure_exceptions`` by wire method name (bare and
            ``Service:method``), for every method that declares one of them.
    """

    retry: dict[str, dict[str, frozenset[int]]]
    failures: dict[str, frozenset[int]]


_INT_RANGES: Final = {
    TType.BYTE: (-(2**7), 2**7 - 1, "byte"),
    TType.I16: (-(2**15), 2**15 - 1, "i16"),
    TType.I32: (-(2**31), 2**31 - 1, "i32"),
    TType.I64: (-(2**63), 2**63 - 1, "i64"),
}
_module_ids: Final = itertools.count()


# The arguments of a call without any: an empty struct (its STOP byte, in the
# binary and the compact protocol alike).
EMPTY_ARGUMENTS: Final = b"\x00"

# A namespace with annotations, as Apache's ThriftTest.thrift has:
# ``namespace xsd test (uri = 'http://thrift.apache.org/ns/ThriftTest')``.
# The Apache compiler accepts it; thriftpy2's grammar does not, and the sidecar
# needs no namespace: the annotation is dropped before parsing.
_ANNOTATED_NAMESPACE: Final = re.compile(r"^(\s*namespace\s+\S+\s+\S+)\s*\([^)]*\)", re.MULTILINE)


def load_idl(path: str) -> ModuleType:
    """Parse an IDL file with thriftpy2.

    Namespace annotations are dropped first (thriftpy2 cannot parse them);
    includes are still found beside the file.

    Raises:
        ConfigError: the file cannot be read or parsed; the message names the
            line and a way around it.
    """
    stem = "".join(c if c.isalnum() else "_" for c in Path(path).stem)
    module_name = f"sidecar_idl_{stem}_{next(_module_ids)}_thrift"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"idl: cannot read {path}: {exc}") from None
    cleaned = _ANNOTATED_NAMESPACE.sub(r"\1", text)
    try:
        if cleaned == text:
            return thriftpy2.load(path, module_name=module_name)
        with tempfile.TemporaryDirectory(prefix="sidecar-idl-") as tmp:
            copy = Path(tmp) / Path(path).name
            copy.write_text(cleaned, encoding="utf-8")
            return thriftpy2.load(
                str(copy), module_name=module_name, include_dirs=[str(Path(path).parent)]
            )
    except Exception as exc:  # thriftpy2 raises several unrelated types for bad input
        raise ConfigError(
            f"idl: cannot load {path}: {exc}. The sidecar reads the IDL with thriftpy2, whose "
            "grammar is narrower than the Apache compiler's (annotations in some places, for "
            "one): give idl: a copy without the construct at that line; the sidecar needs "
            "only the services, their methods and types"
        ) from None


def services(module: ModuleType) -> dict[str, Any]:
    """Service classes of a loaded IDL by name."""
    return {
        name: value for name, value in vars(module).items() if hasattr(value, "thrift_services")
    }


def load_idl_parts(config: SidecarConfig) -> dict[str, Any]:
    """Static replies, known method names and oneway methods from the config's IDL.

    Returns:
        Keyword arguments for `sidecar.app.Sidecar`: ``static_replies``,
        ``known_methods``, ``oneway_methods`` (bare and ``Service:method``),
        ``exception_ids`` (`ExceptionIds`) and ``health_arguments`` (the
        probe's argument struct, binary protocol).

    Raises:
        ConfigError: a static reply or probe arguments without an IDL, a method
            not in the IDL, or a value that does not fit the method's types.
    """
    wanted = {
        name: method.fallback
        for name, method in config.methods.items()
        if method.fallback.static is not None or method.fallback.static_exception is not None
    }
    if config.idl is None:
        if wanted:
            name = next(iter(wanted))
            raise ConfigError(
                f"methods.{name}.fallback: a static reply needs the service's IDL to encode it; "
                "set idl: (or --idl) to the .thrift file"
            )
        return {
            "static_replies": {},
            "known_methods": [],
            "oneway_methods": [],
            "exception_ids": exception_ids(config, {}, ""),  # refuses names without an IDL
            "health_arguments": health_arguments(config, {}, "", set()),
        }
    module = load_idl(config.idl)
    found = services(module)
    declared_ids = exception_ids(config, found, config.idl)
    known: list[str] = []
    oneway: list[str] = []
    for service_name, service in found.items():
        for method in service.thrift_services:
            names = (method, f"{service_name}:{method}")
            known.extend(names)
            if getattr(getattr(service, f"{method}_result", None), "oneway", False):
                oneway.extend(names)
    unions = set(getattr(module, "__thrift_meta__", {}).get("unions", []))
    static: dict[str, StaticReply] = {}
    for name, fallback in wanted.items():
        service, method = _find_method(found, name, config.idl)
        result_cls = getattr(service, f"{method}_result")
        key = f"methods.{name}.fallback"
        if fallback.static_exception is not None:
            body = _exception_result(result_cls, fallback.static_exception, key, unions)
            static[name] = StaticReply(body)
        else:
            body = _value_result(result_cls, fallback.static, f"{key}.static", unions)
            static[name] = StaticReply(body)
    return {
        "static_replies": static,
        "known_methods": sorted(set(known)),
        "oneway_methods": sorted(set(oneway)),
        "exception_ids": declared_ids,
        "health_arguments": health_arguments(config, found, config.idl, unions),
    }


def health_arguments(
    config: SidecarConfig, found: dict[str, Any], idl: str, unions: set[Any]
) -> bytes:
    """The argument struct of the health check's probe call (binary protocol).

    Args:
        config: the configuration.
        found: the IDL's services (`services`); empty without an IDL.
        idl: the IDL's path, for messages.
        unions: the IDL's union types.

    Raises:
        ConfigError: arguments without an IDL; a method the IDL does not have
            or declares oneway (no reply would come); arguments that do not
            fit the method's argument types (required ones missing included).
    """
    check = config.health_check
    if check is None:
        return EMPTY_ARGUMENTS
    if not found:
        if check.arguments:
            raise ConfigError(
                "health_check.arguments: the probe's arguments are typed with the service's "
                "IDL; set idl: (or --idl) to the .thrift file, or call a method without "
                "arguments"
            )
        return EMPTY_ARGUMENTS
    service_name, sep, method = check.method.rpartition(":")
    services_with_it = [
        svc
        for name, svc in found.items()
        if method in svc.thrift_services and (not sep or name == service_name)
    ]
    if not services_with_it:
        _find_method(found, check.method, idl, key="health_check.method")  # raises
    encoded = set()
    for service in services_with_it:  # a bare name may be in several services: same args?
        if getattr(getattr(service, f"{method}_result", None), "oneway", False):
            raise ConfigError(
                f"health_check.method: {check.method} is oneway in {idl}: it sends no reply, "
                "so a probe could never pass; name a method that answers (such as ping)"
            )
        args_cls = getattr(service, f"{method}_args")
        value = _convert(
            TType.STRUCT, args_cls, check.arguments or {}, "health_check.arguments", unions
        )
        encoded.add(_encode(value))
    if len(encoded) > 1:
        raise ConfigError(
            f"health_check.method: several services of {idl} define {method} with different "
            "arguments; name one as Service:method"
        )
    return encoded.pop()


def _find_method(
    found: dict[str, Any], name: str, idl: str, key: str | None = None
) -> tuple[Any, str]:
    """The service and method a config name (``method`` or ``Service:method``) means.

    Raises:
        ConfigError: no or several such methods; the message names ``key``
            (``methods.<name>`` unless given).
    """
    key = key or f"methods.{name}"
    service_name, sep, method = name.rpartition(":")
    candidates = [
        (svc_name, svc)
        for svc_name, svc in found.items()
        if method in svc.thrift_services and (not sep or svc_name == service_name)
    ]
    if not candidates:
        listed = ", ".join(
            f"{s}.{m}" for s, svc in sorted(found.items()) for m in svc.thrift_services
        )
        raise ConfigError(f"{key}: no such method in {idl} (methods there: {listed or 'none'})")
    if len(candidates) > 1:
        names = ", ".join(f"{s}:{method}" for s, _ in candidates)
        raise ConfigError(f"{key}: several services define {method}; use one of {names} instead")
    return candidates[0][1], method


def _declared(result_cls: Any) -> dict[str, int]:
    """A method's declared exceptions: name -> field id of its result struct."""
    return {
        spec[2].__name__: fid
        for fid, spec in result_cls.thrift_spec.items()
        if fid != 0 and len(spec) == 4
    }


def exception_ids(config: SidecarConfig, found: dict[str, Any], idl: str) -> ExceptionIds:
    """Resolve the declared exceptions the config names to field ids, method by method.

    Args:
        config: the configuration.
        found: the IDL's services (`services`); empty without an IDL.
        idl: the IDL's path, for messages.

    Raises:
        ConfigError: a name is set without an IDL, or is not declared (by the
            method for ``retry_on_exceptions``, by any method for
            ``breaker.failure_exceptions``); the message names the key and the
            exceptions that are declared.
    """
    wanted = {
        key: method.retry_on_exceptions
        for key, method in config.methods.items()
        if method.retry_on_exceptions
    }
    failing = set(config.breaker.failure_exceptions)
    if config.idl is None:
        key = (
            f"methods.{next(iter(wanted))}.retry_on_exceptions"
            if wanted
            else "breaker.failure_exceptions"
        )
        if wanted or failing:
            raise ConfigError(
                f"{key}: declared exceptions are named in the service's IDL, which is needed "
                "to find their field ids; set idl: (or --idl) to the .thrift file"
            )
        return ExceptionIds({}, {})
    retry: dict[str, dict[str, frozenset[int]]] = {}
    for key, names in wanted.items():
        service_name, sep, method = key.rpartition(":")
        per_service = {
            s: _declared(getattr(svc, f"{method}_result"))
            for s, svc in found.items()
            if method in svc.thrift_services and (not sep or s == service_name)
        }
        if not per_service:
            _find_method(found, key, idl)  # raises: no such method
        declared = {n for names_of in per_service.values() for n in names_of}
        unknown = [n for n in names if n not in declared]
        if unknown:
            raise ConfigError(
                f"methods.{key}.retry_on_exceptions: {unknown[0]!r} is not declared by "
                f"{method} (declared: {', '.join(sorted(declared)) or 'none'})"
            )
        by_service = {s: frozenset(d[n] for n in names if n in d) for s, d in per_service.items()}
        # A bare wire name does not say its service: the ids of every service with the method.
        by_service[""] = frozenset().union(*by_service.values())
        retry[key] = by_service
    failures: dict[str, set[int]] = {}
    everywhere: set[str] = set()
    for service_name, service in found.items():
        for method in service.thrift_services:
            by_name = _declared(getattr(service, f"{method}_result"))
            everywhere.update(by_name)
            ids = {fid for n, fid in by_name.items() if n in failing}
            if ids:
                failures.setdefault(method, set()).update(ids)
                failures.setdefault(f"{service_name}:{method}", set()).update(ids)
    unknown = sorted(failing - everywhere)
    if unknown:
        raise ConfigError(
            f"breaker.failure_exceptions: {unknown[0]!r} is not declared by any method in "
            f"{idl} (declared: {', '.join(sorted(everywhere)) or 'none'})"
        )
    return ExceptionIds(retry, {name: frozenset(ids) for name, ids in failures.items()})


def _value_result(result_cls: Any, value: Any, key: str, unions: set[Any]) -> bytes:
    spec = result_cls.thrift_spec.get(0)
    if spec is None:  # void
        if value not in ({}, None):
            raise ConfigError(f"{key}: the method returns void; write {{}} (got {value!r})")
        return _encode(result_cls())
    converted = _convert(spec[0], spec[2] if len(spec) == 4 else None, value, key, unions)
    return _encode(result_cls(success=converted))


def _exception_result(result_cls: Any, static_exc: Any, key: str, unions: set[Any]) -> bytes:
    declared = {
        spec[2].__name__: spec[1]
        for fid, spec in result_cls.thrift_spec.items()
        if fid != 0 and len(spec) == 4
    }
    field = declared.get(static_exc.name)
    if field is None:
        raise ConfigError(
            f"{key}.static_exception.name: {static_exc.name!r} is not declared by this method "
            f"(declared: {', '.join(sorted(declared)) or 'none'})"
        )
    spec = next(s for s in result_cls.thrift_spec.values() if s[1] == field)
    exc = _convert(TType.STRUCT, spec[2], static_exc.value, f"{key}.static_exception.value", unions)
    return _encode(result_cls(**{field: exc}))


def _encode(result: Any) -> bytes:
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


def _convert(ttype: int, args: Any, value: Any, key: str, unions: set[Any]) -> Any:
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
        items = [_convert(etype, eargs, v, f"{key}[{i}]", unions) for i, v in enumerate(value)]
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
            _convert(ktype, kargs, k, f"{key}[{k!r}]", unions): _convert(
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
            kwargs[fname] = _convert(spec[0], fargs, value[fname], f"{key}.{fname}", unions)
        if args in unions and len(kwargs) != 1:
            raise ConfigError(f"{key}: union {args.__name__} needs exactly one field set")
        return args(**kwargs)
    raise bad(_type_name(ttype, args))
