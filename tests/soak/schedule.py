"""The soak run's faults: a seeded schedule of events, and what each event does.

`make_schedule` lays out events over the run: kinds are taken in rounds, each
round a seeded shuffle of every kind (so a short run still sees each one),
with seeded gaps around ``period`` seconds and seeded parameters. The events
are a function of the seed alone; `Faults.run` plays one, blocking for its
window (a restart's downtime, a burst of resets or delays).
"""

from __future__ import annotations

import random
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event as StopFlag
from typing import Any

from sidecar.testing.faults import FaultProxyThread
from tests.soak.upstream_process import UpstreamProcess
from tests.support.redis import RedisServer
from tests.support.sidecar import SidecarProcess

KINDS = ("upstream_restart", "resets", "delays", "reload", "redis_restart", "sqlite_delete")
RELOADS = ("valid_b", "broken", "valid_a")  # in turn: each valid one after the broken one
MAX_EVENTS = 100_000


@dataclass(frozen=True)
class SoakEvent:
    """One fault: when (seconds from the start), what, and its parameters."""

    at: float
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        shown = ", ".join(
            f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
        )
        return f"{self.at:7.1f}s {self.kind} {shown}"


def make_schedule(
    seed: int, seconds: float, period: float, kinds: tuple[str, ...]
) -> list[SoakEvent]:
    """Events from 1 s to ``seconds`` - 1 s, about one per ``period`` seconds."""
    rng = random.Random(f"soak:{seed}")
    events: list[SoakEvent] = []
    at, reloads = 1.0, 0
    for _ in range(MAX_EVENTS // max(1, len(kinds))):
        round_kinds = list(kinds)
        rng.shuffle(round_kinds)
        for kind in round_kinds:
            if at >= seconds - 1.0:
                return events
            params: dict[str, Any] = {}
            if kind == "upstream_restart":
                params = {"kill": rng.random() < 1 / 3, "down": rng.uniform(0.2, 2.0)}
            elif kind == "resets":
                params = {"window": rng.uniform(1.0, 3.0)}
            elif kind == "delays":
                params = {"window": rng.uniform(1.0, 3.0), "delay": rng.uniform(0.2, 1.5)}
            elif kind == "reload":
                params = {"config": RELOADS[reloads % len(RELOADS)]}
                reloads += 1
            elif kind == "redis_restart":
                params = {"down": rng.uniform(0.5, 3.0)}
            events.append(SoakEvent(round(at, 3), kind, params))
            at += rng.uniform(0.5 * period, 1.5 * period)
    return events


class Faults:
    """Plays events on the real parts of a run; counts what it did."""

    def __init__(
        self,
        *,
        upstream: UpstreamProcess,
        proxy: FaultProxyThread,
        redis: RedisServer,
        sidecar: SidecarProcess,
        configs: dict[str, str],
        sqlite_path: Path | None,
        stop: StopFlag,
    ) -> None:
        self.upstream, self.proxy, self.redis, self.sidecar = upstream, proxy, redis, sidecar
        self.configs = configs
        self.sqlite_path = sqlite_path
        self.stop = stop
        self.done: Counter[str] = Counter()

    def run(self, event: SoakEvent) -> None:
        p = event.params
        if event.kind == "upstream_restart":
            self.upstream.stop(kill=p["kill"])
            self.stop.wait(p["down"])
            self.upstream.start()
            self.done["upstream_killed" if p["kill"] else "upstream_stopped"] += 1
        elif event.kind == "resets":
            self.proxy.plan.set_rates(reset_before=0.2, reset_after=0.2, refuse=0.1)
            self.stop.wait(p["window"])
            self.proxy.plan.clear()
            self.done["reset_windows"] += 1
        elif event.kind == "delays":
            self.proxy.plan.set_delay(p["delay"])
            self.proxy.plan.set_rates(delay=0.3)
            self.stop.wait(p["window"])
            self.proxy.plan.clear()
            self.done["delay_windows"] += 1
        elif event.kind == "reload":
            self.sidecar.write_config(self.configs[p["config"]])
            self.sidecar.signal(signal.SIGHUP)
            self.done["reload_" + p["config"]] += 1
        elif event.kind == "redis_restart":
            self.redis.stop()
            self.stop.wait(p["down"])
            self.redis.start()
            self.done["redis_restarts"] += 1
        elif event.kind == "sqlite_delete":
            if self.sqlite_path is not None and self.sqlite_path.exists():
                self.sqlite_path.unlink()
                self.done["sqlite_deleted"] += 1
            else:
                self.done["sqlite_delete_skipped"] += 1

    def restore(self) -> None:
        """Everything back up: no proxy faults, upstream and Redis running."""
        self.proxy.plan.clear()
        if not self.upstream.running:
            self.upstream.start()
        if not self.redis.running:
            self.redis.start()
