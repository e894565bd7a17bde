"""The hedging sections: ``hedge`` (the default, and its budget) and ``methods.<name>.hedge``.

A hedge is the same call sent again on another connection when the first
attempt has not been answered after ``delay``; the first answer wins. Only
idempotent methods hedge: a global ``hedge.delay`` applies to them alone, and
``methods.<name>.hedge`` on a method that is not idempotent is a config error
(`sidecar.config.model`). ``delay`` is a duration (``20ms``) or a percentile of
the method's own recent answer times (``p95``, ``p99.9``); `parse_hedge_delay`
reads both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from sidecar.config.base import Section
from sidecar.config.units import PositiveDuration, format_duration, parse_duration

_PERCENTILE = re.compile(r"^\s*[pP](\d{1,2}(?:\.\d+)?)\s*$")


@dataclass(frozen=True, slots=True)
class HedgeDelay:
    """A parsed ``delay``: fixed ``seconds``, or the ``percentile`` of recent answer times."""

    seconds: float | None = None
    percentile: float | None = None


def parse_hedge_delay(value: Any) -> HedgeDelay:
    """``"p95"`` → percentile 95; ``"20ms"`` (or a number of seconds) → 0.02 s.

    Raises:
        ValueError: neither a duration nor ``pNN`` with NN above 0 and below 100.
    """
    if isinstance(value, str) and (m := _PERCENTILE.match(value)):
        percentile = float(m.group(1))
        if not 0 < percentile < 100:
            raise ValueError("a percentile delay is p1 to p99.9 (above 0, below 100)")
        return HedgeDelay(percentile=percentile)
    try:
        return HedgeDelay(seconds=parse_duration(value))
    except ValueError:
        raise ValueError(
            "expected a duration such as 20ms, or a percentile of the method's recent "
            "answer times such as p95 or p99.9"
        ) from None


def normalise_hedge_delay(value: Any) -> Any:
    """Keep the delay as written people read it: ``p95`` or a duration such as ``20ms``."""
    if value is None:
        return None
    parsed = parse_hedge_delay(value)
    if parsed.percentile is not None:
        return f"p{parsed.percentile:g}"
    assert parsed.seconds is not None
    return format_duration(parsed.seconds)


DelayText = Annotated[str, BeforeValidator(normalise_hedge_delay)]


class HedgeBudgetConfig(Section):
    """The hedge budget shared by all calls to one upstream (like retry.budget)."""

    ratio: float = Field(
        0.1,
        ge=0,
        description="Hedges allowed per call of a hedged method (0.1: at most 10% extra attempts).",
    )
    min_hedges_per_second: float = Field(
        1.0, ge=0, description="Hedges always allowed, however few calls are made."
    )
    window: PositiveDuration = Field(
        10.0, description="Time over which calls and hedges are counted."
    )


class HedgeConfig(Section):
    """Hedged calls: the default of every idempotent method, and the settings they share."""

    delay: DelayText | None = Field(
        None,
        description="Send the same call again on another connection (another address when "
        "there is one) when the attempt has no reply after this: a duration (20ms) or a "
        "percentile of the method's own recent answer times (p95). Idempotent methods only; "
        "null: no hedging unless methods.<name>.hedge says so.",
    )
    max_extra: int = Field(
        1,
        ge=0,
        le=10,
        description="Most extra attempts in flight at once for one call (0: no hedging); "
        "each waits delay after the one before.",
    )
    latency_samples: int = Field(
        1000,
        ge=10,
        le=100_000,
        description="Answer times kept per method for a percentile delay (the most recent).",
    )
    min_samples: int = Field(
        50,
        ge=1,
        description="Answer times a method needs before a percentile delay uses them; "
        "until then the delay is initial_delay.",
    )
    initial_delay: PositiveDuration = Field(
        0.05, description="The delay of a percentile hedge until min_samples answers are in."
    )
    budget: HedgeBudgetConfig = Field(
        HedgeBudgetConfig(), description="The hedge budget that bounds the extra load."
    )


class HedgeOverride(Section):
    """Per-method hedging; unset keys inherit from ``hedge``."""

    delay: DelayText | None = Field(None, description="See hedge.delay.")
    max_extra: int | None = Field(
        None, ge=0, le=10, description="See hedge.max_extra (0 turns hedging off here)."
    )

    @property
    def turns_on(self) -> bool:
        """Does this entry ask for hedging (anything set but ``max_extra: 0``)?"""
        if self.max_extra == 0:
            return False
        return self.delay is not None or self.max_extra is not None
