"""Two versions of the sidecar side by side: this checkout against another one.

Usage (from the repository root, with the project's environment):

    git worktree add /tmp/sidecar-before <commit>     # the version to compare with
    python bench/compare.py --before /tmp/sidecar-before [--rounds 5] [--duration 3]

Both sidecars run ``python -m sidecar run`` with the default pipeline in
front of the same C upstream (`src/upstream.c`), each from its own checkout
(``PYTHONPATH``), both started for the whole run. The C load generator drives
one at a time, in interleaved rounds (A B, B A, ...), for each case (16
connections, 64 B, framed and buffered). Figures are medians over rounds:
calls/s, the sidecar's CPU µs per call (user + system from /proc), p50. The
checkouts must share this environment's dependencies. Every process is ended
by its PID.
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
CASES = (("framed", 64), ("buffered", 64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    sources = {"before": args.before.resolve(), "after": REPO_ROOT}
    if not (sources["before"] / "sidecar").is_dir():
        parser.error(f"{args.before} is not a checkout of the sidecar (no sidecar/ in it)")
    tools = build_tools()
    kinds = ("before", "after")
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory() as tmp,
        upstream_server(tools["upstream"]) as (_, up_port),
        contextlib.ExitStack() as stack,
    ):
        live = {
            k: stack.enter_context(
                sidecar_process(
                    PROGRAM, up_port, Path(tmp) / f"{k}.log", timeout=20.0, source=sources[k]
                )
            )
            for k in kinds
        }
        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else kinds[::-1]
            for transport, payload in CASES:
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
                    )
                    report = run.report
                    if report["errors"]:
                        raise RuntimeError(f"{kind}: {report['errors']} errors: {report}")
                    row = {
                        "calls_per_s": report["calls_per_s"],
                        "cpu_us": run.per_call_us(run.cpu_seconds(kind)),
                        "p50_us": report["latency_us"]["p50"],
                    }
                    results.setdefault((kind, transport, payload), []).append(row)
                    print(
                        f"round {round_no + 1} {transport:8} {kind:6} "
                        f"{row['calls_per_s']:>9,.0f} calls/s {row['cpu_us']:5.1f} us CPU/call "
                        f"p50 {row['p50_us']:.0f} us",
                        flush=True,
                    )
    print(
        f"\nBefore ({args.before}) and after (this checkout): {args.rounds} interleaved rounds "
        f"x {args.duration:g} s, {args.conns} connections; medians. "
        f"Load average before: {load_before[0]:.2f}.\n"
    )
    print("| case | before calls/s | after calls/s | after/before | CPU µs/call before / after |")
    print("|---|---:|---:|---:|---:|")
    for transport, payload in CASES:
        med = {
            k: {
                m: statistics.median(r[m] for r in results[(k, transport, payload)])
                for m in ("calls_per_s", "cpu_us")
            }
            for k in kinds
        }
        ratio = med["after"]["calls_per_s"] / med["before"]["calls_per_s"]
        print(
            f"| {payload} B {transport} | {med['before']['calls_per_s']:,.0f} | "
            f"{med['after']['calls_per_s']:,.0f} | {ratio:.2f} | "
            f"{med['before']['cpu_us']:.1f} / {med['after']['cpu_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
