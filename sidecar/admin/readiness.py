"""What ``/readyz`` answers, and why not: drained by hand, or following the upstream.

Three reasons to answer 503, checked in this order:

1. the sidecar is not serving (starting up, or draining after SIGTERM);
2. an operator failed readiness on purpose (``POST /readiness/fail`` on the
   control listener), to take the pod out of its Service before work on it;
3. ``readiness.require_upstream: true``, a breaker is open, and a call it
   rejects could get no fallback. A fallback "can be served" when
   ``fallback.serve_on`` includes ``breaker_open`` and either a static reply
   is configured (for the breaker's method, with ``breaker.scope: method``;
   for any method otherwise) or the fallback cache holds at least one reply.
   A half-open breaker is letting probes through: it does not count.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from sidecar.resilience.breaker import STATE_OPEN, Breaker


class Readiness:
    """Readiness failed on purpose, and the rule that follows the upstream."""

    def __init__(self) -> None:
        self.failed_by: str | None = None

    def fail(self, who: str) -> bool:
        """Fail readiness on purpose; returns whether it was passing before."""
        was = self.failed_by is None
        self.failed_by = who
        return was

    def restore(self) -> bool:
        """Undo `fail`; returns whether it had been failed."""
        was = self.failed_by is not None
        self.failed_by = None
        return was

    def problem(
        self,
        *,
        serving: bool,
        require_upstream: bool,
        breakers: Iterable[Breaker],
        serve_on: Collection[str],
        static_methods: Collection[str],
        cached_replies: int,
    ) -> str | None:
        """None when ``/readyz`` answers 200; else the reason, one line.

        Args:
            serving: the sidecar accepts calls (not starting, not draining).
            require_upstream: ``readiness.require_upstream``.
            breakers: every breaker of the upstream.
            serve_on: ``fallback.serve_on``.
            static_methods: names of the methods with a static reply.
            cached_replies: replies held by the fallback cache.
        """
        if not serving:
            return "not serving calls (starting up or draining)"
        if self.failed_by is not None:
            return (
                f"failed on purpose through the control listener by {self.failed_by} "
                "(POST /readiness/restore undoes it)"
            )
        if not require_upstream:
            return None
        for breaker in breakers:
            if breaker.state != STATE_OPEN:
                continue
            why_none = no_fallback(breaker.name, serve_on, static_methods, cached_replies)
            if why_none is not None:
                return f"breaker {breaker.name} is open and no fallback can be served ({why_none})"
        return None


def no_fallback(
    breaker: str, serve_on: Collection[str], static_methods: Collection[str], cached_replies: int
) -> str | None:
    """Why calls rejected by ``breaker`` could get no fallback; None when some can."""
    if "breaker_open" not in serve_on:
        return "fallback.serve_on does not include breaker_open"
    _, sep, method = breaker.partition("/")  # "<upstream>/<method>" with breaker.scope: method
    statics = [m for m in static_methods if not sep or m == method or m.endswith(":" + method)]
    if statics or cached_replies > 0:
        return None
    what = f"for {method}" if sep else "configured"
    return f"no static reply {what}, fallback cache empty"
