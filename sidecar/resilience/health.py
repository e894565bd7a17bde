"""Active health checks, the counting part: when do probe results move an address?

Each address's probes are counted in a row: ``unhealthy_threshold`` failed
probes in a row make it unhealthy and take it out of rotation (if it is in);
``healthy_threshold`` passing probes in a row make it healthy and bring it back
(if it is out). An address taken out by passive ejection between two probes
starts its streak of passes at the first probe after the ejection: a pass seen
before the ejection does not vouch for it. Addresses start healthy: the
sidecar forwards from the first moment, and probes only ever take an address
out after evidence (Envoy starts its hosts unhealthy until a first pass; a
sidecar in front of a single address gains nothing by waiting).

The verdicts here are decisions only; `sidecar.proxy.health` sends the probes
and applies the verdicts to the ejection tracker and the breakers. No clock:
thresholds count probes, not seconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class Verdict(Enum):
    """What a probe result does to its address's place in the rotation."""

    STAY = "stay"
    TAKE_OUT = "take_out"
    BRING_BACK = "bring_back"


@dataclass(slots=True)
class AddressProbes:
    """The probe record of one address.

    Attributes:
        passes: passing probes in a row (since its latest ejection, when out).
        failures: failed probes in a row.
        healthy: the probes' verdict (True until ``unhealthy_threshold`` failures).
        last_passed: whether its latest probe passed (None: none yet).
        last_result: the latest probe's result label (``pass`` or an outcome).
        out: whether it was out of rotation at its latest probe.
    """

    passes: int = 0
    failures: int = 0
    healthy: bool = True
    last_passed: bool | None = None
    last_result: str | None = None
    out: bool = False


class HealthTracker:
    """Probe records of a fixed set of addresses, and the verdicts they come to.

    Args:
        addresses: the upstream's addresses.
        healthy_threshold: passing probes in a row that bring an address back.
        unhealthy_threshold: failed probes in a row that take it out.
    """

    def __init__(
        self, addresses: Iterable[str], *, healthy_threshold: int, unhealthy_threshold: int
    ) -> None:
        self._records = {address: AddressProbes() for address in addresses}
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold

    def record(self, address: str, passed: bool, result: str, out_of_rotation: bool) -> Verdict:
        """Count one probe result of ``address``.

        Args:
            address: the probed address.
            passed: whether the probe passed.
            result: its label (``pass`` or the failure's outcome), kept for ``/state``.
            out_of_rotation: whether the address is out of rotation now, for
                any reason (probes or passive ejection).

        Returns:
            TAKE_OUT when this failure makes an address in rotation unhealthy;
            BRING_BACK when this pass completes the streak of an address that
            is out; STAY otherwise.
        """
        rec = self._records[address]
        if out_of_rotation and not rec.out:  # taken out since its last probe: count anew
            rec.passes = 0
        rec.last_passed = passed
        rec.last_result = result
        verdict = Verdict.STAY
        if passed:
            rec.failures = 0
            rec.passes += 1
            if rec.passes >= self.healthy_threshold:
                rec.healthy = True
                if out_of_rotation:
                    verdict = Verdict.BRING_BACK
        else:
            rec.passes = 0
            rec.failures += 1
            if rec.failures >= self.unhealthy_threshold:
                rec.healthy = False
                if not out_of_rotation:
                    verdict = Verdict.TAKE_OUT
        rec.out = verdict is Verdict.TAKE_OUT or (
            out_of_rotation and verdict is not Verdict.BRING_BACK
        )
        return verdict

    def any_passing(self) -> bool:
        """Did the latest probe of at least one address pass?"""
        return any(rec.last_passed for rec in self._records.values())

    def get(self, address: str) -> AddressProbes:
        """The probe record of ``address``."""
        return self._records[address]

    def addresses(self) -> list[str]:
        """The tracked addresses, in the config's order."""
        return list(self._records)
