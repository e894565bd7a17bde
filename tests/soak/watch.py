"""While a soak runs: when half-open probes keep failing, check the path they take.

One 10-minute run got its breaker stuck open: every probe failed about 2 ms
after it was let through, for 8 minutes (docs/robustness.md). The run's
figures say the probes went out on new upstream connections that were closed
before any reply; they cannot say whether the sidecar or the path behind it
(the fault proxy, the upstream process) was to blame. `ProbeWatch` tells
them apart on the next occurrence.

Every ``interval`` seconds it reads the breaker transitions from
``/metrics``. After ``streak`` failed probes (half-open -> open) with no
closing between them, it checks the path once, bypassing the sidecar: a
``ping`` on a new connection to the upstream itself, and one through the
fault proxy, and notes whether the upstream process runs and which calls the
proxy could not forward, by step and kind (``connect: ECONNREFUSED``,
``first call: ConnectionError``, ...). Failed probes while both pings are
answered point at the sidecar; pings that fail too point at the path. A
closing ends the episode; at most ``max_checks`` checks per run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sidecar.testing.faults import FaultProxyThread
from tests.soak.upstream_process import UpstreamProcess
from tests.support.raw import decode_reply, encode_call, raw_call
from tests.support.sidecar import Metrics

FAILED_PROBE = "half-open->open"
CLOSING = "half-open->closed"
PING_TIMEOUT = 1.0


def transitions(metrics: Metrics) -> dict[str, float]:
    """Breaker transitions so far, by ``from->to`` (every breaker together)."""
    out: dict[str, float] = {}
    for key, value in metrics.matching("thrift_sidecar_breaker_transitions_total").items():
        labels = dict(key)
        name = f"{labels.get('from_state', '')}->{labels.get('to_state', '')}"
        out[name] = out.get(name, 0.0) + value
    return out


class ProbeStreak:
    """Failed probes since the last closing, from successive transition counts."""

    def __init__(self) -> None:
        self.failed = 0
        self._last: dict[str, float] | None = None

    def update(self, seen: dict[str, float]) -> int:
        """Take a new reading; returns the failed probes in a row so far."""
        last, self._last = self._last, dict(seen)
        if last is None:
            return self.failed
        if seen.get(CLOSING, 0.0) > last.get(CLOSING, 0.0):
            self.failed = 0  # closed meanwhile: probes failed after it start a new streak
            return self.failed
        self.failed += int(seen.get(FAILED_PROBE, 0.0) - last.get(FAILED_PROBE, 0.0))
        return self.failed


def ping(address: str, timeout: float = PING_TIMEOUT) -> str:
    """``ping`` on a new framed connection to ``address``: how it went, in words."""
    started = time.monotonic()
    call = encode_call("ping", {}, seqid=1)
    try:
        decode_reply("ping", raw_call(address, call, "framed", timeout=timeout))
    except Exception as exc:  # what failed is the finding
        took = 1000 * (time.monotonic() - started)
        return f"failed after {took:.1f} ms ({type(exc).__name__}: {exc})"
    return f"answered in {1000 * (time.monotonic() - started):.1f} ms"


def check_path(upstream: UpstreamProcess, proxy: FaultProxyThread) -> str:
    """One line: the upstream pinged directly and through the fault proxy, then the
    process's state and the calls the proxy could not forward, by step and kind
    (`sidecar.testing.faults.FaultStats`; the ping included)."""
    direct = ping(upstream.address)
    through = ping(proxy.address)
    stats = proxy.stats
    return (
        f"upstream process {'running' if upstream.running else 'not running'}; "
        f"ping to the upstream {direct}; ping through the fault proxy {through}; "
        f"calls the proxy could not forward so far: {stats.upstream_failures} "
        f"{stats.upstream_failure_kinds}"
    )


class ProbeWatch:
    """A thread that checks the probes' path when they keep failing (see the module docstring).

    Args:
        scrape: reads the sidecar's ``/metrics``.
        path: makes one check (`check_path` bound to the run's parts).
        started: the run's start (``time.monotonic()``), for the times noted.
        streak: failed probes in a row that call for a check.
        interval: seconds between two readings.
        max_checks: checks at most, over the run.
    """

    def __init__(
        self,
        scrape: Callable[[], Metrics],
        path: Callable[[], str],
        started: float,
        *,
        streak: int = 4,
        interval: float = 2.0,
        max_checks: int = 10,
    ) -> None:
        self._scrape = scrape
        self._path = path
        self._started = started
        self._streak = streak
        self._interval = interval
        self._max_checks = max_checks
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe-watch", daemon=True)
        self.checks: list[str] = []

    def __enter__(self) -> ProbeWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self._interval + 2 * PING_TIMEOUT + 5.0)

    def _run(self) -> None:
        streak = ProbeStreak()
        checked = False  # this episode has its check
        while not self._stop.wait(self._interval) and len(self.checks) < self._max_checks:
            try:
                failed = streak.update(transitions(self._scrape()))
            except Exception as exc:  # a scrape that fails must not end the watch
                self.checks.append(f"{self._at()}: /metrics not read: {exc}")
                continue
            if failed == 0:
                checked = False
            elif failed >= self._streak and not checked:
                checked = True
                try:
                    found = self._path()
                except Exception as exc:  # nor a check that fails
                    found = f"check failed: {type(exc).__name__}: {exc}"
                self.checks.append(f"{self._at()}, {failed} failed probes in a row: {found}")

    def _at(self) -> str:
        return f"{time.monotonic() - self._started:.1f}s"
