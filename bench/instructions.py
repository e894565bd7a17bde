"""Instructions per call, counted by callgrind: the sidecar beside the platform's floor.

Timings on a shared 2-core machine move by 10 % from run to run, and this
host has no hardware counters (``perf stat`` reports "not counted"). An
instruction count does not move: each variant runs under ``valgrind
--tool=callgrind`` in front of the C upstream, its counters are zeroed once
it is ready, the C load generator runs through it for a few seconds, and
the counters are dumped. Instructions (user space only: the kernel's share
is not counted) divided by the calls made give a figure that compares two
versions of the code to within a percent or two, where `speed.py` needs
interleaved rounds to see 5 %. The processes run with ``PYTHONHASHSEED=0``:
with Python's random string hashes, dict and set layouts differ from run to
run, and so does the count, by a few hundred a call.

Variants: ``sidecar`` (``python -m sidecar run`` from ``--source``, the
config of `speed.py`'s cached rows: every reply stored in the memory
fallback cache) and ``tcp-floor`` (`tcp_floor.py`, a plain TCP proxy on
the same platform). Under callgrind a process runs about 50 times slower,
so a call shares its loop's turn with fewer others than at full speed: work
done once per turn (timers, the loop's own) weighs more per call here.
Compare versions with each other, not with `speed.py`'s microseconds.

Prints the instructions per call of each variant, the sidecar's over the
floor's, the sidecar's inside its two connections (their ``data_received``:
the calls' own work, without the loop's turns, whose share a call depends on
how many calls a turn serves), and its most costly functions per call (the compiled
build's C functions carry the Python names; a pure-Python run shows only
the interpreter's).

Usage:
    python bench/instructions.py [--source .build/compiled] [--duration 8] [--top 25]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtools import (
    BENCH_DIR,
    REPO_ROOT,
    build_tools,
    run_loadgen,
    sidecar_process,
    upstream_server,
)
from speed import CACHE_CONFIG

# Seconds a process under callgrind gets to answer /readyz (the sidecar's imports
# alone take half a minute there).
START_TIMEOUT = 180.0
# A line of callgrind_annotate: "  1,234 (12.3%)  file:function [object]".
_LINE = re.compile(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S.*?)(?: \[[^]]*\])?\s*$")
# A compiled function's C name: CPyDef_<module>___<Class>___<method> (mypyc).
_NATIVE = re.compile(r"CPy(?:Def|Py)_(\w+)")


# The per-call path's two ways in: what runs inside them is the calls' own work,
# without the loop's turns (whose share a call grows as fewer calls share a turn).
_CONNECTIONS = ("client.ClientConnection", "upstream.UpstreamConnection")


@dataclass(frozen=True)
class Counted:
    """One variant's count: calls made through it and instructions it ran meanwhile."""

    name: str
    calls: int
    instructions: int
    functions: dict[str, int]  # inclusive instructions of the sidecar's own functions

    @property
    def per_call(self) -> float:
        return self.instructions / self.calls


def parse_annotate(text: str) -> tuple[int, dict[str, int]]:
    """(program total, inclusive instructions by function) from callgrind_annotate's
    output; functions are the compiled build's, named ``module.Class.method``.

    Raises:
        ValueError: the text has no program total.
    """
    total = None
    functions: dict[str, int] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        count, where = int(match.group(1).replace(",", "")), match.group(2)
        if where == "PROGRAM TOTALS":
            total = count
            continue
        native = _NATIVE.search(where.rpartition(":")[2])
        if native is None or "__native_sidecar" not in where:
            continue
        name = ".".join(part for part in native.group(1).split("___") if part)
        functions[name] = max(functions.get(name, 0), count)
    if total is None:
        raise ValueError("callgrind_annotate printed no PROGRAM TOTALS line")
    return total, functions


def count(
    name: str,
    program: Sequence[str],
    source: Path,
    upstream_port: int,
    loadgen: Path,
    duration: float,
    workdir: Path,
) -> Counted:
    """Run ``program`` under callgrind in front of the upstream and count a load run."""
    out = workdir / f"{name}.callgrind"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    with sidecar_process(
        program, upstream_port, workdir / f"{name}.log", START_TIMEOUT, source, prefix=valgrind
    ) as running:
        _control("-z", running.proc.pid)
        report = run_loadgen(
            loadgen, running.port, conns=16, payload=64, transport="framed",
            duration=duration, warmup=0.0,
        )  # fmt: skip
        _control("-d", running.proc.pid)
    if report["errors"]:
        raise RuntimeError(f"{name}: the load generator saw errors: {report['error_kinds']}")
    dumps = sorted(workdir.glob(f"{out.name}.*"))
    if not dumps:
        raise RuntimeError(f"{name}: callgrind wrote no dump (its log: {name}.log)")
    annotated = subprocess.run(
        ["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dumps[0])],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    total, functions = parse_annotate(annotated)
    return Counted(name, int(report["calls_all"]), total, functions)


def _control(flag: str, pid: int) -> None:
    """callgrind_control's zero (-z) or dump (-d) for ``pid``."""
    subprocess.run(
        ["callgrind_control", flag, str(pid)], capture_output=True, check=True, timeout=60
    )


def table(counted: Sequence[Counted], top: int) -> str:
    """The Markdown report: instructions per call of each variant, then the first
    variant's ``top`` costliest functions per call."""
    floor = next((c for c in counted if c.name == "tcp-floor"), None)
    lines = ["| variant | calls | instructions per call | over the floor |", "|---|---:|---:|---:|"]
    for c in counted:
        ratio = f"{c.per_call / floor.per_call:.2f}" if floor else "-"
        lines.append(f"| {c.name} | {c.calls:,} | {c.per_call:,.0f} | {ratio} |")
    main = counted[0]
    inside = sum(main.functions.get(f"{side}.data_received", 0) for side in _CONNECTIONS)
    if inside:
        lines += ["", f"{main.name}, inside its two connections: {inside / main.calls:,.0f} a call"]
    if main.functions:
        lines += ["", "| function (inclusive) | instructions per call |", "|---|---:|"]
        ranked = sorted(main.functions.items(), key=lambda item: -item[1])[:top]
        lines += [f"| {name} | {n / main.calls:,.0f} |" for name, n in ranked]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO_ROOT, help="checkout to run")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--variants", default="sidecar,tcp-floor")
    parser.add_argument(
        "--keep", type=Path, help="directory to keep the callgrind dumps in (callgrind_annotate)"
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_annotate", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install valgrind")
    # Python's string hashes seeded alike in every run: a random seed moves the whole
    # count by a few hundred a call (dict probes, set layouts), more than a small change.
    os.environ["PYTHONHASHSEED"] = "0"
    tools = build_tools()
    with tempfile.TemporaryDirectory() as tmp, upstream_server(tools["upstream"]) as (_, up):
        workdir = Path(tmp)
        config = workdir / "sidecar.yaml"
        config.write_text(CACHE_CONFIG, encoding="utf-8")
        programs = {
            "sidecar": ["-m", "sidecar", "run", "--log-level", "warning", "--config", str(config)],
            "tcp-floor": [str(BENCH_DIR / "tcp_floor.py")],
        }
        counted = [
            count(name, programs[name], args.source.resolve(), up, tools["loadgen"],
                  args.duration, workdir)
            for name in args.variants.split(",")
        ]  # fmt: skip
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in workdir.glob("*.callgrind.*"):
                shutil.copy(dump, args.keep / dump.name)
    print(table(counted, args.top))


if __name__ == "__main__":
    main()
