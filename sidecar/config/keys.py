"""Key paths through the models: what type sits at a path, and how a path is written.

A key path is a tuple of names (``("retry", "max_attempts")``); below
``methods`` the names are method names, below lists they are indexes.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from sidecar.config.model import SidecarConfig


def split_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` → (X, True); anything else → (it, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
    return annotation, False


def step(node: Any, key: str | int) -> tuple[Any, str | int]:
    """One step down a key path through the models' annotations.

    Args:
        node: a model class, a ``dict[str, X]`` / ``tuple[X, ...]`` annotation, or None.
        key: the next key (field names are matched case-insensitively).

    Returns:
        (the annotation below, the key as the config spells it); (None, key) off the map.
    """
    node, _ = split_optional(node)
    if isinstance(node, type) and issubclass(node, BaseModel):
        name = key.lower() if isinstance(key, str) else key
        field = node.model_fields.get(str(name))
        return (split_optional(field.annotation)[0] if field else None), name
    origin = typing.get_origin(node)
    if origin is dict:
        return typing.get_args(node)[1], key
    if origin is tuple:
        return typing.get_args(node)[0], key
    return None, key


def annotation_at(path: Iterable[str | int]) -> Any:
    """The annotation of the key at ``path`` (None when there is no such key)."""
    node: Any = SidecarConfig
    for key in path:
        node, _ = step(node, key)
        if node is None:
            return None
    return node


def model_at(path: Iterable[str | int]) -> type[BaseModel] | None:
    """The section at ``path`` (the whole config for ``()``), or None when it is no section."""
    path = tuple(path)
    node = split_optional(annotation_at(path))[0] if path else SidecarConfig
    if isinstance(node, type) and issubclass(node, BaseModel):
        return node
    return None


def format_key(loc: Iterable[str | int]) -> str:
    """``("retry", "retry_on", 1)`` → ``retry.retry_on[1]``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"
