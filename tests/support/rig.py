"""A sidecar in front of a fault-injecting proxy in front of a thriftpy2 upstream.

    client ──► sidecar ──► FaultProxy ──► thriftpy2 upstream

The proxy (`sidecar.testing.faults.FaultProxyThread`) decides each attempt's
fate and counts what it saw; the upstream counts what it executed; the
sidecar (`run_sidecar`, a real ``python -m sidecar run`` process) is read
over HTTP.

- `rig`: the three started together, stopped in reverse order; yields a `Rig`.
- `faulty_upstream`: the upstream and the proxy alone, for tests that put
  more than one sidecar in front of them.
- `breaker_state` / `breaker_transitions`: one breaker's state gauge and
  transition counter, read from any sidecar's metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sidecar.testing.faults import FaultPlan, FaultProxyThread
from tests.support.clients import thriftpy2_client
from tests.support.servers import Thriftpy2Server, TransportName, thriftpy2_server
from tests.support.sidecar import Metrics, SidecarProcess, run_sidecar
from tests.support.wait import wait_until


def wait_probe_due(sidecar: SidecarProcess, breaker: str, timeout: float = 10.0) -> None:
    """Wait until the sidecar says the open breaker's reset timeout has passed.

    Polls ``/state``'s ``probe_in_seconds`` for the breaker (its own reading
    of pybreaker's ``opened_at + reset_timeout``) until it reaches 0.
    """

    def due() -> bool:
        for entry in sidecar.state()["breakers"]:
            if entry["name"] == breaker:
                return entry["probe_in_seconds"] == 0
        raise AssertionError(f"no breaker {breaker!r} in /state")

    wait_until(due, timeout=timeout, interval=0.02, message=f"probe due on {breaker}")


def breaker_state(sidecar: SidecarProcess, breaker: str) -> float:
    """``thrift_sidecar_breaker_state`` of ``breaker``: 0 closed, 1 half-open, 2 open."""
    return sidecar.metrics().value("thrift_sidecar_breaker_state", breaker=breaker)


def breaker_transitions(sidecar: SidecarProcess, breaker: str, old: str, new: str) -> float:
    """How often ``breaker`` went from ``old`` to ``new`` (state names: ``half-open`` ...)."""
    return sidecar.metrics().value(
        "thrift_sidecar_breaker_transitions_total",
        breaker=breaker,
        from_state=old,
        to_state=new,
    )


@dataclass
class Rig:
    """client -> sidecar -> fault proxy -> thriftpy2 upstream.

    ``extra_upstreams`` are the addresses the sidecar was given after the
    proxy's (see `rig`).
    """

    upstream: Thriftpy2Server
    proxy: FaultProxyThread
    sidecar: SidecarProcess
    extra_upstreams: list[str] = field(default_factory=list)

    @property
    def plan(self) -> FaultPlan:
        """The proxy's fault plan: what happens to the next attempts."""
        return self.proxy.plan

    @property
    def upstream_address(self) -> str:
        """The address the sidecar forwards to (the proxy's)."""
        return self.proxy.address

    @property
    def breaker(self) -> str:
        """The breaker's name: the sidecar's upstream address list, comma-separated."""
        return ",".join([self.proxy.address, *self.extra_upstreams])

    def metrics(self) -> Metrics:
        """One scrape of the sidecar's /metrics."""
        return self.sidecar.metrics()

    def state(self) -> float:
        """The breaker's state gauge: 0 closed, 1 half-open, 2 open."""
        return breaker_state(self.sidecar, self.breaker)

    def transitions(self, old: str, new: str) -> float:
        """How often the breaker went from state ``old`` to ``new``."""
        return breaker_transitions(self.sidecar, self.breaker, old, new)

    def client(self, **kwargs: Any) -> contextlib.AbstractContextManager[Any]:
        """A thriftpy2 Interop client of the sidecar, on the upstream's transport."""
        return thriftpy2_client(self.sidecar.address, self.upstream.transport, **kwargs)


@contextlib.contextmanager
def faulty_upstream(
    transport: TransportName = "framed", plan: FaultPlan | None = None
) -> Iterator[tuple[Thriftpy2Server, FaultProxyThread]]:
    """A thriftpy2 upstream and a fault proxy in front of it; yields (upstream, proxy).

    Args:
        transport: the upstream's (and the proxy's) transport.
        plan: the proxy's faults; none (every attempt forwarded) by default.
    """
    with (
        thriftpy2_server(transport) as upstream,
        FaultProxyThread(upstream.address, transport, plan or FaultPlan()) as proxy,
    ):
        yield upstream, proxy


@contextlib.contextmanager
def rig(
    config: dict[str, Any] | None = None,
    plan: FaultPlan | None = None,
    transport: TransportName = "framed",
    *,
    args: list[str] | None = None,
    extra_upstreams: list[str] | None = None,
) -> Iterator[Rig]:
    """Start an upstream, a fault proxy in front of it and a sidecar in front of that.

    Args:
        config: merged into `tests.support.sidecar.base_config`.
        plan: the proxy's faults; none by default.
        transport: the upstream's and the proxy's transport (the sidecar detects it).
        args: extra ``sidecar run`` arguments (``--log-format json`` ...).
        extra_upstreams: more upstream addresses after the proxy's.
    """
    extra = list(extra_upstreams or [])
    with (
        faulty_upstream(transport, plan) as (upstream, proxy),
        run_sidecar([proxy.address, *extra], config=config, args=args) as sidecar,
    ):
        yield Rig(upstream, proxy, sidecar, extra)
