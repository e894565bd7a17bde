"""Fleet mode benchmark: the sidecar in local mode vs fleet mode (Redis), interleaved.

Usage (from the repository root, with the project's environment):

    python bench/fleet.py            # 5 rounds x 3 s per target (~2 min)
    python bench/fleet.py --quick    # 2 rounds x 1 s, to check the harness

What runs, for the whole run: the C upstream (`src/upstream.c`, ``binary
echo(1: binary data)``), a ``redis-server`` on a free port (no persistence),
and four sidecars (``python -m sidecar run``, uvloop) in front of the
upstream:

- ``local``: the default config (``echo`` is not idempotent, so not cached);
- ``fleet``: the same with ``state.redis_url``: breaker state shared through
  Redis;
- ``local-cached``: ``echo`` made idempotent, so every reply is put in the
  fallback cache (memory);
- ``fleet-cached``: the same with ``fallback.cache.backend: redis``: every
  reply is also queued for Redis (the load generator repeats one payload, so
  the writes coalesce by key; see `sidecar.fallback.redis`).

The C load generator (`src/loadgen.c`) drives one target at a time: 16
connections, 64-byte payload, framed, closed loop. Rounds are interleaved
and the order rotates every round, so drift on a shared machine lands on all
targets alike. Per run: calls/s, p50/p99, the sidecar's CPU per call
(user+system from /proc/PID/stat, divided by every good reply), Redis's CPU
per call, the upstream's and load generator's share of a core, and the busy
CPU of everything else on the machine as a share of one core ("others": the
noise from other users of this shared machine). Figures are medians over rounds; the ratios
fleet/local are computed per round, then the median is taken.

Every process is started here and ended by its PID. Output: a markdown table
on stdout, JSON and markdown in ``bench/results/fleet-*``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchtools import (
    HOST,
    SidecarProcess,
    build_tools,
    free_port,
    loadavg,
    measured_load,
    round_defaults,
    round_meta,
    round_parser,
    save_results,
    sidecar_process,
    stop_process,
    upstream_server,
    wait_for_port,
)

TARGETS = ("local", "fleet", "local-cached", "fleet-cached")
# The goal: fleet mode throughput at least this share of local mode's.
GOAL_RATIO = 0.8
CONNS, PAYLOAD, TRANSPORT = 16, 64, "framed"


@contextlib.contextmanager
def redis_process(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server on a free port without persistence; yields (process, url)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found: scripts/setup-env --system installs it")
    port = free_port()
    log = (workdir / "redis.log").open("wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc)
        yield proc, f"redis://{HOST}:{port}/0"
    finally:
        stop_process(proc)
        log.close()


def sidecar_config(name: str, redis_url: str) -> str:
    """The YAML of one target's sidecar (listen/upstream/metrics come from flags)."""
    lines = ["log: {level: warning}"]
    if name.endswith("cached"):
        lines.append('retry: {idempotent: ["echo"]}')
    if name.startswith("fleet"):
        lines.append(f"state: {{redis_url: '{redis_url}'}}")
        if name.endswith("cached"):
            lines.append("fallback: {cache: {backend: redis}}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def fleet_sidecar(
    workdir: Path, name: str, upstream_port: int, redis_url: str
) -> Iterator[SidecarProcess]:
    """One target's sidecar, its config written into ``workdir``."""
    config = workdir / f"{name}.yaml"
    config.write_text(sidecar_config(name, redis_url))
    program = ["-m", "sidecar", "run", "--config", str(config)]
    with sidecar_process(program, upstream_port, workdir / f"{name}.log") as sidecar:
        yield sidecar


def state(admin: str) -> dict[str, Any]:
    with urllib.request.urlopen(admin + "/state", timeout=5.0) as response:
        return dict(json.loads(response.read()))


def measure(
    name: str,
    proc: subprocess.Popen[bytes],
    port: int,
    *,
    loadgen: Path,
    redis_pid: int,
    upstream_pid: int,
    duration: float,
    warmup: float,
) -> dict[str, Any]:
    """One load generator run against one sidecar, with CPU deltas around it."""
    run = measured_load(
        loadgen,
        port,
        {"sidecar": proc.pid, "redis": redis_pid, "upstream": upstream_pid},
        conns=CONNS,
        payload=PAYLOAD,
        transport=TRANSPORT,
        duration=duration,
        warmup=warmup,
    )
    sidecar_cpu = run.cpu_seconds("sidecar")
    return {
        "target": name,
        **run.figures(),
        "sidecar_cpu_per_call_us": run.per_call_us(sidecar_cpu),
        "redis_cpu_per_call_us": run.per_call_us(run.cpu_seconds("redis")),
        "sidecar_core_share": run.core_share(sidecar_cpu),
        "upstream_core_share": run.core_share(run.cpu_seconds("upstream")),
        "loadgen_core_share": run.core_share(run.report["cpu_s"]),
        # Busy CPU of everything else on the machine (other users: noise).
        "others_core_share": run.others_core_share,
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def render(runs: list[dict[str, Any]], meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    by = {t: [r for r in runs if r["target"] == t] for t in TARGETS}
    rows = []
    summary: dict[str, Any] = {}
    for t in TARGETS:
        rs = by[t]
        figures = {
            k: median([r[k] for r in rs])
            for k in (
                "calls_per_s",
                "p50_us",
                "p99_us",
                "sidecar_cpu_per_call_us",
                "redis_cpu_per_call_us",
                "others_core_share",
            )
        }
        figures["errors"] = sum(r["errors"] for r in rs)
        summary[t] = figures
        rows.append(
            f"| {t} | {figures['calls_per_s']:,.0f} | {figures['p50_us']:,.0f} | "
            f"{figures['p99_us']:,.0f} | {figures['sidecar_cpu_per_call_us']:.1f} | "
            f"{figures['redis_cpu_per_call_us']:.2f} | {figures['others_core_share']:.2f} | "
            f"{figures['errors']} |"
        )
    ratios: dict[str, dict[str, Any]] = {}
    for fleet_t, local_t in (("fleet", "local"), ("fleet-cached", "local-cached")):
        per_round = [
            (
                f["calls_per_s"] / lo["calls_per_s"],
                f["sidecar_cpu_per_call_us"] / lo["sidecar_cpu_per_call_us"],
            )
            for f, lo in zip(by[fleet_t], by[local_t], strict=True)
        ]
        ratios[fleet_t] = {
            "throughput": median([p[0] for p in per_round]),
            "cpu_per_call": median([p[1] for p in per_round]),
            "throughput_per_round": [round(p[0], 3) for p in per_round],
        }
    summary["ratios"] = ratios
    lines = [
        f"## Fleet mode vs local mode ({CONNS} conn, {PAYLOAD} B, {TRANSPORT}, closed loop)",
        "",
        f"{meta['rounds']} interleaved rounds x {meta['duration_s']:g} s per target; "
        f"medians. Machine: {meta['cpus']} CPUs, load average {meta['loadavg_before']} before, "
        f"{meta.get('loadavg_after', '?')} after.",
        "",
        "| target | calls/s | p50 µs | p99 µs | sidecar CPU µs/call | Redis CPU µs/call "
        "| others (cores) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]
    for name, r in ratios.items():
        verdict = "meets" if r["throughput"] >= GOAL_RATIO else "MISSES"
        lines.append(
            f"- {name} / {name.replace('fleet', 'local')}: throughput {r['throughput']:.2f}x "
            f"(per round {r['throughput_per_round']}), sidecar CPU per call "
            f"{r['cpu_per_call']:.2f}x; {verdict} the goal of >= {GOAL_RATIO}x"
        )
    return "\n".join(lines) + "\n", summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return round_defaults(round_parser(__doc__.split("\n\n")[0]).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = build_tools()
    meta: dict[str, Any] = {
        **round_meta(args),
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg(),
    }
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-")))
        up_proc, up_port = stack.enter_context(upstream_server(tools["upstream"]))
        redis_proc, redis_url = stack.enter_context(redis_process(tmp))
        live = {
            name: stack.enter_context(fleet_sidecar(tmp, name, up_port, redis_url))
            for name in TARGETS
        }
        total = args.rounds * len(TARGETS)
        done = 0
        for rnd in range(args.rounds):
            order = list(TARGETS[rnd % len(TARGETS) :] + TARGETS[: rnd % len(TARGETS)])
            for name in order:
                run = measure(
                    name,
                    live[name].proc,
                    live[name].port,
                    loadgen=tools["loadgen"],
                    redis_pid=redis_proc.pid,
                    upstream_pid=up_proc.pid,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                run["round"] = rnd
                runs.append(run)
                done += 1
                print(
                    f"[{done}/{total}] round {rnd + 1} {name:12s} {run['calls_per_s']:,.0f} "
                    f"calls/s, p50 {run['p50_us']:,.0f} µs, "
                    f"{run['sidecar_cpu_per_call_us']:.1f} µs CPU/call, "
                    f"others {run['others_core_share']:.2f} cores"
                    + (f", {run['errors']} ERRORS" if run["errors"] else ""),
                    file=sys.stderr,
                    flush=True,
                )
        meta["fleet_state"] = {
            name: {
                "shared_state": state(live[name].admin_url)["shared_state"],
                "fallback_store": state(live[name].admin_url)["fallback_store"],
            }
            for name in ("fleet", "fleet-cached")
        }
    meta["loadavg_after"] = loadavg()
    markdown, summary = render(runs, meta)
    print(markdown)
    payload = {"meta": meta, "summary": summary, "runs": runs, "markdown": markdown}
    save_results("fleet", args.quick, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
