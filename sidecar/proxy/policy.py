"""What applies to each method: retry, idempotency, caching, static fallback, metrics,
hedging, and which of its declared exceptions are retried or count as breaker failures.

Settings are resolved once per method name from the config and kept in a
bounded table: names arrive on the wire, so a client sending endless new names
makes the table stop growing (names past the bound are resolved on every call,
which is correct, only slower).

Precedence for a name ``Svc:m``, key by key: ``methods["Svc:m"]``, then
``methods["m"]``, then the global sections (`sidecar.config.method_overrides`;
idempotency by `sidecar.config.is_idempotent`, the rule `sidecar check-config`
uses too). A ``Svc:m`` entry that sets only ``per_try_timeout`` keeps the
rest of the ``m`` entry (``idempotent: false`` included).

Declared exceptions are known by field id here: the names in the config were
resolved against the IDL at start-up (`sidecar.fallback.static.ExceptionIds`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, TypeVar

from sidecar.config import MethodConfig, SidecarConfig, is_idempotent, matches_any, method_overrides
from sidecar.config.hedge import parse_hedge_delay
from sidecar.errors import ProtocolError
from sidecar.fallback.static import ArgumentTypes, ExceptionIds, StaticReply
from sidecar.metrics import OTHER, CallMetrics, MethodLabels, MethodStats, split_name
from sidecar.protocol.appexc import ApplicationExceptionType, parse_application_exception
from sidecar.protocol.envelope import shown_name
from sidecar.protocol.message import Message
from sidecar.proxy.hedge import HedgePlan
from sidecar.resilience.backoff import Backoff
from sidecar.resilience.outcome import Outcome
from sidecar.resilience.retry import RetryPolicy

T = TypeVar("T")

# Outcomes that show the upstream has the method called (with APP_EXCEPTION,
# unless its type is UNKNOWN_METHOD).
_ANSWERS: Final = frozenset((Outcome.OK, Outcome.DECLARED_EXCEPTION, Outcome.INTERNAL_ERROR))

# Most method names remembered; enough for any real service, small enough
# that a client inventing names cannot grow the process.
MAX_CACHED_NAMES = 10_000


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
    stats: MethodStats
    display_name: str  # ``Service.method`` for messages to people (text: `shown_name`)
    oneway: bool = False  # declared oneway (IDL or methods.<name>.oneway)
    # Neither the IDL nor methods.<name>.oneway says whether it is oneway: a CALL
    # of it left unanswered is probed (`sidecar.proxy.oneway_probe`).
    oneway_unknown: bool = False
    # Result field ids of declared exceptions that count as breaker failures
    # (breaker.failure_exceptions); the retried ones are in retry.retry_exceptions.
    failure_exceptions: frozenset[int] = frozenset()
    # Hedged calls (idempotent two-way methods only); None: this method never hedges.
    hedge: HedgePlan | None = None
    # The arguments the IDL declares (None without an IDL, or for a name it does not
    # have): a failed call whose argument has another type is the client's doing.
    arguments: ArgumentTypes | None = None
    # The upstream's first answer to this name matters to its label (`PolicyTable.answered`).
    label_awaits_answer: bool = False
    # For a name labelled `OTHER` that could still get a value of its own: how many
    # values had been given when it was resolved (`MethodLabels.given`); -1 otherwise.
    # Once more have been, in this worker or another, it is resolved again.
    other_since_given: int = -1

    @property
    def classifies_exceptions(self) -> bool:
        """Does a declared exception's field id matter for this method?"""
        return bool(self.failure_exceptions or self.retry.retry_exceptions)


class PolicyTable:
    """Resolves and remembers `MethodPolicy` per wire name."""

    def __init__(
        self,
        config: SidecarConfig,
        labels: MethodLabels,
        static_replies: dict[str, StaticReply] | None = None,
        calls: CallMetrics | None = None,
        service_of: dict[str, str] | None = None,
        oneway_methods: frozenset[str] = frozenset(),
        exception_ids: ExceptionIds | None = None,
        argument_types: dict[str, ArgumentTypes] | None = None,
    ) -> None:
        """Args: ``service_of`` names the one IDL service of a bare method name, for messages;
        ``oneway_methods`` the IDL's oneway methods (bare and ``Service:method``);
        ``exception_ids`` the declared exceptions the config names, resolved by the IDL;
        ``argument_types`` each method's declared arguments, by wire name."""
        self._config = config
        self._arguments = argument_types or {}
        self._exceptions = exception_ids or ExceptionIds({}, {})
        self._oneway = oneway_methods
        self._service_of = service_of or {}
        self._labels = labels
        self._calls = calls or CallMetrics()
        self._static = static_replies or {}
        self._cache: dict[str, MethodPolicy] = {}
        # The name asked for last and its policy: the next call's name is mostly the
        # same ``str`` (`NameCache` interns the names it decodes), known by identity
        # where the cache's lookup hashes and compares. Forgotten with the cache's entry.
        self._last_name: str | None = None
        self._last_policy: MethodPolicy | None = None

    def for_name(self, name: str) -> MethodPolicy:
        """The policy for a wire method name.

        Kept once resolved, but for a name labelled `OTHER` that could still get a
        value: resolved again when values have been given since (`MethodLabels.given`),
        so that it takes the value another worker got it.
        """
        if name is self._last_name:
            last = self._last_policy
            if last is not None and last.other_since_given < 0:
                return last
        policy = self._cache.get(name)
        if policy is None or (
            policy.other_since_given >= 0 and policy.other_since_given != self._labels.given()
        ):
            policy = self._resolve(name)
            if len(self._cache) >= MAX_CACHED_NAMES:
                return policy  # past the bound: kept neither in the cache nor as the last
            self._cache[name] = policy
        self._last_name = name
        self._last_policy = policy
        return policy

    def _resolve(self, name: str) -> MethodPolicy:
        config = self._config
        service, method = split_name(name)
        entries = method_overrides(config, name)
        idempotent = is_idempotent(config, name)
        r = config.retry
        o = [e.retry for e in entries]
        retry = RetryPolicy(
            max_attempts=_first((x.max_attempts for x in o), r.max_attempts),
            backoff=Backoff(
                _first((x.initial_backoff for x in o), r.initial_backoff),
                _first((x.multiplier for x in o), r.multiplier),
                _first((x.max_backoff for x in o), r.max_backoff),
            ),
            per_try_timeout=_first((x.per_try_timeout for x in o), r.per_try_timeout),
            deadline=_first((x.deadline for x in o), r.deadline),
            retry_on=frozenset(Outcome(v) for v in _first((x.retry_on for x in o), r.retry_on)),
            idempotent=idempotent,
            retry_exceptions=self._retry_exceptions(name, service, method),
        )
        failures = self._exceptions.failures
        # Cacheable: the idempotent methods (patterns or methods.X.idempotent),
        # narrowed by fallback.methods when set; never a non-idempotent one.
        patterns = config.fallback.methods
        by_default = patterns is None or matches_any(name, patterns)
        cacheable = idempotent and _first((e.fallback.cache for e in entries), by_default)
        static = self._static.get(name) or self._static.get(method)
        given = self._labels.given()  # before the label: a value given after it is seen
        label = self._labels.label(name)
        awaits_answer = self._labels.awaits_answer(name, label)
        configured = _first((e.oneway for e in entries), None)
        oneway = name in self._oneway if configured is None else configured
        arguments = self._arguments.get(name)  # bare and Service:method names are keys
        return MethodPolicy(
            name=name,
            service=service,
            method=method,
            label=label,
            retry=retry,
            idempotent=idempotent,
            cacheable=cacheable,
            static_reply=static,
            stats=self._calls.method(label),
            display_name=shown_name(
                f"{service or self._service_of.get(method, '')}.{method}".lstrip(".")
            ),
            oneway=oneway,
            failure_exceptions=failures.get(name) or failures.get(method, frozenset()),
            hedge=None if oneway or not idempotent else _hedge_plan(config, entries),
            arguments=arguments,
            oneway_unknown=configured is None and not oneway and arguments is None,
            label_awaits_answer=awaits_answer,
            other_since_given=given if awaits_answer and label == OTHER else -1,
        )

    def answered(self, policy: MethodPolicy, outcome: Outcome, reply: Message | None) -> None:
        """The upstream answered a call of ``policy``'s method (``reply``; None: it was
        learned oneway), for a policy whose `MethodPolicy.label_awaits_answer`.

        An answer that shows the upstream has the method (anything but a missing or
        garbled reply, or UNKNOWN_METHOD) gives the name its own label if one is free
        (`MethodLabels.confirm`); the name's policy is resolved again on its next call.
        """
        if outcome is Outcome.APP_EXCEPTION and reply is not None:
            header = reply.header
            body = memoryview(reply.buf)[reply.start + header.body_offset :]
            try:
                exc_type, _ = parse_application_exception(body, header.protocol)
            except ProtocolError:
                return
            if exc_type == ApplicationExceptionType.UNKNOWN_METHOD:
                return
        elif outcome not in _ANSWERS:
            return
        self._labels.confirm(policy.name)
        self._cache.pop(policy.name, None)
        self._last_name = self._last_policy = None

    def _retry_exceptions(self, name: str, service: str, method: str) -> frozenset[int]:
        """Field ids from the most specific ``methods`` entry that names exceptions to retry."""
        retry = self._exceptions.retry
        for key in (name, method):
            by_service = retry.get(key)
            if by_service is not None:
                return by_service.get(service, frozenset())
        return frozenset()


def _hedge_plan(config: SidecarConfig, entries: list[MethodConfig]) -> HedgePlan | None:
    """How an idempotent method hedges: its entries' keys, else the ``hedge`` section's."""
    h = config.hedge
    delay = _first((e.hedge.delay for e in entries), h.delay)
    max_extra = _first((e.hedge.max_extra for e in entries), h.max_extra)
    if delay is None or max_extra == 0:
        return None
    return HedgePlan(parse_hedge_delay(delay), max_extra)


def _first(overrides: Iterable[T | None], default: T) -> T:
    """The first value that is set, else ``default``."""
    for value in overrides:
        if value is not None:
            return value
    return default
