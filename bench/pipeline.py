"""What the resilience pipeline costs: the sidecar vs its own pass-through path.

Two sidecars in front of the same C upstream, measured with the C load
generator in interleaved rounds (A B A B ..., order alternating, medians):

- **pass-through**: `bench/passthrough.py`, the sidecar with its `Call`
  replaced by one bare forward;
- **pipeline**: `python -m sidecar run` with its default pipeline: breaker
  admission and recording, retry budget deposits, retry decisions, the
  fallback cache check, per-call metrics. No faults, so no retries happen.

Prints calls/s, CPU per call and p50 for both, and the throughput ratio
(the goal: the pipeline keeps at least 0.85 of the pass-through throughput).

Usage: python bench/pipeline.py [--rounds 5] [--duration 3] [--conns 16] [--payload 64]
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

from benchtools import (
    BENCH_DIR,
    build_tools,
    measured_load,
    sidecar_process,
    upstream_server,
)

# What runs each variant: the rest of its command line is its address flags.
PROGRAMS = {
    "pass-through": [str(BENCH_DIR / "passthrough.py")],
    "pipeline": ["-m", "sidecar", "run", "--log-level", "warning"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--transport", default="framed", choices=["framed", "buffered"])
    args = parser.parse_args()
    tools = build_tools()
    kinds = ("pass-through", "pipeline")
    results: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory() as tmp,
        upstream_server(tools["upstream"]) as (_, up_port),
        contextlib.ExitStack() as stack,
    ):
        live = {
            k: stack.enter_context(
                sidecar_process(PROGRAMS[k], up_port, Path(tmp) / f"{k}.log", timeout=20.0)
            )
            for k in kinds
        }
        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else kinds[::-1]
            for kind in order:
                run = measured_load(
                    tools["loadgen"],
                    live[kind].port,
                    {kind: live[kind].proc.pid},
                    conns=args.conns,
                    payload=args.payload,
                    transport=args.transport,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                report = run.report
                if report["errors"]:
                    raise RuntimeError(f"{kind}: {report['errors']} errors: {report}")
                results[kind].append(
                    {
                        "calls_per_s": report["calls_per_s"],
                        "cpu_us": run.per_call_us(run.cpu_seconds(kind)),
                        "p50_us": report["latency_us"]["p50"],
                    }
                )
                print(
                    f"round {round_no + 1} {kind:12} {report['calls_per_s']:>9,.0f} calls/s "
                    f"{results[kind][-1]['cpu_us']:5.1f} us CPU/call "
                    f"p50 {results[kind][-1]['p50_us']:.0f} us",
                    flush=True,
                )
    med = {
        k: {m: statistics.median(r[m] for r in results[k]) for m in results[k][0]} for k in kinds
    }
    print(
        f"\nResilience pipeline cost: {args.rounds} interleaved rounds x {args.duration:g} s, "
        f"{args.conns} connections, {args.payload} B, {args.transport}; medians. "
        f"Load average before: {load_before[0]:.2f}.\n"
    )
    print("| variant | calls/s | CPU µs/call | p50 µs |")
    print("|---|---:|---:|---:|")
    for k in kinds:
        print(
            f"| {k} | {med[k]['calls_per_s']:,.0f} | {med[k]['cpu_us']:.1f} | "
            f"{med[k]['p50_us']:.0f} |"
        )
    ratio = med["pipeline"]["calls_per_s"] / med["pass-through"]["calls_per_s"]
    verdict = "met" if ratio >= 0.85 else "NOT met"
    print(f"\npipeline / pass-through throughput: {ratio:.2f} (goal >= 0.85: {verdict})")


if __name__ == "__main__":
    main()
