"""The kernel's floor under a proxied call: a write and a read on loopback, in C.

Runs bench/src/loopback.c (built with the other tools): one thread writes
SIZE bytes on one end of a 127.0.0.1 connection and reads them on the other,
with read/write (what uvloop calls) and with sendto/recvfrom (what HAProxy
calls). Every proxy pays two such pairs a call, the call one way and the
reply the other; the README's speed section sets the targets' CPU per call
against it. Medians of the repetitions.

Usage: python bench/loopback.py [--sizes 64,16384] [--count 200000] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import build_tools


def measure(tool: Path, size: int, count: int, reps: int) -> dict[str, float]:
    """Median microseconds per pair, each way of calling, for ``size`` bytes."""
    out = subprocess.run(
        [str(tool), str(size), str(count), str(reps)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60 + count * reps * 0.001,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    if len(rows) != reps:
        raise RuntimeError(f"loopback printed {len(rows)} rows, expected {reps}:\n{out}")
    return {
        key: statistics.median(row[key] for row in rows)
        for key in ("write_read_us", "sendto_recvfrom_us")
    }


def table(results: dict[int, dict[str, float]]) -> str:
    """The Markdown table of `measure`'s results, one row a size."""
    lines = [
        "| bytes | write + read µs | sendto + recvfrom µs | difference µs"
        " | a call (two pairs), read/write µs |",
        "|---:|---:|---:|---:|---:|",
    ]
    for size, got in results.items():
        rw, sr = got["write_read_us"], got["sendto_recvfrom_us"]
        lines.append(f"| {size:,} | {rw:.2f} | {sr:.2f} | {rw - sr:+.2f} | {2 * rw:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,16384", help="bytes a write [64,16384]")
    parser.add_argument("--count", type=int, default=200_000, help="pairs a repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions [5]")
    args = parser.parse_args()
    tool = build_tools()["loopback"]
    sizes = [int(s) for s in args.sizes.split(",")]
    print(table({size: measure(tool, size, args.count, args.reps) for size in sizes}))


if __name__ == "__main__":
    main()
