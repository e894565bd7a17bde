"""An adaptive concurrency limit that follows the upstream's latency: Envoy's gradient controller.

The algorithm is the gradient controller of Envoy's adaptive concurrency
filter (``envoy.filters.http.adaptive_concurrency``; its
``gradient_controller.cc``), with the same parameters and defaults:

- **minRTT**: the latency of the upstream without a queue. Measured with the
  limit held at ``min_concurrency`` (3) until ``min_rtt_requests`` (50) calls
  that started inside that measurement have finished; minRTT is the
  ``sample_percentile`` (p50) of their latencies. Measured again every
  ``min_rtt_interval`` (60 s, plus up to ``jitter`` percent, 15, so that
  sidecars do not measure together), and at once when the limit has sat at
  ``min_concurrency`` for five windows in a row (the minRTT may be wrong).
- **the limit**: every ``update_interval`` (100 ms), the latencies of the
  calls finished in that window give the sample RTT (the same percentile),
  and

      gradient = clamp(minRTT * (1 + min_rtt_buffer) / sampleRTT, 0.5, 2.0)
      limit = clamp(L * gradient + sqrt(L * gradient), min_concurrency, max_concurrency)

  So the limit grows while calls take about their unloaded time (gradient
  1.25 with the 25 % buffer, plus a headroom of sqrt(limit) for bursts), and
  shrinks, by at most half per window, once a queue makes them slower.

Why Envoy's and not Netflix concurrency-limits' Gradient2 (which the issue
names as the other choice): Gradient2 compares the latest latency with an
exponential average of all latencies, which under sustained overload comes to
include the queue it should detect; against an upstream whose latency is
proportional to its queue it lets the limit drift up to its maximum (a
simulation with its defaults reached 200 within 1,000 samples). Envoy's
controller measures the unloaded latency on purpose, with a small limit,
and so keeps comparing against the real floor. docs/concurrency-limits.md
has the details.

Differences from Envoy, all from running inside one event loop: no timers
(the windows are closed lazily, when a call starts or finishes after their
end: with no calls there is nothing to decide), and at most
`MAX_WINDOW_SAMPLES` latencies are kept per window (the first ones).

Pure decisions: times (seconds, any monotonic clock) and the random source
of the jitter are passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Protocol

# Latencies kept per window; later ones in the same window are not used.
# 100 ms at 40,000 calls/s is 4,000; sorting 10,000 floats takes about 1 ms.
MAX_WINDOW_SAMPLES: Final = 10_000
# Windows in a row at min_concurrency after which minRTT is measured again (Envoy's 5).
MIN_WINDOWS_BEFORE_REMEASURE: Final = 5
# Bounds of the gradient: how fast the limit may grow or shrink per window (Envoy's).
MIN_GRADIENT: Final = 0.5
MAX_GRADIENT: Final = 2.0


class UniformSource(Protocol):
    """Anything with ``uniform(a, b)``, such as ``random.Random``."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True, slots=True)
class GradientSettings:
    """The controller's parameters (Envoy's names in brackets; the defaults are Envoy's).

    Attributes:
        min_concurrency: the limit while minRTT is measured, and the lowest
            limit ever set [min_rtt_calc_params.min_concurrency, 3].
        max_concurrency: the highest limit ever set
            [concurrency_limit_params.max_concurrency_limit, 1000].
        update_interval: seconds per window of latency samples
            [concurrency_update_interval, 100 ms].
        sample_percentile: percentile (0-100) that sums up a window
            [sample_aggregate_percentile, 50].
        min_rtt_interval: seconds between minRTT measurements [interval, 60 s].
        min_rtt_requests: calls per minRTT measurement [request_count, 50].
        min_rtt_buffer: percent added to minRTT before comparing [buffer, 25].
        jitter: up to this percent of min_rtt_interval is added at random [jitter, 15].
    """

    min_concurrency: int = 3
    max_concurrency: int = 1000
    update_interval: float = 0.1
    sample_percentile: float = 50.0
    min_rtt_interval: float = 60.0
    min_rtt_requests: int = 50
    min_rtt_buffer: float = 25.0
    jitter: float = 15.0


class GradientLimit:
    """The concurrency limit of one upstream, adapted to its latency.

    Call `advance` before admitting a call (it may close a window) and
    `sample` when an admitted call finishes with a latency worth counting.

    Attributes:
        limit: calls allowed in flight now.
        min_rtt: the last measured unloaded latency (seconds), None before the first.
        sample_rtt: the last window's latency (seconds), None before the first.
        measuring: True while minRTT is being measured (the limit is min_concurrency).
    """

    def __init__(self, settings: GradientSettings, rng: UniformSource) -> None:
        self.settings = settings
        self._rng = rng
        self.limit = settings.min_concurrency
        self.min_rtt: float | None = None
        self.sample_rtt: float | None = None
        self.measuring = False
        self._deferred = settings.min_concurrency  # the limit to restore after a measurement
        self._epoch = -math.inf  # calls that started before it give no sample
        self._window_start: float | None = None
        self._next_measurement: float | None = None  # None: at the first advance
        self._samples: list[float] = []
        self._at_min = 0  # windows in a row that set min_concurrency

    def advance(self, now: float) -> None:
        """Start a minRTT measurement or close a window when their time has come."""
        if self.measuring:
            return
        if self._next_measurement is None or now >= self._next_measurement:
            self._start_measuring(now)
            return
        assert self._window_start is not None
        if now - self._window_start >= self.settings.update_interval:
            self._close_window(now)

    def sample(self, started: float, finished: float) -> None:
        """A call that started at ``started`` finished at ``finished``: one latency sample.

        Calls that started before the current minRTT measurement are not counted.
        """
        if started < self._epoch:
            return
        if len(self._samples) < MAX_WINDOW_SAMPLES:
            self._samples.append(finished - started)
        if self.measuring:
            if len(self._samples) >= self.settings.min_rtt_requests:
                self._finish_measuring(finished)
        else:
            self.advance(finished)

    # the steps

    def _start_measuring(self, now: float) -> None:
        self.measuring = True
        self._deferred = self.limit
        self._set_limit(self.settings.min_concurrency)
        self._samples.clear()
        self._epoch = now

    def _finish_measuring(self, now: float) -> None:
        s = self.settings
        self.min_rtt = self._percentile()
        self._set_limit(self._deferred)
        self.measuring = False
        self._samples.clear()
        self._window_start = now
        jitter = self._rng.uniform(0.0, s.min_rtt_interval * s.jitter / 100)
        self._next_measurement = now + s.min_rtt_interval + jitter

    def _close_window(self, now: float) -> None:
        self._window_start = now
        if not self._samples:
            return
        self.sample_rtt = self._percentile()
        self._samples.clear()
        self._set_limit(self._new_limit())
        if self._at_min >= MIN_WINDOWS_BEFORE_REMEASURE:
            self._start_measuring(now)

    def _new_limit(self) -> int:
        s = self.settings
        assert self.min_rtt is not None
        assert self.sample_rtt is not None
        buffered = self.min_rtt * (1 + s.min_rtt_buffer / 100)
        raw = buffered / self.sample_rtt if self.sample_rtt > 0 else MAX_GRADIENT
        gradient = max(MIN_GRADIENT, min(MAX_GRADIENT, raw))
        scaled = self.limit * gradient
        new = int(scaled + math.sqrt(scaled))  # Envoy truncates to a whole number
        return max(s.min_concurrency, min(s.max_concurrency, new))

    def _set_limit(self, limit: int) -> None:
        floor = self.settings.min_concurrency
        if not self.measuring and self.limit == floor and limit == floor:
            self._at_min += 1
        else:
            self._at_min = 0
        self.limit = limit

    def _percentile(self) -> float:
        ordered = sorted(self._samples)
        index = min(len(ordered) - 1, int(self.settings.sample_percentile / 100 * len(ordered)))
        return ordered[index]
