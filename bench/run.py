"""Forwarding benchmark: direct vs HAProxy (TCP mode) vs the sidecar, interleaved.

Usage (from the repository root, with the project's environment):

    python bench/run.py            # full run: 5 rounds x 3 s per measurement (~15 min)
    python bench/run.py --quick    # 2 rounds x 1 s (~2 min), to check the harness
    python bench/run.py --profile  # py-spy flamegraph + top functions of the sidecar

What runs: one C upstream (`src/upstream.c`, serving `bench.thrift`'s
``binary echo(1: binary data)``, framed and buffered detected per
connection) and, in front of it, for the whole run, HAProxy in TCP mode
(``tune.bufsize 65536``, one thread unless ``--haproxy-threads``) and the
sidecar (``python -m sidecar run``, default pipeline: retry policy,
breaker, fallback cache; uvloop). The C load generator (`src/loadgen.c`)
drives one target at a time.

What is measured, per case (client connections x payload x transport) and
target: closed-loop calls/s, p50/p99 latency, and the proxy process's CPU
time per call (user+system from /proc/PID/stat before and after the run,
divided by every good reply of the run, warm-up included); the upstream's
and the load generator's CPU too, to show they are not the limit. Then an
open-loop run at a fixed total rate (default 3000 calls/s over 16
connections, 64 B) whose latency is counted from each call's intended send
time; the added p50 of a proxy is its p50 minus direct's in the same round.

Rounds are interleaved: every round runs every case on every target, the
targets' order rotating from round to round (A B C, B C A, C A B, ...), so
slow drift on a shared machine lands on all targets alike. Figures are
medians over rounds. Every process is ended by its PID.

Output: markdown tables on stdout; JSON (every run, the medians, the
tables, machine facts) and the markdown in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchtools import (
    HOST,
    REPO_ROOT,
    RESULTS_DIR,
    build_tools,
    explain_failure,
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

TARGETS = ("direct", "haproxy", "sidecar")
HAPROXY = "/usr/sbin/haproxy"

# The goals for the sidecar relative to HAProxy (figures, not asserts).
GOAL_THROUGHPUT_RATIO = 0.6  # at least, 16 connections, 64 B, framed
GOAL_CPU_RATIO = 2.0  # at most, same case
GOAL_ADDED_P50_RATIO = 2.0  # at most, open loop at the fixed rate
GOAL_BUFFERED_RATIO = 0.8  # buffered throughput at least this share of framed

HAPROXY_CONFIG = """\
global
    nbthread {threads}
    maxconn 4096
    # The default 16 KiB buffer splits 16 KiB messages (design.md section 10).
    tune.bufsize 65536

defaults
    mode tcp
    timeout connect 2s
    timeout client 1m
    timeout server 1m

frontend bench
    bind {host}:{port}
    default_backend upstream

backend upstream
    server up {host}:{upstream_port}
"""


@dataclass(frozen=True)
class Case:
    """One load shape: closed loop when ``rate`` is 0, else open loop at ``rate`` calls/s."""

    conns: int
    payload: int
    transport: str
    rate: float = 0.0

    @property
    def label(self) -> str:
        mode = f"open {self.rate:g}/s" if self.rate else "closed"
        return f"{self.conns} conn {payload_label(self.payload)} {self.transport} {mode}"


@dataclass
class Target:
    """Where the load generator connects; ``proc`` is the proxy whose CPU is measured."""

    name: str
    port: int
    proc: subprocess.Popen[Any] | None


def payload_label(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


# --- targets -----------------------------------------------------------------


@contextlib.contextmanager
def haproxy_target(workdir: Path, upstream_port: int, threads: int) -> Iterator[Target]:
    """HAProxy in TCP mode in front of the upstream, config generated into ``workdir``."""
    binary = shutil.which("haproxy") or HAPROXY
    port = free_port()
    config = workdir / "haproxy.cfg"
    config.write_text(
        HAPROXY_CONFIG.format(threads=threads, host=HOST, port=port, upstream_port=upstream_port)
    )
    log = (workdir / "haproxy.log").open("w")
    proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
    try:
        with explain_failure(workdir / "haproxy.log"):
            wait_for_port(port, proc)
        yield Target("haproxy", port, proc)
    finally:
        stop_process(proc)
        log.close()


@contextlib.contextmanager
def sidecar_target(
    workdir: Path, upstream_port: int, config: str | None = None
) -> Iterator[Target]:
    """The sidecar, run as users run it, in front of the upstream.

    ``config`` is an optional YAML file for a variant; the flags given here
    (listen, upstream, metrics address) override it.
    """
    program = ["-m", "sidecar", "run"]
    if config:
        program += ["--config", str(Path(config).resolve())]
    with sidecar_process(program, upstream_port, workdir / "sidecar.log") as sidecar:
        yield Target("sidecar", sidecar.port, sidecar.proc)


def uses_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension mapped (i.e. runs on uvloop)."""
    try:
        return "uvloop" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


# --- measuring -----------------------------------------------------------------


def measure(
    target: Target,
    case: Case,
    *,
    loadgen: Path,
    upstream_pid: int,
    duration: float,
    warmup: float,
    cpu_of: Callable[[int], tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """One load generator run against one target, with CPU deltas around it.

    ``cpu_of`` reads a PID's CPU seconds (`benchtools.measured_load`).
    """
    watch = {"upstream": upstream_pid}
    if target.proc is not None:
        watch["proxy"] = target.proc.pid
    run = measured_load(
        loadgen,
        target.port,
        watch,
        cpu_of,
        conns=case.conns,
        payload=case.payload,
        transport=case.transport,
        duration=duration,
        warmup=warmup,
        rate=case.rate,
    )
    proxied = "proxy" in watch
    proxy_user, proxy_sys = run.cpu.get("proxy", (0.0, 0.0))
    proxy_cpu = proxy_user + proxy_sys
    up_cpu = run.cpu_seconds("upstream")
    loadgen_cpu = run.report["cpu_s"]
    return {
        "target": target.name,
        **asdict(case),
        **run.figures(),
        "proxy_cpu_per_call_us": run.per_call_us(proxy_cpu) if proxied else None,
        "proxy_user_per_call_us": run.per_call_us(proxy_user) if proxied else None,
        "proxy_sys_per_call_us": run.per_call_us(proxy_sys) if proxied else None,
        "upstream_cpu_per_call_us": run.per_call_us(up_cpu),
        "loadgen_cpu_per_call_us": run.per_call_us(loadgen_cpu),
        "proxy_core_share": run.core_share(proxy_cpu) if proxied else None,
        "upstream_core_share": run.core_share(up_cpu),
        "loadgen_core_share": run.core_share(loadgen_cpu),
        # Busy CPU of everything else on the machine (other users: noise).
        "others_core_share": run.others_core_share,
        "loadgen": run.report,
    }


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


METRICS = (
    "calls_per_s",
    "p50_us",
    "p99_us",
    "proxy_cpu_per_call_us",
    "proxy_user_per_call_us",
    "proxy_sys_per_call_us",
    "upstream_cpu_per_call_us",
    "loadgen_cpu_per_call_us",
    "proxy_core_share",
    "upstream_core_share",
    "loadgen_core_share",
    "others_core_share",
)


def summarize(runs: list[dict[str, Any]], cases: list[Case], targets: list[str]) -> dict[str, Any]:
    """Medians per (case, target), plus paired added-p50 for open-loop cases."""
    out: dict[str, Any] = {}
    for case in cases:
        of_case = [
            r for r in runs if Case(r["conns"], r["payload"], r["transport"], r["rate"]) == case
        ]
        entry: dict[str, Any] = {"case": asdict(case), "targets": {}}
        for name in targets:
            mine = [r for r in of_case if r["target"] == name]
            if not mine:
                continue
            stats: dict[str, Any] = {m: median([r[m] for r in mine]) for m in METRICS}
            stats["rounds"] = len(mine)
            stats["errors"] = sum(r["errors"] for r in mine)
            stats["calls_per_s_min"] = min(r["calls_per_s"] for r in mine)
            stats["calls_per_s_max"] = max(r["calls_per_s"] for r in mine)
            entry["targets"][name] = stats
        if case.rate and "direct" in targets:
            # Added p50: target minus direct within the same round, then the median.
            direct = {r["round"]: r["p50_us"] for r in of_case if r["target"] == "direct"}
            for name in targets:
                if name == "direct" or name not in entry["targets"]:
                    continue
                diffs = [
                    r["p50_us"] - direct[r["round"]]
                    for r in of_case
                    if r["target"] == name and r["round"] in direct
                ]
                entry["targets"][name]["added_p50_us"] = median(list(diffs))
        out[case.label] = entry
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def stat(summary: dict[str, Any], case: Case, target: str, metric: str) -> float | None:
    entry = summary.get(case.label, {}).get("targets", {}).get(target)
    return entry.get(metric) if entry else None


# --- report --------------------------------------------------------------------


def render(summary: dict[str, Any], cases: list[Case], meta: dict[str, Any]) -> str:
    """Markdown tables of the medians and ratios."""
    closed = [c for c in cases if not c.rate]
    opened = [c for c in cases if c.rate]

    def s(case: Case, target: str, metric: str) -> float | None:
        return stat(summary, case, target, metric)

    lines = [
        f"Benchmark {meta['started']}: {meta['rounds']} interleaved rounds, "
        f"{meta['duration_s']:g} s per measurement after {meta['warmup_s']:g} s warm-up; "
        f"medians. {meta['cpus']} CPUs, load average before {meta['loadavg_before']}. "
        f"HAProxy {meta['haproxy_threads']} thread(s), sidecar on "
        f"{'uvloop' if meta.get('sidecar_uvloop') else 'asyncio'}.",
        "",
        "Closed loop (max throughput). CPU = proxy process CPU time per call; "
        "p50/p99 in µs as direct / haproxy / sidecar.",
        "",
        "| conns | payload | transport | direct calls/s | haproxy calls/s | sidecar calls/s "
        "| sidecar/haproxy | haproxy CPU µs/call | sidecar CPU µs/call | CPU ratio "
        "| p50 µs d/h/s | p99 µs d/h/s | errors |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for c in closed:
        thr = {t: s(c, t, "calls_per_s") for t in TARGETS}
        cpu = {t: s(c, t, "proxy_cpu_per_call_us") for t in ("haproxy", "sidecar")}
        p50 = " / ".join(fmt(s(c, t, "p50_us")) for t in TARGETS)
        p99 = " / ".join(fmt(s(c, t, "p99_us")) for t in TARGETS)
        errors = sum(int(s(c, t, "errors") or 0) for t in TARGETS)
        lines.append(
            f"| {c.conns} | {payload_label(c.payload)} | {c.transport} "
            f"| {fmt(thr['direct'])} | {fmt(thr['haproxy'])} | {fmt(thr['sidecar'])} "
            f"| {fmt(ratio(thr['sidecar'], thr['haproxy']), 2)} "
            f"| {fmt(cpu['haproxy'], 1)} | {fmt(cpu['sidecar'], 1)} "
            f"| {fmt(ratio(cpu['sidecar'], cpu['haproxy']), 2)} | {p50} | {p99} | {errors} |"
        )
    if opened:
        lines += [
            "",
            "Open loop at a fixed rate; latency from each call's intended send time; "
            "added = target p50 minus direct p50 in the same round (median of rounds). "
            "CPU per call here is at the same offered load for both proxies (in the closed "
            "loop each proxy runs at its own maximum, where more events per wake-up make "
            "calls cheaper).",
            "",
            "| rate/s | conns | payload | transport | p50 µs d/h/s | p99 µs d/h/s "
            "| haproxy added p50 µs | sidecar added p50 µs | added ratio "
            "| haproxy CPU µs/call | sidecar CPU µs/call | CPU ratio | errors |",
            "|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in opened:
            added_h = s(c, "haproxy", "added_p50_us")
            added_s = s(c, "sidecar", "added_p50_us")
            p50 = " / ".join(fmt(s(c, t, "p50_us")) for t in TARGETS)
            p99 = " / ".join(fmt(s(c, t, "p99_us")) for t in TARGETS)
            errors = sum(int(s(c, t, "errors") or 0) for t in TARGETS)
            cpu_h = s(c, "haproxy", "proxy_cpu_per_call_us")
            cpu_s = s(c, "sidecar", "proxy_cpu_per_call_us")
            lines.append(
                f"| {c.rate:g} | {c.conns} | {payload_label(c.payload)} | {c.transport} "
                f"| {p50} | {p99} | {fmt(added_h)} | {fmt(added_s)} "
                f"| {fmt(ratio(added_s, added_h), 2)} | {fmt(cpu_h, 1)} | {fmt(cpu_s, 1)} "
                f"| {fmt(ratio(cpu_s, cpu_h), 2)} | {errors} |"
            )
    pairs = [
        (f, b)
        for f in closed
        for b in closed
        if f.transport == "framed"
        and b.transport == "buffered"
        and (f.conns, f.payload) == (b.conns, b.payload)
    ]
    if pairs:
        lines += [
            "",
            "Buffered throughput as a share of framed (closed loop).",
            "",
            "| conns | payload | haproxy buffered/framed | sidecar buffered/framed |",
            "|---:|---:|---:|---:|",
        ]
        for f, b in pairs:
            hb = ratio(s(b, "haproxy", "calls_per_s"), s(f, "haproxy", "calls_per_s"))
            sb = ratio(s(b, "sidecar", "calls_per_s"), s(f, "sidecar", "calls_per_s"))
            lines.append(
                f"| {f.conns} | {payload_label(f.payload)} | {fmt(hb, 2)} | {fmt(sb, 2)} |"
            )
    lines += [
        "",
        "Headroom: share of one core used during each closed-loop run by the load generator "
        "/ upstream / proxy, and by everything else on the machine (others: noise); "
        "direct throughput over the best proxied throughput; the proxies' CPU per call "
        "split into user / system µs.",
        "",
        "| conns | payload | transport | direct lg/up | haproxy lg/up/proxy "
        "| sidecar lg/up/proxy | others d/h/s | direct ÷ best proxy "
        "| haproxy user/sys µs | sidecar user/sys µs |",
        "|---:|---:|---|---|---|---|---|---:|---|---|",
    ]
    for c in closed:
        shares = {}
        for t in TARGETS:
            parts = [s(c, t, "loadgen_core_share"), s(c, t, "upstream_core_share")]
            if t != "direct":
                parts.append(s(c, t, "proxy_core_share"))
            shares[t] = " / ".join(pct(p) for p in parts)
        best = max(
            (v for v in (s(c, t, "calls_per_s") for t in ("haproxy", "sidecar")) if v), default=None
        )
        others = " / ".join(pct(s(c, t, "others_core_share")) for t in TARGETS)
        split = {
            t: f"{fmt(s(c, t, 'proxy_user_per_call_us'), 1)} / "
            f"{fmt(s(c, t, 'proxy_sys_per_call_us'), 1)}"
            for t in ("haproxy", "sidecar")
        }
        lines.append(
            f"| {c.conns} | {payload_label(c.payload)} | {c.transport} | {shares['direct']} "
            f"| {shares['haproxy']} | {shares['sidecar']} | {others} "
            f"| {fmt(ratio(s(c, 'direct', 'calls_per_s'), best), 1)} "
            f"| {split['haproxy']} | {split['sidecar']} |"
        )
    lines += ["", *goal_lines(summary, closed, opened)]
    return "\n".join(lines) + "\n"


def goal_lines(summary: dict[str, Any], closed: list[Case], opened: list[Case]) -> list[str]:
    """The issue's goals, each with its measured figure (not asserts)."""

    def s(case: Case, target: str, metric: str) -> float | None:
        return stat(summary, case, target, metric)

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "NOT met")

    out = ["| goal (sidecar vs HAProxy) | measured | verdict |", "|---|---:|---|"]
    key = Case(16, 64, "framed")
    if key in closed:
        thr = ratio(s(key, "sidecar", "calls_per_s"), s(key, "haproxy", "calls_per_s"))
        cpu = ratio(
            s(key, "sidecar", "proxy_cpu_per_call_us"), s(key, "haproxy", "proxy_cpu_per_call_us")
        )
        out.append(
            f"| throughput ≥ {GOAL_THROUGHPUT_RATIO}x at 16 conns 64 B framed | {fmt(thr, 2)}x "
            f"| {verdict(None if thr is None else thr >= GOAL_THROUGHPUT_RATIO)} |"
        )
        out.append(
            f"| CPU per call ≤ {GOAL_CPU_RATIO}x at 16 conns 64 B framed | {fmt(cpu, 2)}x "
            f"| {verdict(None if cpu is None else cpu <= GOAL_CPU_RATIO)} |"
        )
    for c in opened:
        added = ratio(s(c, "sidecar", "added_p50_us"), s(c, "haproxy", "added_p50_us"))
        out.append(
            f"| added p50 ≤ {GOAL_ADDED_P50_RATIO}x at {c.rate:g}/s, {c.conns} conns "
            f"{payload_label(c.payload)} {c.transport} | {fmt(added, 2)}x "
            f"| {verdict(None if added is None else added <= GOAL_ADDED_P50_RATIO)} |"
        )
    for b in closed:
        f = Case(b.conns, b.payload, "framed")
        if b.transport != "buffered" or f not in closed:
            continue
        share = ratio(s(b, "sidecar", "calls_per_s"), s(f, "sidecar", "calls_per_s"))
        out.append(
            f"| buffered ≥ {GOAL_BUFFERED_RATIO}x framed at {b.conns} conns "
            f"{payload_label(b.payload)} | {fmt(share, 2)}x "
            f"| {verdict(None if share is None else share >= GOAL_BUFFERED_RATIO)} |"
        )
    return out


def machine_facts() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "unavailable"
        return (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else ""

    try:
        uvloop_version: str | None = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = None
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": version([shutil.which("haproxy") or HAPROXY, "-v"]),
        "gcc": version(["gcc", "--version"]),
        "uvloop": uvloop_version,
        "git_commit": version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "loadavg_before": loadavg(),
    }


# --- profiling -----------------------------------------------------------------


def profile(args: argparse.Namespace) -> int:
    """Run the sidecar under py-spy during a 16-connection framed 64 B closed-loop run."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print(
            "py-spy is missing: pip install py-spy (it is in the project's `bench` extra)",
            file=sys.stderr,
        )
        return 2
    tools = build_tools()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    svg = RESULTS_DIR / f"profile-{stamp}.svg"
    raw = RESULTS_DIR / f"profile-{stamp}.raw.txt"
    top = RESULTS_DIR / f"profile-{stamp}.top.txt"
    seconds = args.profile_seconds
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as tmp,
        upstream_server(tools["upstream"], threads=args.upstream_threads) as (_, up_port),
        sidecar_target(Path(tmp), up_port, args.sidecar_config) as target,
    ):
        assert target.proc is not None
        pid = target.proc.pid
        # Load for both recordings (flamegraph, then raw) plus margin.
        load = subprocess.Popen(
            [
                str(tools["loadgen"]),
                "--port",
                str(target.port),
                "--conns",
                "16",
                "--payload",
                "64",
                "--transport",
                "framed",
                "--warmup",
                "0.5",
                "--duration",
                str(2 * seconds + 2),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            time.sleep(1.0)  # the load generator's warm-up, and the sidecar's pool filling
            native = ["--native"] if args.profile_native else []
            for fmt_name, path in (("flamegraph", svg), ("raw", raw)):
                spy = subprocess.run(
                    [
                        py_spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        "250",
                        "--duration",
                        str(seconds),
                        "--format",
                        fmt_name,
                        "--output",
                        str(path),
                        *native,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=seconds + 60,
                    check=False,
                )
                if spy.returncode != 0:
                    print(f"py-spy failed: {spy.stderr.strip()}", file=sys.stderr)
                    return 1
            out, _ = load.communicate(timeout=2 * seconds + 30)
        finally:
            if load.poll() is None:
                stop_process(load)
    report = json.loads(out)
    text = top_functions(raw.read_text())
    header = (
        f"py-spy of the sidecar (pid {pid}) under 16 connections, 64 B, framed, closed loop; "
        f"{seconds:g} s at 250 samples/s{' with native frames' if args.profile_native else ''}.\n"
        f"Throughput while profiled: {report['calls_per_s']:,.0f} calls/s, "
        f"errors {report['errors']} (py-spy pauses the process to sample: this is lower "
        f"than unprofiled).\n\n"
    )
    top.write_text(header + text)
    print(header + text)
    print(f"flamegraph: {svg}\nraw stacks: {raw}\ntop functions: {top}")
    return 0


def top_functions(raw: str, limit: int = 30) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) stacks."""
    own: dict[str, int] = {}
    own_line: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        own_line[leaf] = own_line.get(leaf, 0) + count
        frames = [strip_line(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            incl[name] = incl.get(name, 0) + count
    if not total:
        return "no samples\n"

    def table(title: str, counts: dict[str, int]) -> list[str]:
        rows = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
        return [title, *(f"{100 * n / total:6.1f}%  {name}" for name, n in rows), ""]

    lines = [f"{total} samples (the process was busy in all of them; idle time is not sampled)", ""]
    lines += table("Self time (the function itself was running):", own)
    lines += table("Inclusive time (the function was on the stack):", incl)
    lines += table("Self time by source line (where in the function):", own_line)
    return "\n".join(lines)


def strip_line(frame: str) -> str:
    """``func (path/file.py:123)`` -> ``func (path/file.py)``: aggregate per function."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"


# --- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = round_parser(__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help="subset of direct,haproxy,sidecar")
    p.add_argument("--conns", default="1,16,64", help="client connection counts")
    p.add_argument("--payloads", default="64,16384", help="payload sizes in bytes")
    p.add_argument("--transports", default="framed,buffered")
    p.add_argument("--rate", type=float, default=3000.0, help="open-loop calls/s (0: skip)")
    p.add_argument("--rate-conns", type=int, default=16)
    p.add_argument("--rate-payload", type=int, default=64)
    p.add_argument("--haproxy-threads", type=int, default=1, help="HAProxy nbthread [1]")
    p.add_argument("--upstream-threads", type=int, default=1, help="C upstream threads [1]")
    p.add_argument("--sidecar-config", help="YAML config for a sidecar variant")
    p.add_argument("--profile", action="store_true", help="py-spy the sidecar instead")
    p.add_argument("--profile-seconds", type=int, default=10)
    p.add_argument("--profile-native", action="store_true", help="include C frames (uvloop)")
    return round_defaults(p.parse_args(argv))


def build_cases(args: argparse.Namespace) -> list[Case]:
    transports = args.transports.split(",")
    cases = [
        Case(int(c), int(p), t)
        for c in args.conns.split(",")
        for p in args.payloads.split(",")
        for t in transports
    ]
    if args.rate:
        cases += [Case(args.rate_conns, args.rate_payload, t, args.rate) for t in transports]
    return cases


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.profile:
        return profile(args)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        print(f"unknown targets: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    cases = build_cases(args)
    tools = build_tools()
    meta: dict[str, Any] = {
        **round_meta(args),
        "haproxy_threads": args.haproxy_threads,
        "upstream_threads": args.upstream_threads,
        "targets": targets,
        "sidecar_config": args.sidecar_config,
        **machine_facts(),
    }
    runs: list[dict[str, Any]] = []
    total = args.rounds * len(cases) * len(targets)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        up_proc, up_port = stack.enter_context(
            upstream_server(tools["upstream"], threads=args.upstream_threads)
        )
        live: dict[str, Target] = {}
        if "direct" in targets:
            live["direct"] = Target("direct", up_port, None)
        if "haproxy" in targets:
            live["haproxy"] = stack.enter_context(
                haproxy_target(tmp, up_port, args.haproxy_threads)
            )
        if "sidecar" in targets:
            live["sidecar"] = stack.enter_context(sidecar_target(tmp, up_port, args.sidecar_config))
            assert live["sidecar"].proc is not None
            meta["sidecar_uvloop"] = uses_uvloop(live["sidecar"].proc.pid)
        done = 0
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for case in cases:
                for name in order:
                    done += 1
                    run = measure(
                        live[name],
                        case,
                        loadgen=tools["loadgen"],
                        upstream_pid=up_proc.pid,
                        duration=args.duration,
                        warmup=args.warmup,
                    )
                    run["round"] = rnd
                    runs.append(run)
                    progress(done, total, run)
    meta["loadavg_after"] = loadavg()
    summary = summarize(runs, cases, targets)
    markdown = render(summary, cases, meta)
    print(markdown)
    payload = {"meta": meta, "summary": summary, "runs": runs, "markdown": markdown}
    save_results("bench", args.quick, payload)
    return 0


def progress(done: int, total: int, run: dict[str, Any]) -> None:
    cpu = run["proxy_cpu_per_call_us"]
    case = Case(run["conns"], run["payload"], run["transport"], run["rate"])
    print(
        f"[{done}/{total}] round {run['round'] + 1} {run['target']:8s} {case.label}: "
        f"{run['calls_per_s']:,.0f} calls/s, p50 {run['p50_us']:,.0f} µs, "
        f"p99 {run['p99_us']:,.0f} µs"
        + (f", {cpu:.1f} µs CPU/call" if cpu is not None else "")
        + (f", {run['errors']} ERRORS" if run["errors"] else ""),
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
