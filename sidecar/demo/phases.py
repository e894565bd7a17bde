"""What ``sidecar demo`` was asked to do, and the four phases its run is made of.

healthy → flaky (the fault injector resets some calls; the sidecar retries
the reads) → outage (the fault injector is down: the breaker opens and the
sidecar serves cached or static replies, or a clear
``TApplicationException``) → recovery (back up: a half-open probe succeeds
and the breaker closes). The phases' lengths scale with ``--duration``.

With ``--overload`` the upstream serves one call at a time
(`OVERLOAD_SERVICE_TIME` each) and a fifth phase follows: a crowd of extra
clients (`OVERLOAD_CLIENTS`) offers `OVERLOAD_FACTOR` times what it can
serve; the sidecar lets ``upstream.max_in_flight`` calls through at once
and sheds the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sidecar.testing.upstream import FLAKY_RATES

# The shortest run whose phases still tell the story (the recovery needs the
# breaker's reset_timeout, 3s in the demo settings, plus a little).
MIN_DURATION = 12.0
# Shares of the run per phase; the recovery gets the rest.
PHASE_SHARES = {"healthy": 0.2, "flaky": 0.25, "outage": 0.3}
# --overload: seconds the upstream's one worker spends on a call (capacity 500
# calls/s, four times the demo's usual traffic), the overload phase's length
# (added to --duration), its extra clients, and how many times the upstream's
# capacity they offer together.
OVERLOAD_SERVICE_TIME = 0.002
OVERLOAD_SECONDS = 8
OVERLOAD_CLIENTS = 32
OVERLOAD_FACTOR = 3.0


@dataclass(frozen=True)
class DemoOptions:
    """What ``sidecar demo`` was asked to do."""

    duration: float = 30.0
    keep_running: bool = False
    faults: bool = True
    port: int | None = None
    metrics_port: int | None = None
    clients: int = 4
    rate: float = 120.0
    seed: int | None = None
    overload: bool = False


@dataclass(frozen=True)
class Phase:
    """One scripted phase: what the fault injector does, for how long."""

    name: str
    seconds: int
    headline: str
    rates: dict[str, float] = field(default_factory=dict)
    down: bool = False
    crowd: bool = False  # extra clients overload the upstream (--overload)


def plan_phases(
    duration: float, faults: bool, reset_timeout: float, overload: bool = False
) -> list[Phase]:
    """The four phases, their lengths in whole seconds adding up to ``duration``.

    The recovery lasts at least ``reset_timeout`` + 2 s, so that the breaker's
    half-open probe happens after the upstream is back. With ``overload``, the
    overload phase follows (`OVERLOAD_SECONDS` more).
    """
    phases = _four_phases(duration, faults, reset_timeout)
    if overload:
        capacity = 1 / OVERLOAD_SERVICE_TIME
        phases.append(
            Phase(
                "overload",
                OVERLOAD_SECONDS,
                f"{OVERLOAD_CLIENTS} more clients offer {OVERLOAD_FACTOR:g} times the "
                f"{capacity:,.0f} calls/s the upstream can serve; the sidecar lets "
                "upstream.max_in_flight calls through at once and sheds the rest at once: "
                "reads get the cached reply, the others an error saying they were shed",
                crowd=True,
            )
        )
    return phases


def _four_phases(duration: float, faults: bool, reset_timeout: float) -> list[Phase]:
    total = round(max(MIN_DURATION, duration))
    recovery = max(math.ceil(reset_timeout) + 2, round(total * (1 - sum(PHASE_SHARES.values()))))
    rest = max(6, total - recovery)
    healthy = max(2, round(rest * PHASE_SHARES["healthy"] / sum(PHASE_SHARES.values())))
    flaky = max(2, round(rest * PHASE_SHARES["flaky"] / sum(PHASE_SHARES.values())))
    outage = max(2, rest - healthy - flaky)
    before = round(FLAKY_RATES.get("reset_before", 0.0) * 100)
    after = round(FLAKY_RATES.get("reset_after", 0.0) * 100)
    if not faults:
        note = "no faults injected (--no-faults): the upstream stays healthy"
        return [
            Phase("healthy", healthy, note),
            Phase("flaky", flaky, note),
            Phase("outage", outage, note),
            Phase("recovery", recovery, note),
        ]
    return [
        Phase(
            "healthy", healthy, "the upstream answers every call; the sidecar caches good replies"
        ),
        Phase(
            "flaky",
            flaky,
            f"the fault injector resets {before + after}% of the calls ({before}% before "
            f"the upstream runs them, {after}% after); the sidecar retries reads, never a "
            "write it has sent",
            rates=dict(FLAKY_RATES),
        ),
        Phase(
            "outage",
            outage,
            "the upstream is down: the breaker opens, reads get cached or static replies",
            down=True,
        ),
        Phase(
            "recovery",
            recovery,
            "the upstream is back: a half-open probe closes the breaker",
        ),
    ]
