"""How much one process may ask of the upstream: its retry budget, hedging, concurrency limit.

Built from a config at start-up and again on a reload (`reconfigure_limiter`,
`hedging` with the running state), keeping what a reload does not change.
With ``workers: N`` a worker takes its share of the retry budget's floor and
of ``max_in_flight`` (`worker_share`); the adaptive limit and hedging are each
worker's own (docs/workers.md). Functions only, like `sidecar.app.build`.
"""

from __future__ import annotations

import random

from sidecar.config import SidecarConfig
from sidecar.proxy.hedge import Hedging
from sidecar.resilience.budget import RetryBudget
from sidecar.resilience.gradient import GradientLimit, GradientSettings
from sidecar.resilience.limits import ConcurrencyLimit


def budget(config: SidecarConfig, workers: int = 1) -> RetryBudget:
    """The upstream's retry budget, this process's share of it with ``workers`` workers.

    The budget allows ``ratio`` retries per call plus ``min_retries_per_second``.
    Each worker earns the ratio on its own calls, so their sum is the ratio of
    all calls; the floor is split between them, so together they never retry more
    than one process would (docs/workers.md, "Retry budget").
    """
    b = config.retry.budget
    return RetryBudget(b.ratio, b.min_retries_per_second / workers, b.window)


def gradient_settings(config: SidecarConfig) -> GradientSettings | None:
    """The adaptive limit's settings (``upstream.adaptive_concurrency``), or None."""
    a = config.upstream.adaptive_concurrency
    if a is None:
        return None
    return GradientSettings(
        min_concurrency=a.min_concurrency,
        max_concurrency=a.max_concurrency,
        update_interval=a.update_interval,
        sample_percentile=a.sample_percentile,
        min_rtt_interval=a.min_rtt_interval,
        min_rtt_requests=a.min_rtt_requests,
        min_rtt_buffer=a.min_rtt_buffer,
        jitter=a.jitter,
    )


# (this worker's index, how many workers): the one process of a sidecar without workers.
ALONE = (0, 1)


def worker_share(total: int, index: int, count: int) -> int:
    """Worker ``index``'s part of ``total`` split over ``count`` workers: the parts add
    up to ``total`` (the first ``total % count`` workers take one more), at least 1 each."""
    return max(1, total // count + (1 if index < total % count else 0))


def limiter(config: SidecarConfig, worker: tuple[int, int] = ALONE) -> ConcurrencyLimit:
    """The upstream's limit of calls in flight (``max_in_flight``, ``adaptive_concurrency``)."""
    limit = ConcurrencyLimit()
    reconfigure_limiter(limit, config, worker)
    return limit


def reconfigure_limiter(
    limit: ConcurrencyLimit, config: SidecarConfig, worker: tuple[int, int] = ALONE
) -> None:
    """Apply ``config``'s limits; an adaptive limit with unchanged settings keeps its state.

    With ``workers: N`` each worker takes its share of ``max_in_flight``, so the
    upstream sees at most the limit from all of them together (at least one per
    worker: a limit below N allows N). The adaptive limit is each worker's own:
    it follows the latency the upstream shows, which all workers' calls make.
    """
    settings = gradient_settings(config)
    adaptive = limit.adaptive
    if settings is None:
        adaptive = None
    elif adaptive is None or adaptive.settings != settings:
        adaptive = GradientLimit(settings, random.Random())
    fixed = config.upstream.max_in_flight
    index, count = worker
    if fixed is not None and count > 1:
        limit.share_note = f", this worker's share of {fixed}"
        fixed = worker_share(fixed, index, count)
    else:
        limit.share_note = ""
    limit.configure(fixed, adaptive)


def hedging(config: SidecarConfig, current: Hedging | None = None) -> Hedging:
    """The hedge budget and answer-time windows: ``current``'s windows kept on a reload,
    its budget too unless hedge.budget changed."""
    h = config.hedge
    b = h.budget
    if current is None:
        return Hedging(
            RetryBudget(b.ratio, b.min_hedges_per_second, b.window),
            h.latency_samples,
            h.min_samples,
            h.initial_delay,
        )
    budget = current.budget
    if (budget.ratio, budget.floor, budget.window) != (
        b.ratio,
        b.min_hedges_per_second * b.window,
        b.window,
    ):
        budget = RetryBudget(b.ratio, b.min_hedges_per_second, b.window)
    return current.reconfigured(budget, h.latency_samples, h.min_samples, h.initial_delay)
