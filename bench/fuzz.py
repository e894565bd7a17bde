"""Fuzz a real sidecar over the network, with a well-behaved client alongside.

Starts a thriftpy2 upstream (its own process) and ``python -m sidecar run`` in
front of it, sends seeded malformed input on many connections, and prints
what happened: inputs sent, sidecar crashes and hangs, the good client's
errors by kind, breaker openings, ``protocol_errors_total`` by kind, and the
sidecar's RSS and open fds before / peak / after. The inputs are a function
of the seed alone: ``--show INDEX`` prints one, ``--replay INDEX`` sends it
alone (see docs/robustness.md for what the kinds are and how to read a run).

The short run (CI: tests/fuzz/test_fuzz.py) and the long run (>= 10^6 inputs):

    .venv/bin/python bench/fuzz.py --seed 1 --inputs 2000 --seconds 30
    .venv/bin/python bench/fuzz.py --seed 1 --inputs 1000000 --seconds 36000 \\
        --concurrency 48 --json fuzz-1.json

Exit status: 0 when the sidecar neither crashed nor hung and the good client
saw no dropped connection and no wrong reply; 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.mutations import KINDS, generate
from tests.fuzz.report import Report
from tests.fuzz.runner import FuzzSettings, run_fuzz

MAX_INPUTS = 100_000_000
MAX_SECONDS = 7 * 24 * 3600.0
MAX_CONCURRENCY = 512


def _bounded(low: float, high: float, kind: type[int] | type[float]):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int | float:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--inputs", type=_bounded(1, MAX_INPUTS, int), default=2000)
    parser.add_argument("--seconds", type=_bounded(1, MAX_SECONDS, float), default=60.0)
    parser.add_argument("--concurrency", type=_bounded(1, MAX_CONCURRENCY, int), default=16)
    parser.add_argument("--kinds", default="", help=f"comma-separated subset of: {','.join(KINDS)}")
    parser.add_argument("--idle-timeout", type=_bounded(0.2, 60, float), default=2.0)
    parser.add_argument(
        "--big-frame",
        type=_bounded(64, 2**31, int),
        default=1 << 20,
        help="largest half-sent frame announced (bytes; the sidecar's limit is 16 MiB)",
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--show", type=int, metavar="INDEX", help="print one input and exit")
    parser.add_argument("--replay", type=int, metavar="INDEX", help="send that input alone")
    return parser.parse_args(argv)


def settings(args: argparse.Namespace) -> FuzzSettings:
    kinds = tuple(k for k in args.kinds.split(",") if k)
    return FuzzSettings(
        seed=args.seed,
        inputs=args.inputs,
        seconds=args.seconds,
        concurrency=args.concurrency,
        kinds=kinds,
        idle_timeout=args.idle_timeout,
        big_frame_size=args.big_frame,
        indices=[args.replay] if args.replay is not None else None,
    )


def healthy(report: Report) -> bool:
    g = report.good
    return not (report.crashed or report.hangs or g.dropped or g.wrong_replies or g.hangs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings(args)
    if args.show is not None:
        print(generate(s.seed, args.show, s.limits, s.kinds).describe(limit=1 << 20))
        return 0
    report = run_fuzz(s)
    print(report.to_text())
    if args.json:
        args.json.write_text(report.to_json())
    return 0 if healthy(report) else 1


if __name__ == "__main__":
    sys.exit(main())
