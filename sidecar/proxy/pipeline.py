"""The call pipeline: what every call shares, and where calls start.

`Pipeline` holds the parts a call uses (upstream pools, method policies,
breakers, the retry budget, fallbacks, metrics) and makes a `Call` for each
client message; `sidecar.proxy.call` is the state machine of one call. A
reload swaps parts (policies, budget, fallbacks) between calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

from sidecar.fallback.service import Fallbacks
from sidecar.metrics import SidecarMetrics
from sidecar.policy import MethodPolicy, PolicyTable
from sidecar.protocol.framing import Message, Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.call import (
    BAD_REQUEST,
    CIRCUIT_OPEN,
    CIRCUIT_OPENED,
    FALLBACK,
    INTERNAL,
    PROBE,
    Call,
    Done,
    Wire,
)
from sidecar.resilience.breaker import Breaker
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.outcome import Outcome

log = logging.getLogger("sidecar.pipeline")

__all__ = [
    "BAD_REQUEST",
    "CIRCUIT_OPEN",
    "CIRCUIT_OPENED",
    "FALLBACK",
    "INTERNAL",
    "PROBE",
    "BreakerSet",
    "Pipeline",
    "Wire",
]


class BreakerSet:
    """One breaker per upstream, or one per upstream and method label (``scope: method``)."""

    def __init__(self, make: Callable[[str], Breaker], upstream_name: str, per_method: bool):
        self._make = make
        self._upstream_name = upstream_name
        self._per_method = per_method
        self._breakers: dict[str, Breaker] = {}
        if not per_method:
            self._only: Breaker | None = self._get(upstream_name)
        else:
            self._only = None

    def _get(self, name: str) -> Breaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = self._make(name)
        return breaker

    def for_policy(self, policy: MethodPolicy) -> Breaker:
        """The breaker that guards calls of this method (method labels are capped)."""
        if self._only is not None:
            return self._only
        return self._get(f"{self._upstream_name}/{policy.label}")

    def all(self) -> list[Breaker]:
        return list(self._breakers.values())


class Pipeline:
    """The parts every call uses; `call` starts one."""

    def __init__(
        self,
        *,
        upstreams: UpstreamSet,
        upstream_transport: Transport | None,
        upstream_name: str,
        policies: PolicyTable,
        breakers: BreakerSet,
        budget: RetryBudget,
        fallbacks: Fallbacks,
        metrics: SidecarMetrics,
        trip_on: frozenset[Outcome],
        loop: asyncio.AbstractEventLoop,
        rng: random.Random | None = None,
    ) -> None:
        # Kept, not looked up: asyncio.get_running_loop() costs a getpid() system call.
        self.loop = loop
        self.upstreams = upstreams
        self.upstream_transport = upstream_transport
        self.upstream_name = upstream_name
        self.policies = policies
        self.breakers = breakers
        self.budget = budget
        self.fallbacks = fallbacks
        self.metrics = metrics
        self.trip_on = trip_on
        self.rng = rng or random.Random()

    def call(self, message: Message, client_transport: Transport, done: Done) -> Call:
        """A call for one client message; `Call.start` runs it.

        ``done`` gets the bytes to write back (None for oneway calls); it may be
        called during `Call.start`. The message's buffer is reused for the
        upstream (its seqid is patched); the client's seqid is in its header.
        """
        return Call(self, message, client_transport, done)

    def ejected(self, address: str, seconds: float, outcome: Outcome) -> None:
        """Count and log an address taken out of rotation."""
        self.metrics.upstream_ejections.labels(address).inc()
        log.warning(
            "upstream address %s ejected for %gs after repeated failures (last: %s)",
            address,
            seconds,
            outcome.value,
            extra={"upstream": address, "ejected_seconds": seconds},
        )
