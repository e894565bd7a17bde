"""What applies to each method: retry, idempotency, caching, static fallback.

Settings are resolved once per method name from the config and kept in a
bounded table: names arrive on the wire, so a client sending endless new names
makes the table stop growing (names past the bound are resolved on every call,
which is correct, only slower).

Precedence for a name ``Svc:m``: ``methods["Svc:m"]``, then ``methods["m"]``,
then the global sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from sidecar.config import MethodConfig, RetryOverride, SidecarConfig, matches_any
from sidecar.metrics import MethodLabels, split_name
from sidecar.resilience.backoff import Backoff
from sidecar.resilience.outcome import Outcome
from sidecar.resilience.retry import RetryPolicy

T = TypeVar("T")

# Most method names remembered; enough for any real service, small enough
# that a client inventing names cannot grow the process.
MAX_CACHED_NAMES = 10_000


@dataclass(frozen=True, slots=True)
class StaticReply:
    """A result struct encoded at start-up, served with a fresh envelope."""

    body: bytes
    is_exception: bool


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """Everything the pipeline needs to know about one method name."""

    name: str
    service: str
    method: str
    label: str
    retry: RetryPolicy
    idempotent: bool
    cacheable: bool
    static_reply: StaticReply | None

    @property
    def display_name(self) -> str:
        """``Service.method`` for messages to people."""
        return f"{self.service}.{self.method}" if self.service else self.method


class PolicyTable:
    """Resolves and remembers `MethodPolicy` per wire name."""

    def __init__(
        self,
        config: SidecarConfig,
        labels: MethodLabels,
        static_replies: dict[str, StaticReply] | None = None,
    ) -> None:
        self._config = config
        self._labels = labels
        self._static = static_replies or {}
        self._cache: dict[str, MethodPolicy] = {}

    def for_name(self, name: str) -> MethodPolicy:
        """The policy for a wire method name."""
        policy = self._cache.get(name)
        if policy is None:
            policy = self._resolve(name)
            if len(self._cache) < MAX_CACHED_NAMES:
                self._cache[name] = policy
        return policy

    def _overrides(self, name: str) -> MethodConfig | None:
        methods = self._config.methods
        found = methods.get(name)
        if found is None and ":" in name:
            found = methods.get(name.rpartition(":")[2])
        return found

    def _resolve(self, name: str) -> MethodPolicy:
        config = self._config
        service, method = split_name(name)
        override = self._overrides(name)
        idempotent = matches_any(name, config.retry.idempotent)
        if override is not None and override.idempotent is not None:
            idempotent = override.idempotent
        r = config.retry
        o = override.retry if override is not None else RetryOverride()
        retry = RetryPolicy(
            max_attempts=_first(o.max_attempts, r.max_attempts),
            backoff=Backoff(
                _first(o.initial_backoff, r.initial_backoff),
                _first(o.multiplier, r.multiplier),
                _first(o.max_backoff, r.max_backoff),
            ),
            per_try_timeout=_first(o.per_try_timeout, r.per_try_timeout),
            deadline=_first(o.deadline, r.deadline),
            retry_on=frozenset(Outcome(v) for v in _first(o.retry_on, r.retry_on)),
            idempotent=idempotent,
        )
        fallback = config.fallback
        patterns = fallback.methods if fallback.methods is not None else config.retry.idempotent
        cacheable = idempotent and matches_any(name, patterns)
        if override is not None and override.fallback.cache is not None:
            cacheable = override.fallback.cache and idempotent
        static = self._static.get(name) or self._static.get(method)
        return MethodPolicy(
            name=name,
            service=service,
            method=method,
            label=self._labels.label(name),
            retry=retry,
            idempotent=idempotent,
            cacheable=cacheable,
            static_reply=static,
        )


def _first(override: T | None, default: T) -> T:
    return default if override is None else override
