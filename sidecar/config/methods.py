"""Which settings apply to a method name as it arrives on the wire.

A wire name is ``method`` or, from a multiplexed client, ``Service:method``.
Per-method entries (``methods:``) apply most specific first: the entry for
``Service:method``, then the one for the bare method. Patterns
(``retry.idempotent``, ``fallback.methods``) are globs: one without ``:`` is
matched against the bare method name, one with ``:`` against the full name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Protocol

from sidecar.config.overrides import MethodConfig
from sidecar.config.policy import RetryConfig


class SidecarConfig(Protocol):
    """What these rules read of a config (`sidecar.config.model.SidecarConfig`, whose own
    checks use them: hence a shape here, not an import of the model)."""

    @property
    def methods(self) -> Mapping[str, MethodConfig]: ...

    @property
    def retry(self) -> RetryConfig: ...


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Does a method name (or ``Service:method``) match any glob pattern?

    A pattern without ``:`` is matched against the bare method name; a pattern
    with ``:`` against the full ``Service:method`` name.
    """
    method = name.rpartition(":")[2]
    for pattern in patterns:
        target = name if ":" in pattern else method
        if fnmatch.fnmatchcase(target, pattern):
            return True
    return False


def method_overrides(config: SidecarConfig, name: str) -> list[MethodConfig]:
    """The ``methods`` entries that apply to a wire name, the most specific first.

    ``methods["Svc:m"]`` then ``methods["m"]`` for ``Svc:m``; ``methods["m"]``
    for ``m``. An unset key of the first entry falls back to the next, then to
    the top-level section.
    """
    methods = config.methods
    found = [methods[name]] if name in methods else []
    if ":" in name:
        bare = methods.get(name.rpartition(":")[2])
        if bare is not None:
            found.append(bare)
    return found


def is_idempotent(config: SidecarConfig, name: str) -> bool:
    """Is the method safe to repeat (retried after it was sent, cached)?

    The first applying ``methods.<name>.idempotent`` that is set decides;
    without one, the ``retry.idempotent`` patterns do.
    """
    for entry in method_overrides(config, name):
        if entry.idempotent is not None:
            return entry.idempotent
    return matches_any(name, config.retry.idempotent)
