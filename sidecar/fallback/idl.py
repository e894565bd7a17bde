"""The service's IDL, read once at start-up: its services, and the method a config name means.

thriftpy2 parses the file (`load_idl`); `services` lists what it declares and
`find_method` resolves a config name (``method`` or ``Service:method``) to one
of them, or raises a ConfigError naming the key and the methods there are.
Only the start-up reads the IDL (static replies, declared exceptions, the
health check's arguments: static.py); nothing on the hot path does.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import thriftpy2

from sidecar.errors import ConfigError

_module_ids: Final = itertools.count()

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


def find_method(
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
