"""Soak a real sidecar: upstream restarts, resets, reloads, Redis and SQLite faults, for minutes.

Starts a redis-server (fleet mode: shared breaker state), a thriftpy2
upstream in its own process behind the fault proxy, and ``python -m sidecar
run`` with a fallback cache (SQLite by default, the file it deletes; or
Redis); well-behaved clients read (framed and buffered) and write
(``placeOrder``, framed and buffered) throughout, checking every reply. On a
seeded schedule it restarts the upstream (SIGTERM or SIGKILL by PID), resets
and delays calls in the fault proxy, reloads the config with SIGHUP (two
valid configs and a broken one in turn), restarts Redis and deletes the SQLite
file. It prints calls by outcome per client, dropped connections, wrong
replies, writes executed twice, breaker transitions, reloads, state backend
and fallback store errors, the sidecar's RSS and fds before / peak / after,
and the clients' p50 / p99 (docs/robustness.md says how to read them).

    .venv/bin/python bench/soak.py                  # 10 minutes
    .venv/bin/python bench/soak.py --seconds 30     # the short run

Exit status: 0 when the sidecar did not crash, no client got a wrong reply,
no write was executed twice, no receipt was made up and the sidecar's fds
came back to where they started; 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.soak.report import SoakReport
from tests.soak.runner import SoakSettings, run_soak

MAX_SECONDS = 24 * 3600.0


def _seconds(text: str) -> float:
    value = float(text)
    if not 5 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be between 5 and {MAX_SECONDS:g}")
    return value


def _period(text: str) -> float:
    value = float(text)
    if not 0.5 <= value <= 600:
        raise argparse.ArgumentTypeError("must be between 0.5 and 600")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=_seconds, default=600.0)
    parser.add_argument("--period", type=_period, default=4.0, help="mean seconds between faults")
    parser.add_argument("--cache", choices=("sqlite", "redis"), default="sqlite")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--events", action="store_true", help="also print the fault schedule")
    return parser.parse_args(argv)


def healthy(report: SoakReport) -> bool:
    return not (
        report.crashed
        or report.total("wrong_replies")
        or report.executed_twice
        or report.receipts_not_executed
        or report.fds.after > report.fds.before
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = SoakSettings(
        seed=args.seed, seconds=args.seconds, period=args.period, cache=args.cache
    )
    report = run_soak(settings)
    print(report.to_text())
    if args.events:
        print("\n".join(report.events))
    if args.json:
        args.json.write_text(report.to_json())
    return 0 if healthy(report) else 1


if __name__ == "__main__":
    sys.exit(main())
