"""Run the soak: a real sidecar in fleet mode, clients checking every reply, faults on a schedule.

    readers (framed, buffered) ─┐
    writers (framed, buffered) ─┴─► sidecar ──► fault proxy ──► upstream (its own process,
                                      │         (resets, delays)  restarted by PID)
                                      ├─ shared state: redis-server (restarted by PID)
                                      └─ fallback cache: SQLite file (deleted), or Redis

`run_soak` starts every part, samples the sidecar's RSS and fds (psutil),
plays `tests.soak.schedule` for ``seconds`` (`tests.soak.watch` checks the
path of half-open probes that keep failing), brings every part back up, stops
the clients, waits (bounded) for the sidecar's fds to come back to the start,
and reads ``/metrics``. Every process it started is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.testing.faults import FaultPlan, FaultProxyThread
from tests.fuzz.good_client import GoodClient
from tests.fuzz.runner import settle
from tests.fuzz.sampler import Sampler
from tests.fuzz.wire import Transport
from tests.soak.fds import fd_table, left_behind
from tests.soak.report import SoakReport, client_figures
from tests.soak.schedule import KINDS, Faults, make_schedule
from tests.soak.upstream_process import UpstreamProcess
from tests.soak.watch import ProbeWatch, check_path
from tests.soak.writer import OrderClient
from tests.support.idl import INTEROP_IDL
from tests.support.redis import RedisServer
from tests.support.sidecar import Metrics, SidecarProcess, merged, run_sidecar
from tests.support.wait import wait_until

IDLE_TIMEOUT = 30.0
# Read once the run has settled: is everything back up?
FINAL_GAUGES = ("fallback_store_up", "state_backend_up", "breaker_state")


@dataclass
class SoakSettings:
    """One run's parameters."""

    seed: int = 1
    seconds: float = 600.0
    period: float = 4.0  # mean seconds between two fault events
    cache: str = "sqlite"  # the fallback cache's backend: sqlite or redis
    call_deadline: float = 10.0
    settle_seconds: float = 20.0
    kinds: tuple[str, ...] = KINDS  # the fault kinds played
    config_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the config


def sidecar_config(s: SoakSettings, redis_url: str, workdir: Path) -> dict[str, Any]:
    """The first valid config: fleet mode, fallback cache, short timeouts a run can wait out."""
    cache: dict[str, Any] = {"backend": s.cache}
    if s.cache == "sqlite":
        cache["path"] = str(workdir / "fallback.sqlite3")
    return {
        "idl": str(INTEROP_IDL),
        "idle_timeout": f"{IDLE_TIMEOUT:g}s",
        "upstream": {"transport": "framed", "idle_timeout": "2s"},
        "retry": {
            "per_try_timeout": "1s",
            "deadline": "3s",
            "idempotent": ["get*", "list*", "ping", "add", "echo*"],
        },
        "breaker": {"fail_max": 5, "reset_timeout": "2s"},
        "methods": {"placeOrder": {"idempotent": False}},
        "state": {"redis_url": redis_url, "key_prefix": f"soak-{s.seed}"},
        "fallback": {"cache": cache},
    }


def reload_configs(first: dict[str, Any]) -> dict[str, str]:
    """The configs SIGHUP alternates: the first, a second valid one, and a broken one."""
    second = merged(first, {"breaker": {"fail_max": 8}, "retry": {"per_try_timeout": "1500ms"}})
    broken = copy.deepcopy(first)
    broken["retry"]["deadline"] = "soon"  # not a duration: the reload must be refused
    return {
        "valid_a": yaml.safe_dump(first),
        "valid_b": yaml.safe_dump(second),
        "broken": yaml.safe_dump(broken),
    }


def _deltas(before: Metrics, after: Metrics, name: str, *labels: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for sign, scrape in ((1.0, after), (-1.0, before)):
        for key, value in scrape.matching(name).items():
            as_dict = dict(key)
            label = "->".join(as_dict.get(x, "") for x in labels)
            out[label] = out.get(label, 0.0) + sign * value
    return {k: v for k, v in sorted(out.items()) if v}


def _clients(address: str, s: SoakSettings) -> dict[str, GoodClient]:
    common: dict[str, Any] = {
        "call_deadline": s.call_deadline,
        "max_seconds": s.seconds + 120.0,
        "idle_timeout": IDLE_TIMEOUT,
    }
    framed, buffered = Transport.FRAMED, Transport.BUFFERED
    return {
        "reads-framed": GoodClient(address, (framed, framed), seed=s.seed, **common),
        "reads-buffered": GoodClient(address, (buffered, buffered), seed=s.seed + 1, **common),
        "writes-framed": OrderClient(address, (framed,), name="wf", seed=s.seed + 2, **common),
        "writes-buffered": OrderClient(address, (buffered,), name="wb", seed=s.seed + 3, **common),
    }


def run_soak(s: SoakSettings) -> SoakReport:
    """Start every part, soak, report (see the module docstring)."""
    if s.cache not in ("sqlite", "redis"):
        raise ValueError(f"cache must be sqlite or redis, not {s.cache!r}")
    report = SoakReport(seed=s.seed, cache=s.cache)
    kinds = tuple(k for k in s.kinds if s.cache == "sqlite" or k != "sqlite_delete")
    events = make_schedule(s.seed, s.seconds, s.period, kinds)
    report.events = [e.describe() for e in events]
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    redis = RedisServer()
    upstream = UpstreamProcess(workdir / "orders.txt")
    proxy: FaultProxyThread | None = None
    try:
        redis.start()
        upstream.start()
        proxy = FaultProxyThread(upstream.address, "framed", FaultPlan(seed=s.seed)).start()
        config = merged(sidecar_config(s, redis.url, workdir), s.config_overrides)
        with run_sidecar([proxy.address], config=config) as sidecar:
            configs = reload_configs(sidecar.config)
            stop = threading.Event()
            faults = Faults(
                upstream=upstream,
                proxy=proxy,
                redis=redis,
                sidecar=sidecar,
                configs=configs,
                sqlite_path=workdir / "fallback.sqlite3" if s.cache == "sqlite" else None,
                stop=stop,
            )
            ports = _port_names(redis, proxy, sidecar)
            warm_up(sidecar, proxy, ports, s)
            before = sidecar.metrics()
            fds_before = fd_table(sidecar.proc.pid, ports)
            with Sampler(sidecar) as sampler:
                clients = _clients(sidecar.address, s)
                started = time.monotonic()
                watch = ProbeWatch(
                    sidecar.metrics,
                    lambda: check_path(faults.upstream, faults.proxy),
                    started,
                )
                with contextlib.ExitStack() as running:
                    for client in clients.values():
                        running.enter_context(client)
                    with watch:
                        _play(events, faults, started, s.seconds, sampler)
                    faults.restore()
                report.probe_checks = watch.checks
                report.seconds = time.monotonic() - started
                report.crashed = sampler.crashed
                if not report.crashed:
                    settle(sampler, s.settle_seconds)
                report.rss_mb, report.fds = sampler.rss, sampler.fds
                fds_after = fd_table(sidecar.proc.pid, ports)
                report.fds_left = left_behind(fds_before, fds_after)
                report.fds_gone = left_behind(fds_after, fds_before)
            report.faults = faults.done
            for name, client in clients.items():
                report.clients[name] = client_figures(client.stats)
            _orders(report, upstream, [c for c in clients.values() if isinstance(c, OrderClient)])
            if not report.crashed:
                _counters(report, before, sidecar.metrics())
    finally:
        if proxy is not None:
            proxy.stop()
        upstream.stop()
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def warm_up(
    sidecar: SidecarProcess, proxy: FaultProxyThread, ports: dict[int, str], s: SoakSettings
) -> None:
    """Calls until the fallback cache has been written and read, then until connections close.

    The baseline of fds and RSS is taken after: a sidecar that has cached
    replies and served one from the cache (both connections to the cache file
    and its write-ahead log open), with no client or upstream connection left.
    """
    fallback = "thrift_sidecar_fallback_replies_total"
    with GoodClient(sidecar.address, (Transport.FRAMED,), seed=s.seed, max_seconds=60.0) as client:
        wait_until(lambda: client.stats.ok >= 50, timeout=20.0, message="50 calls answered")
        wait_until(
            lambda: sidecar.metrics().value("thrift_sidecar_fallback_cache_entries") > 0,
            timeout=20.0,
            message="replies in the fallback cache",
        )
        proxy.plan.set_rates(reset_before=1.0)  # every attempt fails: cached replies are served
        try:
            wait_until(
                lambda: sidecar.metrics().value(fallback) > 0,
                timeout=20.0,
                message="a reply served from the fallback cache",
            )
        finally:
            proxy.plan.clear()

    def idle() -> bool:
        table = fd_table(sidecar.proc.pid, ports)
        return not any(k.startswith(("tcp to a client", "tcp to upstream")) for k in table)

    wait_until(idle, timeout=20.0, message="no client or upstream connection left")


def _port_names(
    redis: RedisServer, proxy: FaultProxyThread, sidecar: SidecarProcess
) -> dict[int, str]:
    names = {redis.port: "redis", proxy.port: "upstream (fault proxy)"}
    for what, address in (
        ("thrift", sidecar.address),
        ("admin", sidecar.config["metrics"]["listen"]),
    ):
        names[int(str(address).rpartition(":")[2])] = what
    return names


def _play(
    events: list[Any], faults: Faults, started: float, seconds: float, sampler: Sampler
) -> None:
    """Each event at its time (later if the one before overran), until ``seconds`` or a crash."""
    for event in events:
        wait = started + event.at - time.monotonic()
        if wait > 0 and faults.stop.wait(wait):
            return
        if time.monotonic() - started >= seconds or not sampler.alive:
            return
        faults.run(event)
    remaining = started + seconds - time.monotonic()
    if remaining > 0:
        faults.stop.wait(remaining)


def _orders(report: SoakReport, upstream: UpstreamProcess, writers: list[OrderClient]) -> None:
    executed = upstream.executed_orders()
    receipts = set().union(*(w.receipts for w in writers))
    report.orders_executed = sum(executed.values())
    report.receipts = len(receipts)
    report.executed_twice = sorted(c for c, n in executed.items() if n > 1)
    report.receipts_not_executed = sorted(c for c in receipts if executed[c] == 0)


def _counters(report: SoakReport, before: Metrics, after: Metrics) -> None:
    report.breaker_transitions = _deltas(
        before, after, "thrift_sidecar_breaker_transitions_total", "from_state", "to_state"
    )
    report.reloads = _deltas(before, after, "thrift_sidecar_config_reloads_total", "result")
    report.state_backend_errors = _deltas(
        before, after, "thrift_sidecar_state_backend_errors_total", "operation"
    )
    report.fallback_store_errors = _deltas(
        before, after, "thrift_sidecar_fallback_store_errors_total", "operation"
    )
    report.fallback_replies = _deltas(
        before, after, "thrift_sidecar_fallback_replies_total", "source"
    )
    report.outcomes = _deltas(before, after, "thrift_sidecar_requests_total", "outcome")
    report.attempts = _deltas(before, after, "thrift_sidecar_upstream_attempts_total", "result")
    for gauge in FINAL_GAUGES:
        found = after.matching(f"thrift_sidecar_{gauge}")
        report.final_gauges[gauge] = max(found.values()) if found else None
