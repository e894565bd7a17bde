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
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchtools import (
    BENCH_DIR,
    HOST,
    REPO_ROOT,
    START_TIMEOUT,
    build_tools,
    cpu_seconds,
    cpu_times,
    free_port,
    machine_busy_seconds,
    run_loadgen,
    stop_process,
    upstream_server,
    wait_for_port,
)

RESULTS_DIR = BENCH_DIR / "results"
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
def sidecar_process(
    workdir: Path, name: str, upstream_port: int, redis_url: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, str]]:
    """One sidecar; yields (process, Thrift port, admin URL)."""
    config = workdir / f"{name}.yaml"
    config.write_text(sidecar_config(name, redis_url))
    port, admin = free_port(), free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log = (workdir / f"{name}.log").open("wb")
    command = [
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config),
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{upstream_port}",
        "--metrics-listen",
        f"{HOST}:{admin}",
    ]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    url = f"http://{HOST}:{admin}"
    try:
        wait_ready(url + "/readyz", proc, workdir / f"{name}.log")
        yield proc, port, url
    finally:
        stop_process(proc)
        log.close()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            urllib.request.urlopen(url, timeout=1.0) as response,
        ):
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {START_TIMEOUT}s")
        time.sleep(0.05)


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
    cpu0, redis0 = cpu_times(proc.pid), cpu_seconds(redis_pid)
    up0, machine0 = cpu_seconds(upstream_pid), machine_busy_seconds()
    report = run_loadgen(
        loadgen,
        port,
        conns=CONNS,
        payload=PAYLOAD,
        transport=TRANSPORT,
        duration=duration,
        warmup=warmup,
    )
    machine = machine_busy_seconds() - machine0
    cpu1 = cpu_times(proc.pid)
    sidecar_cpu = (cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])
    redis_cpu = cpu_seconds(redis_pid) - redis0
    up_cpu = cpu_seconds(upstream_pid) - up0
    calls = max(report["calls_all"], 1)
    wall = report["wall_s"]
    ours = sidecar_cpu + redis_cpu + up_cpu + report["cpu_s"]
    return {
        "target": name,
        "calls_per_s": report["calls_per_s"],
        "p50_us": report["latency_us"]["p50"],
        "p99_us": report["latency_us"]["p99"],
        "errors": report["errors"],
        "sidecar_cpu_per_call_us": sidecar_cpu / calls * 1e6,
        "redis_cpu_per_call_us": redis_cpu / calls * 1e6,
        "sidecar_core_share": sidecar_cpu / wall,
        "upstream_core_share": up_cpu / wall,
        "loadgen_core_share": report["cpu_s"] / wall,
        # Busy CPU of everything else on the machine (other users: noise).
        "others_core_share": max(machine - ours, 0.0) / wall,
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
    ratios = {}
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 s: check the harness")
    p.add_argument("--rounds", type=int, help="interleaved rounds [5; quick 2]")
    p.add_argument("--duration", type=float, help="seconds measured per run [3; quick 1]")
    p.add_argument("--warmup", type=float, help="unmeasured seconds per run [0.5; quick 0.3]")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = build_tools()
    meta: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "cpus": os.cpu_count(),
        "loadavg_before": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-fleet-")))
        up_proc, up_port = stack.enter_context(upstream_server(tools["upstream"]))
        redis_proc, redis_url = stack.enter_context(redis_process(tmp))
        live = {
            name: stack.enter_context(sidecar_process(tmp, name, up_port, redis_url))
            for name in TARGETS
        }
        total = args.rounds * len(TARGETS)
        done = 0
        for rnd in range(args.rounds):
            order = list(TARGETS[rnd % len(TARGETS) :] + TARGETS[: rnd % len(TARGETS)])
            for name in order:
                proc, port, _ = live[name]
                run = measure(
                    name,
                    proc,
                    port,
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
                "shared_state": state(live[name][2])["shared_state"],
                "fallback_store": state(live[name][2])["fallback_store"],
            }
            for name in ("fleet", "fleet-cached")
        }
    meta["loadavg_after"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    markdown, summary = render(runs, meta)
    print(markdown)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"fleet-{stamp}{'-quick' if args.quick else ''}"
    base.with_suffix(".md").write_text(markdown)
    payload = {"meta": meta, "summary": summary, "runs": runs, "markdown": markdown}
    base.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(f"results: {base}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
