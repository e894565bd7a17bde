"""What the resilience pipeline costs: the sidecar vs its own pass-through path.

Two sidecars in front of the same C upstream, measured with the C load
generator in interleaved rounds (A B A B ..., order alternating, medians):

- **pass-through**: `bench/passthrough.py`, the sidecar with `Pipeline.handle`
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
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import (
    HOST,
    build_tools,
    cpu_times,
    free_port,
    run_loadgen,
    stop_process,
    upstream_server,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def sidecar(kind: str, upstream_port: int, workdir: Path) -> Iterator[tuple[int, int]]:
    """Start one variant; yields (Thrift port, PID)."""
    port, admin = free_port(), free_port()
    flags = [
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{upstream_port}",
        "--metrics-listen",
        f"{HOST}:{admin}",
    ]
    if kind == "pass-through":
        command = [sys.executable, str(REPO_ROOT / "bench" / "passthrough.py"), *flags]
    else:
        command = [sys.executable, "-m", "sidecar", "run", "--log-level", "warning", *flags]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    log = (workdir / f"{kind}.log").open("w")
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {(workdir / f'{kind}.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{admin}/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} not ready after 20 s") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        stop_process(proc)
        log.close()


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
        live = {k: stack.enter_context(sidecar(k, up_port, Path(tmp))) for k in kinds}
        for round_no in range(args.rounds):
            order = kinds if round_no % 2 == 0 else kinds[::-1]
            for kind in order:
                port, pid = live[kind]
                before = cpu_times(pid)
                report = run_loadgen(
                    tools["loadgen"],
                    port,
                    conns=args.conns,
                    payload=args.payload,
                    transport=args.transport,
                    duration=args.duration,
                    warmup=args.warmup,
                )
                after = cpu_times(pid)
                if report["errors"]:
                    raise RuntimeError(f"{kind}: {report['errors']} errors: {report}")
                cpu = (after[0] - before[0]) + (after[1] - before[1])
                results[kind].append(
                    {
                        "calls_per_s": report["calls_per_s"],
                        "cpu_us": cpu / max(1, report["calls_all"]) * 1e6,
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
