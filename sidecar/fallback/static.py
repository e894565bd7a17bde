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

Reading the IDL and finding a method in it is idl.py's job; checking a YAML
value against a Thrift type and encoding it, idl_values.py's. This module
applies them to the config's keys (`load_idl_parts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from thriftpy2.thrift import TType

from sidecar.config import SidecarConfig
from sidecar.errors import ConfigError
from sidecar.fallback.idl import find_method, load_idl, services
from sidecar.fallback.idl_values import convert, encode


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


@dataclass(frozen=True, slots=True, eq=False)  # hashed by identity (in MethodPolicy)
class ArgumentTypes:
    """A method's arguments as its IDL declares them: field id -> binary type id and
    name. What a failed call's arguments are compared with: one whose argument
    has another type was the client's doing, not the upstream's (`Call`)."""

    types: dict[int, int]
    names: dict[int, str]


def _argument_types(args_cls: Any) -> ArgumentTypes:
    spec = args_cls.thrift_spec
    return ArgumentTypes(
        {fid: int(field[0]) for fid, field in spec.items()},
        {fid: str(field[1]) for fid, field in spec.items()},
    )


# The arguments of a call without any: an empty struct (its STOP byte, in the
# binary and the compact protocol alike).
EMPTY_ARGUMENTS: Final = b"\x00"


def load_idl_parts(config: SidecarConfig) -> dict[str, Any]:
    """Static replies, known method names and oneway methods from the config's IDL.

    Returns:
        Keyword arguments for `sidecar.app.Sidecar`: ``static_replies``,
        ``known_methods``, ``oneway_methods`` (bare and ``Service:method``),
        ``exception_ids`` (`ExceptionIds`), ``health_arguments`` (the
        probe's argument struct, binary protocol) and ``argument_types``
        (`ArgumentTypes` by ``Service:method``, and by bare name where every
        service that has the method declares the same).

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
            "argument_types": {},
        }
    module = load_idl(config.idl)
    found = services(module)
    declared_ids = exception_ids(config, found, config.idl)
    known: list[str] = []
    oneway: list[str] = []
    arguments: dict[str, ArgumentTypes] = {}
    differ: set[str] = set()  # bare names whose services declare different arguments
    for service_name, service in found.items():
        for method in service.thrift_services:
            names = (method, f"{service_name}:{method}")
            known.extend(names)
            if getattr(getattr(service, f"{method}_result", None), "oneway", False):
                oneway.extend(names)
            args_cls = getattr(service, f"{method}_args", None)
            if args_cls is not None:
                declared = arguments[names[1]] = _argument_types(args_cls)
                if arguments.setdefault(method, declared).types != declared.types:
                    differ.add(method)
    for method in differ:
        del arguments[method]
    unions = set(getattr(module, "__thrift_meta__", {}).get("unions", []))
    static: dict[str, StaticReply] = {}
    for name, fallback in wanted.items():
        service, method = find_method(found, name, config.idl)
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
        "argument_types": arguments,
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
        find_method(found, check.method, idl, key="health_check.method")  # raises
    encoded = set()
    for service in services_with_it:  # a bare name may be in several services: same args?
        if getattr(getattr(service, f"{method}_result", None), "oneway", False):
            raise ConfigError(
                f"health_check.method: {check.method} is oneway in {idl}: it sends no reply, "
                "so a probe could never pass; name a method that answers (such as ping)"
            )
        args_cls = getattr(service, f"{method}_args")
        value = convert(
            TType.STRUCT, args_cls, check.arguments or {}, "health_check.arguments", unions
        )
        encoded.add(encode(value))
    if len(encoded) > 1:
        raise ConfigError(
            f"health_check.method: several services of {idl} define {method} with different "
            "arguments; name one as Service:method"
        )
    return encoded.pop()


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
            find_method(found, key, idl)  # raises: no such method
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
        return encode(result_cls())
    converted = convert(spec[0], spec[2] if len(spec) == 4 else None, value, key, unions)
    return encode(result_cls(success=converted))


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
    exc = convert(TType.STRUCT, spec[2], static_exc.value, f"{key}.static_exception.value", unions)
    return encode(result_cls(**{field: exc}))
