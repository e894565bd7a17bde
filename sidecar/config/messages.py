"""Readable config errors: pydantic's `ValidationError` as one paragraph.

A header (naming the file when every problem comes from it) and one line per
problem: the dotted key path, where the value came from when that was not
the file (an environment variable or a flag), what is wrong in plain words,
a "did you mean" for near misses, and the bad value.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from sidecar.config.base import FieldProblem, KeyPath
from sidecar.config.keys import format_key, model_at
from sidecar.config.names import env_name

Loc = tuple[str | int, ...]


def origin_of(loc: Loc, origins: Mapping[KeyPath, str]) -> str | None:
    """Where the value at ``loc`` (or a section above it) was set, if not in the file."""
    for end in range(len(loc), 0, -1):
        found = origins.get(tuple(str(p) for p in loc[:end]))
        if found:
            return found
    return None


def describe(exc: ValidationError, source: str | None, origins: Mapping[KeyPath, str]) -> str:
    """One paragraph: a header and one line per problem (key, what is wrong, the value).

    Args:
        exc: what pydantic found.
        source: the config file, or None when there was none.
        origins: the environment variable or flag that set a key path, by key path.
    """
    problems: list[tuple[str, str | None]] = []
    for err in exc.errors():
        loc: Loc = tuple(err["loc"])
        value = err.get("input")
        show_value = err["type"] not in ("extra_forbidden", "missing")
        problem_exc = (err.get("ctx") or {}).get("error")
        if isinstance(problem_exc, FieldProblem):
            loc = (*loc, *problem_exc.key)
            value = problem_exc.value
            show_value = value is not None
        origin = origin_of(loc, origins)
        text = format_key(loc)
        if origin:
            text += f" (from {origin})"
        text += ": " + _problem(err, loc, origin)
        if show_value and not isinstance(value, dict | BaseModel):
            text += f" (got {_show(value)})"
        problems.append((text, origin))
    return paragraph(problems, source)


def paragraph(problems: list[tuple[str, str | None]], source: str | None) -> str:
    """The message for (line, origin) problems; the file is named when all came from it."""
    in_file = source is not None and all(origin is None for _, origin in problems)
    header = f"invalid configuration in {source}" if in_file else "invalid configuration"
    if len(problems) == 1:
        return f"{header}: {problems[0][0]}"
    lines = [f"{header} ({len(problems)} problems):"]
    lines += [f"  {text}" for text, _ in problems]
    return "\n".join(lines)


# user:password@ in any URL-like text (redis://:secret@host, rediss://user:secret@host).
_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    Error messages quote bad values, and they end up in logs and ``/state``.
    """
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


def _show(value: Any) -> str:
    text = redact(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


_PLAIN_MESSAGES = {
    "int_parsing": "expected a whole number",
    "int_type": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "tuple_type": "expected a list, written [a, b] or as '- a' lines",
    "list_type": "expected a list, written [a, b] or as '- a' lines",
    "dict_type": "expected a mapping of keys (key: value lines)",
    "model_type": "expected a mapping of keys (key: value lines)",
    "model_attributes_type": "expected a mapping of keys (key: value lines)",
    "missing": "required key is missing",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be more than"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be less than"),
}


def _problem(err: Any, loc: Loc, origin: str | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(loc, origin)
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        text = "must be one of " + ", ".join(options)
        value = err.get("input")
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), options, n=1)
            if close:
                text += f" (did you mean {close[0]!r}?)"
        return text
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        return f"{words} {ctx.get(bound)}"
    if kind in _PLAIN_MESSAGES:
        return _PLAIN_MESSAGES[kind]
    message = str(err["msg"]).removeprefix("Value error, ")
    return message.removeprefix("Input should be ").removeprefix("Assertion failed, ")


def _did_you_mean(loc: Loc, origin: str | None) -> str:
    section = model_at(loc[:-1])
    if section is None:
        return ""
    keys = list(section.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1)
    if close:
        if origin and origin.startswith("environment variable"):
            return f" (did you mean {env_name((*map(str, loc[:-1]), close[0]))}?)"
        return f" (did you mean {close[0]!r}?)"
    where = format_key(loc[:-1]) if loc[:-1] else "the top level"
    return f"; the keys of {where} are: {', '.join(keys)}"
