"""What hedging buys against a slow tail, and what it costs in upstream load.

The C upstream behind a fault proxy (`sidecar.testing.faults`) that delays a
seeded 1 % of the calls it sees by 200 ms; sidecars in front of the proxy,
one per variant, measured with the C load generator at a fixed offered rate
(open loop: latency counted from each call's due time) in interleaved rounds
(order alternating, medians):

- **off**: no hedging;
- **p95**: ``hedge.delay: p95`` (the method's own recent answer times);
- **fixed**: ``hedge.delay`` a fixed duration (``--fixed``, 5 ms).

Each with the default hedge budget (10 % of calls, 1/s floor). Extra load is
what the fault proxy counted: calls it received per call the load generator
made (1.00 = no extra attempt), beside the sidecar's own hedges_total.

Prints p50, p99, p99.9 and max of client latency, attempts per call and
hedges sent and won per 1000 calls, and writes the table to bench/results/.

Usage: python bench/hedging.py [--rounds 3] [--duration 10] [--rate 500] [--conns 128]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchtools import (
    build_tools,
    round_defaults,
    round_meta,
    round_parser,
    run_loadgen,
    save_results,
    sidecar_process,
    upstream_server,
)
from prometheus_client.parser import text_string_to_metric_families

from sidecar.testing.faults import FaultPlan, FaultProxyThread

TAIL_RATE = 0.01  # share of calls the fault proxy delays
TAIL_DELAY = 0.2  # seconds each of those waits
SEED = 11


def variant_config(delay: str | None) -> str:
    """The config file of one variant (addresses come from the command line)."""
    lines = [
        "retry: {max_attempts: 1, per_try_timeout: 2s, deadline: 5s}",
        "log: {level: warning}",
        "methods: {echo: {idempotent: true}}",  # echo is safe to repeat: it may hedge
    ]
    if delay is not None:
        lines.append(f"hedge: {{delay: {delay}}}")
    return "\n".join(lines) + "\n"


def hedge_counts(admin_url: str) -> tuple[float, float]:
    """(hedges sent, hedges won) so far, from the sidecar's /metrics."""
    with urllib.request.urlopen(admin_url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    sent = won = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "thrift_sidecar_hedges_total":
                sent += sample.value
            elif sample.name == "thrift_sidecar_hedges_won_total":
                won += sample.value
    return sent, won


def main() -> None:
    parser = round_parser(__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="offered calls/s [500]")
    parser.add_argument("--conns", type=int, default=128, help="client connections [128]")
    parser.add_argument("--payload", type=int, default=64)
    parser.add_argument("--fixed", default="5ms", help="the fixed variant's delay [5ms]")
    args = round_defaults(parser.parse_args())
    if not args.quick and args.duration == 3.0:
        args.duration = 10.0  # a 1 % tail needs calls: 5000 per run at 500/s
    if not args.quick and args.rounds == 5:
        args.rounds = 3
    variants: dict[str, str | None] = {"off": None, "p95": "p95", "fixed": args.fixed}
    tools = build_tools()
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
    load_before = os.getloadavg()
    plan = FaultPlan({"delay": TAIL_RATE}, delay=TAIL_DELAY, seed=SEED)
    with (
        tempfile.TemporaryDirectory() as tmp,
        upstream_server(tools["upstream"]) as (_, up_port),
        FaultProxyThread(f"127.0.0.1:{up_port}", "framed", plan) as proxy,
        contextlib.ExitStack() as stack,
    ):
        live = {}
        for name, delay in variants.items():
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(variant_config(delay))
            program = ["-m", "sidecar", "run", "--config", str(path)]
            live[name] = stack.enter_context(
                sidecar_process(program, proxy.port, Path(tmp) / f"{name}.log", timeout=20.0)
            )
        names = list(variants)
        for round_no in range(args.rounds):
            order = names if round_no % 2 == 0 else names[::-1]
            for name in order:
                sc = live[name]
                seen_before = proxy.stats.calls
                hedges_before = hedge_counts(sc.admin_url)
                report = run_loadgen(
                    tools["loadgen"],
                    sc.port,
                    conns=args.conns,
                    payload=args.payload,
                    transport="framed",
                    duration=args.duration,
                    warmup=args.warmup,
                    rate=args.rate,
                )
                if report["errors"]:
                    raise RuntimeError(f"{name}: {report['errors']} errors: {report}")
                calls = max(int(report["calls_all"]), 1)
                sent, won = (
                    a - b for a, b in zip(hedge_counts(sc.admin_url), hedges_before, strict=True)
                )
                lat = report["latency_us"]
                row = {
                    "p50_ms": lat["p50"] / 1000,
                    "p99_ms": lat["p99"] / 1000,
                    "p999_ms": lat["p999"] / 1000,
                    "max_ms": lat["max"] / 1000,
                    "attempts_per_call": (proxy.stats.calls - seen_before) / calls,
                    "hedges_per_1000": 1000 * sent / calls,
                    "won_per_1000": 1000 * won / calls,
                }
                rows[name].append(row)
                print(
                    f"round {round_no + 1} {name:6} p50 {row['p50_ms']:.2f} ms  p99 "
                    f"{row['p99_ms']:.2f} ms  p99.9 {row['p999_ms']:.1f} ms  attempts/call "
                    f"{row['attempts_per_call']:.3f}  hedges/1000 {row['hedges_per_1000']:.1f} "
                    f"(won {row['won_per_1000']:.1f})",
                    flush=True,
                )
    med = {k: {m: statistics.median(r[m] for r in rows[k]) for m in rows[k][0]} for k in variants}
    lines = [
        f"Hedging against a 1 % tail of {TAIL_DELAY * 1000:g} ms (seeded fault proxy): "
        f"{args.rounds} interleaved rounds x {args.duration:g} s at {args.rate:g} calls/s "
        f"offered, {args.conns} connections, {args.payload} B framed; medians. "
        f"Load average before: {load_before[0]:.2f}.",
        "",
        "| hedging | p50 ms | p99 ms | p99.9 ms | max ms | upstream attempts/call "
        "| hedges per 1000 calls | won |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, delay in variants.items():
        m = med[name]
        label = "off" if delay is None else f"delay {delay}"
        lines.append(
            f"| {label} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | {m['p999_ms']:.1f} | "
            f"{m['max_ms']:.1f} | {m['attempts_per_call']:.3f} | {m['hedges_per_1000']:.1f} | "
            f"{m['won_per_1000']:.1f} |"
        )
    markdown = "\n".join(lines) + "\n"
    print("\n" + markdown)
    payload: dict[str, Any] = {
        **round_meta(args),
        "rate": args.rate,
        "conns": args.conns,
        "tail": {"rate": TAIL_RATE, "delay_s": TAIL_DELAY, "seed": SEED},
        "rounds_by_variant": rows,
        "medians": med,
        "markdown": markdown,
    }
    save_results("hedging", args.quick, payload)


if __name__ == "__main__":
    main()
