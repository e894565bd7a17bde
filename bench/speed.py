"""Issue 12's figures: the sidecar with its fallback cache on, against HAProxy and direct.

Usage (from the repository root, with the project's environment):

    python bench/speed.py                 # 5 interleaved rounds x 3 s (~10 min)
    python bench/speed.py --rounds 3      # the same, 3 rounds (~6 min)
    python bench/speed.py --quick         # 2 rounds x 1 s (~1.5 min): checks the harness
    python bench/speed.py --source /tmp/other-checkout   # sidecars of another checkout
    scripts/build-compiled && python bench/speed.py      # with the compiled build's rows

One C upstream (`src/upstream.c`) and, in front of it for the whole run,
HAProxy in TCP mode (`run.py`'s configuration) and one sidecar per variant:

- ``sidecar``: the default configuration. ``echo`` (the only method the
  load generator calls) is not idempotent by default, so no reply is cached:
  the issue's baseline.
- ``cached``: the same with ``retry.idempotent: [echo]``, which makes
  ``echo`` cacheable (``fallback.methods`` is null: the idempotent methods);
  the fallback cache (memory) stores every reply, and as every call of the
  load generator carries the same arguments, every store replaces the entry
  a moment old. The self-check (`test_bench_tools.py`) shows the entry is
  there after a run.
- ``cached-w2``: ``cached`` with ``workers: 2``. Measured only when the
  checkout's configuration accepts the key (``sidecar check-config``);
  otherwise the report says it was not measured and why. Its CPU is that of
  the whole process tree (`benchtools.tree_cpu_times`).
- ``cached-mypyc`` and ``cached-mypyc-w2``: ``cached`` and ``cached-w2``
  run from the compiled build of the checkout (``--compiled``, by default
  ``.build/compiled``, which scripts/build-compiled makes; what the image
  runs, docs/compiled.md). Measured only when that directory holds a
  complete compiled build (``sidecar.native.build()`` says ``mypyc``);
  otherwise the report says why not.
- ``passthrough-mypyc``: `passthrough.py` from the compiled build, with its
  bare forward (`sidecar.proxy.forward`) compiled with it: the same compiled
  server, decoders, upstream pool and seqid rewrite with the call's
  pipeline replaced by one exchange (no breaker, budget, retry, cache or
  per-call metrics). Not a goal's target: the floor under the pipeline in
  this design, so that the distance from ``cached-mypyc`` to it is what the
  pipeline costs, and the distance from it to HAProxy what the connections
  in Python, uvloop and the kernel cost, in the same run.
- ``tcp-uvloop``: `tcp_floor.py`, a plain TCP proxy in Python on uvloop
  (one upstream connection per client, every read written on as it came:
  HAProxy's job, with none of the sidecar's). Not a goal's target: the floor
  of the platform the sidecar is built on, so that the distance from
  HAProxy to it is what CPython and uvloop cost per read, and the distance
  from it to the sidecar what the sidecar's own work costs.

Cases (the issue's list; ``--cases`` changes it): closed loop at 16
connections framed, 64 connections framed and 16 connections buffered, each
with 64 B and 16 KiB arguments; open loop at a fixed 3,000 calls/s over 16
connections, framed, 64 B and 16 KiB, where CPU per call and the added p50
(a target's p50 minus direct's in the same round) compare the proxies at the
same offered load. Every round runs every case on every target, the order
of targets rotating; figures are medians over rounds, and the load average
is recorded at every round's start. Every process is ended by its PID.

Output: markdown on stdout; JSON and markdown in ``bench/results/speed-*``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import (
    REPO_ROOT,
    build_tools,
    cpu_times,
    loadavg,
    round_defaults,
    round_meta,
    round_parser,
    save_results,
    sidecar_process,
    tree_cpu_times,
    upstream_server,
)
from run import (
    Case,
    Target,
    fmt,
    haproxy_target,
    machine_facts,
    measure,
    payload_label,
    ratio,
    stat,
    summarize,
    uses_uvloop,
)

# The load generator calls `echo`; this makes it idempotent, hence cacheable.
CACHE_CONFIG = """\
# echo is safe to repeat: retried after send and, since fallback.methods is
# null, cached (every good reply stored in the memory fallback cache).
retry:
  idempotent: ["echo"]
fallback:
  cache:
    backend: memory
"""
WORKERS_LINE = "workers: 2\n"
PASSTHROUGH = Path(__file__).resolve().parent / "passthrough.py"
TCP_FLOOR = Path(__file__).resolve().parent / "tcp_floor.py"


@dataclass(frozen=True)
class Variant:
    """A sidecar configuration under test: its name in the tables and its YAML."""

    name: str
    config: str | None
    # True when the sidecar runs worker processes: CPU of the whole tree.
    tree: bool = False
    # True: run from the compiled build (--compiled), not from --source.
    compiled: bool = False
    # What follows ``python``: the sidecar itself unless a script is named.
    program: tuple[str, ...] = ("-m", "sidecar", "run", "--log-level", "warning")


VARIANTS = (
    Variant("sidecar", None),
    Variant("cached", CACHE_CONFIG),
    Variant("cached-w2", CACHE_CONFIG + WORKERS_LINE, tree=True),
    Variant("cached-mypyc", CACHE_CONFIG, compiled=True),
    Variant("cached-mypyc-w2", CACHE_CONFIG + WORKERS_LINE, tree=True, compiled=True),
    Variant(
        "passthrough-mypyc",
        None,
        compiled=True,
        program=(str(PASSTHROUGH),),
    ),
    Variant("tcp-uvloop", None, program=(str(TCP_FLOOR),)),
)
# The variant whose figures the goals are about.
MAIN = "cached"

DEFAULT_CASES = (
    "16:64:framed,16:16384:framed,64:64:framed,64:16384:framed,"
    "16:64:buffered,16:16384:buffered,16:64:framed:3000,16:16384:framed:3000"
)

# The goals for `MAIN` against HAProxy (figures, not asserts).
GOAL_THROUGHPUT = {64: 0.75, 16384: 0.7}  # at least, 16 conns framed, by payload
GOAL_CPU = 1.6  # at most, closed loop, every case
GOAL_SAME_WITHIN = 0.10  # 64 conns and buffered: within 10 % of the framed figure
GOAL_ADDED_P50 = 1.2  # at most, fixed rate
GOAL_CPU_FIXED = 1.5  # at most, fixed rate


def parse_cases(spec: str) -> list[Case]:
    """``CONNS:PAYLOAD:TRANSPORT[:RATE],...`` into cases (rate 0: closed loop).

    Raises:
        ValueError: a malformed item.
    """
    cases = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[2] not in ("framed", "buffered"):
            raise ValueError(f"bad case {item!r}: CONNS:PAYLOAD:framed|buffered[:RATE]")
        rate = float(parts[3]) if len(parts) == 4 else 0.0
        cases.append(Case(int(parts[0]), int(parts[1]), parts[2], rate))
    return cases


def config_accepted(text: str, source: Path, workdir: Path) -> tuple[bool, str]:
    """Whether ``sidecar check-config`` of ``source`` accepts the YAML ``text``.

    Returns:
        (accepted, the first line of its complaint when not).
    """
    path = workdir / "check.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(path)],
        cwd=source,
        env={"PYTHONPATH": str(source), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    complaint = (done.stderr or done.stdout).strip().splitlines()
    return done.returncode == 0, (complaint[0] if complaint else f"exit {done.returncode}")


def build_of(source: Path) -> str:
    """Which build a checkout's sidecar runs (`sidecar.native.build`), or why it cannot say."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sidecar.native as n; print(n.build())"],
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return "unknown (" + (probe.stderr.strip().splitlines() or ["no output"])[-1] + ")"
    return probe.stdout.strip()


@contextlib.contextmanager
def variant_target(
    variant: Variant,
    workdir: Path,
    upstream_port: int,
    source: Path,
    pythonpath: tuple[Path, ...] = (),
) -> Iterator[Target]:
    """One sidecar variant from ``source``, run as users run it."""
    program = list(variant.program)
    if variant.config is not None:
        path = workdir / f"{variant.name}.yaml"
        path.write_text(variant.config)
        program += ["--config", str(path)]
    log = workdir / f"{variant.name}.log"
    with sidecar_process(
        program, upstream_port, log, timeout=20.0, source=source, pythonpath=pythonpath
    ) as running:
        yield Target(variant.name, running.port, running.proc)


# --- report --------------------------------------------------------------------


def render(
    summary: dict[str, Any], cases: list[Case], targets: list[str], meta: dict[str, Any]
) -> str:
    """Markdown: closed-loop table, consistency table, fixed-rate table, goals."""

    def s(case: Case, target: str, metric: str) -> float | None:
        return stat(summary, case, target, metric)

    proxies = [t for t in targets if t != "direct"]
    sidecars = [t for t in proxies if t != "haproxy"]
    closed = [c for c in cases if not c.rate]
    opened = [c for c in cases if c.rate]
    rounds_load = "; ".join(meta.get("loadavg_rounds", []))
    lines = [
        f"Speed benchmark {meta['started']}: {meta['rounds']} interleaved rounds, "
        f"{meta['duration_s']:g} s per measurement after {meta['warmup_s']:g} s warm-up; "
        f"medians. {meta['cpus']} CPUs, Python {meta['python']}, {meta['haproxy']}, "
        f"kernel {meta['kernel']}; sidecars from {meta['source']} on "
        f"{'uvloop' if meta.get('sidecar_uvloop') else 'asyncio'}.",
        f"Load average before {meta['loadavg_before']}, after {meta.get('loadavg_after')}; "
        f"at each round's start: {rounds_load}.",
    ]
    if meta.get("not_measured"):
        lines += ["", *(f"Not measured: {why}" for why in meta["not_measured"])]
    names = " / ".join(targets)
    lines += [
        "",
        f"Closed loop. calls/s and p50 per target ({names}); CPU = the proxy process's "
        "user + system time per call; ratios against HAProxy.",
        "",
        "| conns | payload | transport | calls/s "
        + " | ".join(f"{t}" for t in targets)
        + " | "
        + " | ".join(f"{t}/haproxy" for t in sidecars)
        + " | CPU µs/call "
        + " / ".join(proxies)
        + " | "
        + " | ".join(f"{t} CPU ratio" for t in sidecars)
        + f" | {MAIN} user/sys µs | p50 µs | errors |",
        "|---:|---:|---|"
        + "---:|" * (len(targets) + len(sidecars))
        + "---|"
        + "---:|" * len(sidecars)
        + "---|---|---:|",
    ]
    for c in closed:
        thr = {t: s(c, t, "calls_per_s") for t in targets}
        cpu = {t: s(c, t, "proxy_cpu_per_call_us") for t in proxies}
        errors = sum(int(s(c, t, "errors") or 0) for t in targets)
        lines.append(
            f"| {c.conns} | {payload_label(c.payload)} | {c.transport} | "
            + " | ".join(fmt(thr[t]) for t in targets)
            + " | "
            + " | ".join(fmt(ratio(thr[t], thr.get("haproxy")), 2) for t in sidecars)
            + " | "
            + " / ".join(fmt(cpu[t], 1) for t in proxies)
            + " | "
            + " | ".join(fmt(ratio(cpu[t], cpu.get("haproxy")), 2) for t in sidecars)
            + f" | {fmt(s(c, MAIN, 'proxy_user_per_call_us'), 1)} / "
            f"{fmt(s(c, MAIN, 'proxy_sys_per_call_us'), 1)}"
            + " | "
            + " / ".join(fmt(s(c, t, "p50_us")) for t in targets)
            + f" | {errors} |"
        )
    if opened:
        lines += [
            "",
            "Open loop at a fixed rate; latency from each call's intended send time; added = "
            "target p50 minus direct p50 in the same round (median over rounds).",
            "",
            "| rate/s | conns | payload | transport | p50 µs "
            + " / ".join(targets)
            + " | p99 µs | added p50 µs "
            + " / ".join(proxies)
            + " | "
            + " | ".join(f"{t} added ratio" for t in sidecars)
            + " | CPU µs/call "
            + " / ".join(proxies)
            + " | "
            + " | ".join(f"{t} CPU ratio" for t in sidecars)
            + " | errors |",
            "|---:|---:|---:|---|---|---|---|"
            + "---:|" * len(sidecars)
            + "---|"
            + "---:|" * len(sidecars)
            + "---:|",
        ]
        for c in opened:
            added = {t: s(c, t, "added_p50_us") for t in proxies}
            cpu = {t: s(c, t, "proxy_cpu_per_call_us") for t in proxies}
            errors = sum(int(s(c, t, "errors") or 0) for t in targets)
            lines.append(
                f"| {c.rate:g} | {c.conns} | {payload_label(c.payload)} | {c.transport} | "
                + " / ".join(fmt(s(c, t, "p50_us")) for t in targets)
                + " | "
                + " / ".join(fmt(s(c, t, "p99_us")) for t in targets)
                + " | "
                + " / ".join(fmt(added[t]) for t in proxies)
                + " | "
                + " | ".join(fmt(ratio(added[t], added.get("haproxy")), 2) for t in sidecars)
                + " | "
                + " / ".join(fmt(cpu[t], 1) for t in proxies)
                + " | "
                + " | ".join(fmt(ratio(cpu[t], cpu.get("haproxy")), 2) for t in sidecars)
                + f" | {errors} |"
            )
    lines += ["", *goal_lines(summary, cases, targets)]
    return "\n".join(lines) + "\n"


def goal_lines(summary: dict[str, Any], cases: list[Case], targets: list[str]) -> list[str]:
    """The issue's goals for each cache-on variant, with the measured figure (not asserts)."""

    def s(case: Case, target: str, metric: str) -> float | None:
        return stat(summary, case, target, metric)

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("met" if ok else "NOT met")

    def vs_haproxy(case: Case, target: str, metric: str) -> float | None:
        return ratio(s(case, target, metric), s(case, "haproxy", metric))

    out = ["| goal (vs HAProxy) | target | measured | verdict |", "|---|---|---:|---|"]
    mains = [t for t in targets if t.startswith(MAIN)]
    if "haproxy" not in targets:
        return out
    for t in mains:
        for c in cases:
            if c.rate:
                continue
            cpu = vs_haproxy(c, t, "proxy_cpu_per_call_us")
            where = f"{c.conns} conns {payload_label(c.payload)} {c.transport}"
            if c.conns == 16 and c.transport == "framed" and c.payload in GOAL_THROUGHPUT:
                goal = GOAL_THROUGHPUT[c.payload]
                thr = vs_haproxy(c, t, "calls_per_s")
                out.append(
                    f"| throughput ≥ {goal}x, {where} | {t} | {fmt(thr, 2)}x "
                    f"| {verdict(None if thr is None else thr >= goal)} |"
                )
            else:
                base = Case(16, c.payload, "framed")
                here = vs_haproxy(c, t, "calls_per_s")
                framed = vs_haproxy(base, t, "calls_per_s")
                rel = ratio(here, framed)
                out.append(
                    f"| throughput ratio within {GOAL_SAME_WITHIN:.0%} of 16 conns framed, "
                    f"{where} | {t} | {fmt(here, 2)}x vs {fmt(framed, 2)}x ({fmt(rel, 2)}) "
                    f"| {verdict(None if rel is None else rel >= 1 - GOAL_SAME_WITHIN)} |"
                )
            out.append(
                f"| CPU per call ≤ {GOAL_CPU}x, {where} | {t} | {fmt(cpu, 2)}x "
                f"| {verdict(None if cpu is None else cpu <= GOAL_CPU)} |"
            )
        for c in cases:
            if not c.rate:
                continue
            where = f"{c.rate:g}/s {c.conns} conns {payload_label(c.payload)} {c.transport}"
            added = vs_haproxy(c, t, "added_p50_us")
            cpu = vs_haproxy(c, t, "proxy_cpu_per_call_us")
            out.append(
                f"| added p50 ≤ {GOAL_ADDED_P50}x, {where} | {t} | {fmt(added, 2)}x "
                f"| {verdict(None if added is None else added <= GOAL_ADDED_P50)} |"
            )
            out.append(
                f"| CPU per call ≤ {GOAL_CPU_FIXED}x, {where} | {t} | {fmt(cpu, 2)}x "
                f"| {verdict(None if cpu is None else cpu <= GOAL_CPU_FIXED)} |"
            )
    return out


# --- main ------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = round_parser(__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="CONNS:PAYLOAD:TRANSPORT[:RATE],...")
    p.add_argument(
        "--variants",
        default=",".join(v.name for v in VARIANTS),
        help="sidecar variants: " + ", ".join(v.name for v in VARIANTS),
    )
    p.add_argument("--no-direct", action="store_true", help="skip direct (no added p50)")
    p.add_argument("--no-haproxy", action="store_true", help="skip HAProxy (no ratios)")
    p.add_argument("--haproxy-threads", type=int, default=1)
    p.add_argument("--source", type=Path, default=REPO_ROOT, help="checkout the sidecars run")
    p.add_argument(
        "--compiled",
        type=Path,
        default=REPO_ROOT / ".build" / "compiled",
        help="compiled build the *-mypyc variants run (scripts/build-compiled) [%(default)s]",
    )
    return round_defaults(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cases = parse_cases(args.cases)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    chosen = [v for v in VARIANTS if v.name in args.variants.split(",")]
    source = args.source.resolve()
    compiled = args.compiled.resolve()
    tools = build_tools()
    meta: dict[str, Any] = {
        **round_meta(args),
        **machine_facts(),
        "source": str(source),
        "compiled": str(compiled),
        "variants": {v.name: v.config for v in chosen},
        "not_measured": [],
        "loadavg_rounds": [],
    }
    runs: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-speed-")))
        up_proc, up_port = stack.enter_context(upstream_server(tools["upstream"]))
        live: dict[str, Target] = {}
        if not args.no_direct:
            live["direct"] = Target("direct", up_port, None)
        if not args.no_haproxy:
            live["haproxy"] = stack.enter_context(
                haproxy_target(tmp, up_port, args.haproxy_threads)
            )
        tree_of: dict[str, bool] = {}
        compiled_build = build_of(compiled) if any(v.compiled for v in chosen) else ""
        for variant in chosen:
            if variant.compiled and compiled_build != "mypyc":
                meta["not_measured"].append(
                    f"`{variant.name}`: {compiled} is not a compiled build ({compiled_build}; "
                    "scripts/build-compiled makes one)"
                )
                continue
            where = compiled if variant.compiled else source
            if variant.config is not None:
                ok, why = config_accepted(variant.config, where, tmp)
                if not ok:
                    meta["not_measured"].append(
                        f"`{variant.name}`: this checkout's config refuses it ({why})"
                    )
                    continue
            target = stack.enter_context(variant_target(variant, tmp, up_port, where))
            live[variant.name] = target
            tree_of[variant.name] = variant.tree
            assert target.proc is not None
            meta["sidecar_uvloop"] = uses_uvloop(target.proc.pid)
        targets = list(live)
        total = args.rounds * len(cases) * len(targets)
        done = 0
        for rnd in range(args.rounds):
            meta["loadavg_rounds"].append(loadavg())
            order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
            for case in cases:
                for name in order:
                    done += 1
                    reader: Callable[[int], tuple[float, float]] = (
                        tree_cpu_times if tree_of.get(name) else cpu_times
                    )
                    run = measure(
                        live[name],
                        case,
                        loadgen=tools["loadgen"],
                        upstream_pid=up_proc.pid,
                        duration=args.duration,
                        warmup=args.warmup,
                        cpu_of=reader,
                    )
                    run["round"] = rnd
                    run["loadavg"] = loadavg()
                    runs.append(run)
                    progress(done, total, run)
    meta["loadavg_after"] = loadavg()
    summary = summarize(runs, cases, targets)
    markdown = render(summary, cases, targets, meta)
    print(markdown)
    save_results(
        "speed", args.quick, {"meta": meta, "summary": summary, "runs": runs, "markdown": markdown}
    )
    return 0


def progress(done: int, total: int, run: dict[str, Any]) -> None:
    cpu = run["proxy_cpu_per_call_us"]
    case = Case(run["conns"], run["payload"], run["transport"], run["rate"])
    print(
        f"[{done}/{total}] round {run['round'] + 1} {run['target']:9s} {case.label}: "
        f"{run['calls_per_s']:,.0f} calls/s, p50 {run['p50_us']:,.0f} µs"
        + (f", {cpu:.1f} µs CPU/call" if cpu is not None else "")
        + (f", {run['errors']} ERRORS" if run["errors"] else "")
        + f" (load {run['loadavg']})",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
