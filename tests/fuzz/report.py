"""The figures of one fuzz run, and their text and JSON forms."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tests.fuzz.good_client import GoodStats

_MAX_EXAMPLES = 10


@dataclass
class Usage:
    """A resource of the sidecar process: at start, at its highest, after the run settled."""

    before: float = 0.0
    peak: float = 0.0
    after: float = 0.0


@dataclass(repr=False)
class Report:
    """Everything a fuzz run measured.

    Attributes:
        hangs: connections that got neither an answer nor a close within the bound
            and its grace period; late: those that closed in the grace period.
        fuzzer_max_lag: the fuzzer's own longest event-loop stall (machine load).
        violations: inputs whose connection did not get what it had to, by oracle.
        slowloris_survivors: dripping connections still open after twice the idle timeout.
        breaker_openings: breaker transitions to open, from ``/metrics``.
        protocol_errors: ``protocol_errors_total`` increase by kind.
        outcomes: ``requests_total`` increase by outcome.
        retries: ``retries_total`` increase by reason.
        rss_mb, fds: the sidecar's memory and open file descriptors.
    """

    seed: int
    inputs_sent: int = 0
    seconds: float = 0.0
    by_kind: Counter[str] = field(default_factory=Counter)
    crashed: str = ""
    hangs: int = 0
    late: int = 0
    fuzzer_max_lag: float = 0.0
    hang_examples: list[str] = field(default_factory=list)
    violations: Counter[str] = field(default_factory=Counter)
    violation_examples: dict[str, list[str]] = field(default_factory=dict)
    slowloris_survivors: int = 0
    connect_failures: Counter[str] = field(default_factory=Counter)
    breaker_openings: float = 0.0
    protocol_errors: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    retries: dict[str, float] = field(default_factory=dict)
    rss_mb: Usage = field(default_factory=Usage)
    fds: Usage = field(default_factory=Usage)
    good: GoodStats = field(default_factory=GoodStats)

    def __repr__(self) -> str:
        return f"<Report seed {self.seed}: {self.inputs_sent} inputs, see to_text()>"

    def hang(self, text: str) -> None:
        self.hangs += 1
        if len(self.hang_examples) < _MAX_EXAMPLES:
            self.hang_examples.append(text)

    def violation(self, oracle: str, text: str) -> None:
        self.violations[oracle] += 1
        examples = self.violation_examples.setdefault(oracle, [])
        if len(examples) < 3:
            examples.append(text)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (``asdict`` alone would turn a Counter's keys into pairs)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Usage):
                value = asdict(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        g = self.good
        out["good"] = {
            "calls": g.calls,
            "ok": g.ok,
            "errors": dict(g.errors),
            "dropped": g.dropped,
            "wrong_replies": g.wrong_replies,
            "hangs": g.hangs,
            "examples": list(g.examples),
            "p50_ms": round(1000 * g.percentile(0.5), 2),
            "p99_ms": round(1000 * g.percentile(0.99), 2),
            "max_ms": round(1000 * g.percentile(1.0), 2),
        }
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def to_text(self) -> str:
        g = self.good
        lines = [
            f"seed {self.seed}: {self.inputs_sent} inputs in {self.seconds:.1f}s "
            f"({self.inputs_sent / max(self.seconds, 1e-9):.0f}/s)",
            f"sidecar crashed: {self.crashed or 'no'}",
            f"hangs: {self.hangs} (late closes within the grace period: {self.late}; "
            f"fuzzer loop's longest lag {self.fuzzer_max_lag:.2f}s)",
            *(f"  {h}" for h in self.hang_examples),
            f"oracle violations: {dict(self.violations) or 'none'}",
            *(
                f"  {oracle}: {example}"
                for oracle, examples in self.violation_examples.items()
                for example in examples
            ),
            f"slowloris connections outliving 2x idle_timeout: {self.slowloris_survivors}",
            f"fuzz connections that failed to connect: {dict(self.connect_failures) or 'none'}",
            f"good client: {g.calls} calls, {g.ok} ok, dropped {g.dropped}, "
            f"wrong replies {g.wrong_replies}, hangs {g.hangs}, "
            f"p50 {1000 * g.percentile(0.5):.1f} ms, p99 {1000 * g.percentile(0.99):.1f} ms, "
            f"max {1000 * g.percentile(1.0):.1f} ms",
            f"good client errors: {dict(g.errors.most_common()) or 'none'}",
            *(f"  {e}" for e in g.examples),
            f"breaker openings: {self.breaker_openings:g}",
            f"protocol_errors_total: {self.protocol_errors}",
            f"requests_total by outcome: {self.outcomes}",
            f"retries_total by reason: {self.retries}",
            f"sidecar RSS MB before/peak/after: {self.rss_mb.before:.1f} / "
            f"{self.rss_mb.peak:.1f} / {self.rss_mb.after:.1f}",
            f"sidecar fds before/peak/after: {self.fds.before:g} / {self.fds.peak:g} / "
            f"{self.fds.after:g}",
            f"inputs by kind: {dict(sorted(self.by_kind.items()))}",
        ]
        return "\n".join(lines)
