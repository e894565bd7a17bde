"""The figures of one soak run, and their text and JSON forms."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tests.fuzz.good_client import GoodStats
from tests.fuzz.report import Usage


def client_figures(stats: GoodStats) -> dict[str, Any]:
    """One client's calls by outcome, and its latency percentiles."""
    return {
        "calls": stats.calls,
        "ok": stats.ok,
        "errors": dict(stats.errors.most_common()),
        "dropped": stats.dropped,
        "wrong_replies": stats.wrong_replies,
        "hangs": stats.hangs,
        "p50_ms": round(1000 * stats.percentile(0.5), 2),
        "p99_ms": round(1000 * stats.percentile(0.99), 2),
        "max_ms": round(1000 * stats.percentile(1.0), 2),
        "examples": list(stats.examples),
    }


@dataclass
class SoakReport:
    """Everything a soak run measured.

    Attributes:
        clients: per client name, `client_figures`.
        orders_executed: placeOrder executions at the upstream (all starts).
        receipts: right receipts the writing clients got.
        executed_twice: customers whose order the upstream executed more than once.
        receipts_not_executed: receipts for orders the upstream never executed.
        faults: what the schedule did, by kind.
        breaker_transitions, reloads, state_backend_errors, fallback_store_errors,
        outcomes, attempts, fallback_replies: increases of the sidecar's counters, by label.
        final_gauges: store and backend health and breaker state once the run settled.
        probe_checks: the path checked while half-open probes kept failing
            (`tests.soak.watch`), one line per check.
    """

    seed: int
    cache: str
    seconds: float = 0.0
    crashed: str = ""
    events: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    orders_executed: int = 0
    receipts: int = 0
    executed_twice: list[str] = field(default_factory=list)
    receipts_not_executed: list[str] = field(default_factory=list)
    breaker_transitions: dict[str, float] = field(default_factory=dict)
    reloads: dict[str, float] = field(default_factory=dict)
    state_backend_errors: dict[str, float] = field(default_factory=dict)
    fallback_store_errors: dict[str, float] = field(default_factory=dict)
    fallback_replies: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, float] = field(default_factory=dict)
    attempts: dict[str, float] = field(default_factory=dict)
    final_gauges: dict[str, float | None] = field(default_factory=dict)
    probe_checks: list[str] = field(default_factory=list)
    rss_mb: Usage = field(default_factory=Usage)
    fds: Usage = field(default_factory=Usage)
    fds_left: dict[str, int] = field(default_factory=dict)
    fds_gone: dict[str, int] = field(default_factory=dict)

    def total(self, key: str) -> int:
        return sum(int(c[key]) for c in self.clients.values())

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["faults"] = dict(self.faults)
        out["rss_mb"] = self.rss_mb.__dict__
        out["fds"] = self.fds.__dict__
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True)

    def to_text(self) -> str:
        lines = [
            f"seed {self.seed}, fallback cache {self.cache}: {self.seconds:.1f}s, "
            f"{len(self.events)} fault events",
            f"sidecar crashed: {self.crashed or 'no'}",
            f"faults done: {dict(sorted(self.faults.items()))}",
        ]
        for name, c in self.clients.items():
            lines.append(
                f"client {name}: {c['calls']} calls, {c['ok']} ok, dropped {c['dropped']}, "
                f"wrong {c['wrong_replies']}, hangs {c['hangs']}, p50 {c['p50_ms']} ms, "
                f"p99 {c['p99_ms']} ms, max {c['max_ms']} ms"
            )
            lines.append(f"  errors: {c['errors'] or 'none'}")
            lines.extend(f"  {e}" for e in c["examples"])
        lines += [
            f"orders executed at the upstream: {self.orders_executed}; right receipts: "
            f"{self.receipts}; executed twice: {len(self.executed_twice)} "
            f"{self.executed_twice[:5]}; receipts never executed: "
            f"{len(self.receipts_not_executed)} {self.receipts_not_executed[:5]}",
            f"breaker transitions: {self.breaker_transitions}",
            f"config reloads: {self.reloads}",
            f"state backend errors: {self.state_backend_errors}",
            f"fallback store errors: {self.fallback_store_errors}",
            f"fallback replies: {self.fallback_replies}",
            f"requests_total by outcome: {self.outcomes}",
            f"upstream_attempts_total by result: {self.attempts}",
            f"after the run settled: {self.final_gauges}",
            "path checks while probes kept failing: " + ("none" if not self.probe_checks else ""),
            *(f"  {line}" for line in self.probe_checks),
            f"sidecar RSS MB before/peak/after: {self.rss_mb.before:.1f} / "
            f"{self.rss_mb.peak:.1f} / {self.rss_mb.after:.1f}",
            f"sidecar fds before/peak/after: {self.fds.before:g} / {self.fds.peak:g} / "
            f"{self.fds.after:g}; open after and not before: {self.fds_left or 'none'}; "
            f"open before and not after: {self.fds_gone or 'none'}",
        ]
        return "\n".join(lines)
