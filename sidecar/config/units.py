"""Durations, sizes and addresses: parsed from what people write, formatted back.

Durations are written ``250ms``, ``2s``, ``1m``, ``1h`` (a bare number means
seconds) and held as float seconds; sizes ``16MiB``, ``64KiB`` (a bare number
means bytes) and held as int bytes; addresses ``host:port`` (IPv6 as
``[::1]:port``). The annotated types carry the parsers into the models.
"""

from __future__ import annotations

import math
import re
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator

_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(-?\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(value: Any) -> float:
    """``"250ms"`` → 0.25; numbers are seconds. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as 250ms, 2s or 1m (units: ms, s, m, h)")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be a finite number")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """``"16MiB"`` → 16777216; numbers are bytes. Raises ValueError with the accepted forms."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64KiB or 16MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(
            "expected a size such as 64KiB or 16MiB (units: B, KiB, MiB, GiB, KB, MB, GB)"
        )
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def format_duration(seconds: float) -> str:
    """0.25 → ``"250ms"``, 600 → ``"10m"``: the inverse of `parse_duration`, for people."""
    ms = round(seconds * 1000, 3)
    if ms and ms % 3_600_000 == 0:
        return f"{_number(ms / 3_600_000)}h"
    if ms and ms % 60_000 == 0:
        return f"{_number(ms / 60_000)}m"
    if ms >= 1000 or ms == 0:
        return f"{_number(ms / 1000)}s"
    return f"{_number(ms)}ms"


def _number(value: float) -> str:
    """Shortest exact decimal: 1026.102 → ``1026.102``, 25.0 → ``25``."""
    text = repr(round(value, 6))
    return text.removesuffix(".0")


def format_size(size: int) -> str:
    """16777216 → ``"16MiB"``: the inverse of `parse_size`, for people."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def parse_address(value: Any) -> str:
    """Check ``host:port`` (IPv6 as ``[::1]:port``) and return it unchanged."""
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:9090")
    split_address(value)
    return value


def split_address(value: str) -> tuple[str, int]:
    """``"host:port"`` → (host, port). Raises ValueError on a malformed address."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError("expected HOST:PORT, for example 127.0.0.1:9090")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range (0 to 65535)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def require_positive(value: float) -> float:
    """Validator: a duration that must be longer than zero."""
    if value <= 0:
        raise ValueError("must be longer than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[
    float, BeforeValidator(parse_duration), AfterValidator(require_positive)
]
Size = Annotated[int, BeforeValidator(parse_size)]
Address = Annotated[str, BeforeValidator(parse_address)]


def field_kind(annotation: Any, metadata: Iterable[Any] = ()) -> str | None:
    """``duration``, ``size`` or ``address`` for fields of those types, else None."""
    found: list[Any] = list(metadata)
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for arg in (annotation, *(typing.get_args(annotation) if union else ())):
        if typing.get_origin(arg) is Annotated:
            found += list(getattr(arg, "__metadata__", ()))
    for item in found:
        func = getattr(item, "func", None)
        if func is parse_duration:
            return "duration"
        if func is parse_size:
            return "size"
        if func is parse_address:
            return "address"
    return None
