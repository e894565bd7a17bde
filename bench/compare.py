"""Two versions of the sidecar side by side: this checkout against another one.

Usage (from the repository root, with the project's environment):

    git worktree add /tmp/sidecar-before <commit>     # the version to compare with
    python bench/compare.py --before /tmp/sidecar-before [--rounds 5] [--duration 3]
    python bench/compare.py --before /tmp/pure --after /tmp/compiled --config cache.yaml \
        --cases framed:64,framed:16384

``--after`` is the checkout compared (this one by default); ``--config`` a
YAML file both sidecars run with (the default configuration otherwise);
``--cases`` TRANSPORT:PAYLOAD[:RATE] (default framed and buffered, 64 B,
closed loop; a RATE runs the load generator's open loop at that many calls/s).

Both sidecars run ``python -m sidecar run`` with the default pipeline in
front of the same C upstream (`src/upstream.c`), each from its own checkout
(``PYTHONPATH``), both started for the whole run. The C load generator drives
one at a time, in interleaved rounds (A B, B A, ...), for each case (16
connections, 64 B, framed and buffered). Figures are medians over rounds:
calls/s, the sidecar's CPU µs per call (user + system from /proc), p50. The
checkouts must share this environment's dependencies. Every process is ended
by its PID. The CPU split into user and system time is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import REPO_ROOT, build_tools, measured_load, sidecar_process, upstream_server

PROGRAM = ["-m", "sidecar", "run", "--log-level", "warning"]
CASES = "framed:64,buffered:64"


def parse_cases(spec: str) -> list[tuple[str, int, float]]:
    """``TRANSPORT:PAYLOAD[:RATE],...`` into (transport, payload, rate); rate 0: closed loop."""
    cases = []
    for item in filter(None, spec.split(",")):
        parts = item.split(":")
        ok = len(parts) in (2, 3) and parts[0] in ("framed", "buffered") and parts[1].isdigit()
        try:
            rate = float(parts[2]) if ok and len(parts) == 3 else 0.0
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"bad case {item!r}: framed|buffered:PAYLOAD[:RATE]")
        cases.append((parts[0], int(parts[1]), rate))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--after", type=Path, default=REPO_ROOT, help="[this checkout]")
    parser.add_argument("--config", type=Path, help="YAML config both sidecars run with")
    parser.add_argument("--cases", default=CASES, help="TRANSPORT:PAYLOAD[:RATE],... [%(default)s]")
    args = parser.parse_args()
    try:
        cases = parse_cases(args.cases)
    except ValueError as exc:
        parser.error(str(exc))
    sources = {"before": args.before.resolve(), "after": args.after.resolve()}
    for kind, path in sources.items():
        if not (path / "sidecar").is_dir():
            parser.error(f"{kind}: {path} is not a checkout of the sidecar (no sidecar/ in it)")
    program = PROGRAM + (["--config", str(args.config.resolve())] if args.config else [])
    tools = build_tools()
    kinds = ("before", "after")
    results: dict[tuple[str, str, int, float], list[dict[str, float]]] = {}
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory() as tmp,
        upstream_server(tools["upstream"]) as (_, up_port),
        contextlib.ExitStack() as stack,
    ):
        live = {
            k: stack.enter_context(
                sidecar_process(
                    program, up_port, Path(tmp) / f"{k}.log", timeout=20.0, source=sources[k]
                )
            )
            for k in kinds
        }
        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else kinds[::-1]
            for transport, payload, rate in cases:
                for kind in order:
                    run = measured_load(
                        tools["loadgen"],
                        live[kind].port,
                        {kind: live[kind].proc.pid},
                        conns=args.conns,
                        payload=payload,
                        transport=transport,
                        duration=args.duration,
                        warmup=args.warmup,
                        rate=rate,
                    )
                    report = run.report
                    if report["errors"]:
                        raise RuntimeError(f"{kind}: {report['errors']} errors: {report}")
                    row = {
                        "calls_per_s": report["calls_per_s"],
                        "cpu_us": run.per_call_us(run.cpu_seconds(kind)),
                        "user_us": run.per_call_us(run.cpu[kind][0]),
                        "sys_us": run.per_call_us(run.cpu[kind][1]),
                        "p50_us": report["latency_us"]["p50"],
                    }
                    results.setdefault((kind, transport, payload, rate), []).append(row)
                    print(
                        f"round {round_no + 1} {transport:8} {payload:6} B {rate:g}/s {kind:6} "
                        f"{row['calls_per_s']:>9,.0f} calls/s {row['cpu_us']:5.1f} us CPU/call "
                        f"p50 {row['p50_us']:.0f} us",
                        flush=True,
                    )
    load_after = os.getloadavg()
    print(
        f"\nBefore ({sources['before']}) and after ({sources['after']}): {args.rounds} "
        f"interleaved rounds x {args.duration:g} s, {args.conns} connections"
        f"{f', config {args.config}' if args.config else ''}; medians. "
        f"Load average before: {load_before[0]:.2f}, after: {load_after[0]:.2f}.\n"
    )
    print(
        "| case | before calls/s | after calls/s | after/before | CPU µs/call before / after "
        "| after/before CPU | user/sys µs before | user/sys µs after |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for transport, payload, rate in cases:
        med = {
            k: {
                m: statistics.median(r[m] for r in results[(k, transport, payload, rate)])
                for m in ("calls_per_s", "cpu_us", "user_us", "sys_us")
            }
            for k in kinds
        }
        ratio = med["after"]["calls_per_s"] / med["before"]["calls_per_s"]
        cpu_ratio = med["after"]["cpu_us"] / med["before"]["cpu_us"]
        print(
            f"| {payload} B {transport}{f' at {rate:g}/s' if rate else ''} | "
            f"{med['before']['calls_per_s']:,.0f} | "
            f"{med['after']['calls_per_s']:,.0f} | {ratio:.2f} | "
            f"{med['before']['cpu_us']:.1f} / {med['after']['cpu_us']:.1f} | {cpu_ratio:.2f} | "
            f"{med['before']['user_us']:.1f} / {med['before']['sys_us']:.1f} | "
            f"{med['after']['user_us']:.1f} / {med['after']['sys_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
