"""What every call needs, in one immutable object: `CallContext`.

A call takes the context current when it starts and keeps it to the end. A
config reload builds a new context (`sidecar.app.reload`) and the server hands
it to the calls that start afterwards; calls in flight finish on the one they
started with, so no setting changes under a running call.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from sidecar.fallback.service import Fallbacks
from sidecar.metrics import SidecarMetrics
from sidecar.protocol.envelope import Protocol
from sidecar.protocol.framing import Transport
from sidecar.proxy.balancer import UpstreamSet
from sidecar.proxy.hedge import Hedging
from sidecar.proxy.oneway import OnewayMethods
from sidecar.proxy.policy import PolicyTable
from sidecar.resilience.breakers import BreakerSet
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.limits import ConcurrencyLimit
from sidecar.resilience.outcome import Outcome


@dataclass(frozen=True, slots=True)
class CallContext:
    """The parts a call uses.

    Attributes:
        loop: the event loop (kept: ``asyncio.get_running_loop()`` costs a
            ``getpid()`` system call).
        clock: ``loop.time``, bound once: a call reads the loop's clock three
            times, and ``loop.time()`` looks the method up each time (about
            200 instructions in the compiled build, docs/compiled.md).
        upstreams: the upstream's addresses and their pools.
        upstream_transport: the transport the upstream speaks; None = the client's
            (a THeader client's calls stay THeader).
        upstream_protocol: the protocol the upstream speaks; None = the client's.
        upstream_name: the upstream's name in metrics and logs (its addresses).
        upstream_shown: what error replies to clients call the upstream; None: its address.
        policies: per-method settings, resolved from the config.
        breakers: the upstream's circuit breakers.
        budget: the upstream's retry budget.
        fallbacks: what to remember and serve when the upstream cannot answer.
        metrics: where calls are counted.
        trip_on: attempt outcomes that count as failures (breaker, ejection); never OK
            (`Call` takes an OK for a success without looking).
        rng: the random source of the backoff jitter.
        max_message_size: largest message a transcoding may produce.
        max_depth: nesting limit of a transcoding.
        timeout_header: the THeader info header with a client's timeout (ms), or None.
        oneway: the methods learned to be oneway (kept across reloads).
        hedging: the hedge budget and the methods' answer times (kept across reloads).
        access_sample_rate: share of calls logged on ``sidecar.access`` (0: none).
        validate_framed: walk framed and THeader calls before sending them.
        limiter: the upstream's calls in flight and their limit (kept across
            reloads, so calls in flight keep counting).
    """

    loop: asyncio.AbstractEventLoop
    clock: Callable[[], float]
    upstreams: UpstreamSet
    upstream_transport: Transport | None
    upstream_protocol: Protocol | None
    upstream_name: str
    upstream_shown: str | None
    policies: PolicyTable
    breakers: BreakerSet
    budget: RetryBudget
    fallbacks: Fallbacks
    metrics: SidecarMetrics
    trip_on: frozenset[Outcome]
    rng: random.Random
    max_message_size: int
    max_depth: int
    timeout_header: str | None
    oneway: OnewayMethods
    hedging: Hedging
    access_sample_rate: float = 0.0
    validate_framed: bool = True
    limiter: ConcurrencyLimit = field(default_factory=ConcurrencyLimit)
