"""Building and driving the benchmark's C tools and sidecars; CPU accounting; results.

The load generator (`src/loadgen.c`) and the upstream (`src/upstream.c`)
are compiled with the system's ``gcc`` into ``bench/bin/`` (gitignored)
the first time they are needed and again whenever a source is newer than
its binary. A sidecar (or anything taking its address flags, such as
`passthrough.py`) is started by `sidecar_process` and counted ready when
its ``/readyz`` answers 200. Every process started here is ended by its
PID: SIGTERM, a bounded wait, then SIGKILL.

Used by `run.py`, `fleet.py` and `pipeline.py` (the benchmarks) and
`test_bench_tools.py` (the self-check).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.testing import ports

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SRC_DIR = BENCH_DIR / "src"
BIN_DIR = BENCH_DIR / "bin"
RESULTS_DIR = BENCH_DIR / "results"
HOST = "127.0.0.1"

# -O2 is what a distribution would build with; -pthread for the upstream's
# optional worker threads.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]
TOOLS = ("loadgen", "upstream", "loopback")
# Seconds a freshly started process gets to report that it is listening.
START_TIMEOUT = 15.0
# Seconds a process gets to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_tools(bin_dir: Path = BIN_DIR) -> dict[str, Path]:
    """Compile the C tools when missing or older than their sources.

    Each binary is written to a temporary name and renamed into place, so a
    concurrent build or run never sees half a file.

    Returns:
        ``{"loadgen": path, "upstream": path, "loopback": path}``.

    Raises:
        RuntimeError: gcc is missing or the build failed (its output is in
            the message).
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("the benchmark tools need a C compiler (gcc or cc) on PATH")
    bin_dir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name in TOOLS:
        source = SRC_DIR / f"{name}.c"
        target = bin_dir / name
        newest = max(p.stat().st_mtime for p in [source, *SRC_DIR.glob("*.h")])
        if not target.exists() or target.stat().st_mtime < newest:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=bin_dir)
            os.close(fd)
            result = subprocess.run(
                [gcc, *CFLAGS, "-o", tmp, str(source)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode != 0:
                Path(tmp).unlink(missing_ok=True)
                raise RuntimeError(f"building {name} failed:\n{result.stderr}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        built[name] = target
    return built


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (`sidecar.testing.ports`)."""
    return ports.free_port(HOST)


def stop_process(proc: subprocess.Popen[Any], timeout: float = STOP_TIMEOUT) -> int | None:
    """End a process we started, by its PID: SIGTERM, wait, then SIGKILL.

    Returns:
        Its exit status (None if it could not be reaped).
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
    return proc.returncode


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next line of a process's stdout, waiting at most ``timeout`` seconds.

    Raises:
        RuntimeError: the process exited or stayed silent.
    """
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"pid {proc.pid} printed nothing within {timeout}s")
            if sel.select(remaining):
                line = proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"pid {proc.pid} exited with {proc.wait()}")
                return line


@contextlib.contextmanager
def upstream_server(
    binary: Path, threads: int = 1, port: int = 0
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Run the C upstream; yields (process, port) and stops it by PID on exit."""
    proc = subprocess.Popen(
        [str(binary), "--host", HOST, "--port", str(port), "--threads", str(threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(proc, START_TIMEOUT)
        word, _, number = line.partition(" ")
        if word != "LISTENING":
            raise RuntimeError(f"upstream said {line!r}")
        yield proc, int(number)
    finally:
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def wait_until_up(
    ready: Callable[[], bool],
    proc: subprocess.Popen[Any],
    timeout: float,
    *,
    waiting_for: str,
    interval: float,
) -> None:
    """Call ``ready`` every ``interval`` seconds until it is true.

    Raises:
        RuntimeError: ``proc`` exited first, or ``timeout`` seconds passed;
            the message names what was waited for.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"pid {proc.pid} exited with {proc.returncode} before {waiting_for}")
        if ready():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {waiting_for} after {timeout}s")
        time.sleep(interval)


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = START_TIMEOUT) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``.

    Raises:
        RuntimeError: ``proc`` exited first, or the deadline passed.
    """

    def accepts() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return True
        except OSError:
            return False

    wait_until_up(accepts, proc, timeout, waiting_for=f"listener on port {port}", interval=0.02)


@contextlib.contextmanager
def explain_failure(log: Path) -> Iterator[None]:
    """Add the end of a process's log to a start-up failure."""
    try:
        yield
    except RuntimeError as exc:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{exc}; its log ({log.name}):\n{tail}") from exc


def wait_ready(url: str, proc: subprocess.Popen[Any], timeout: float = START_TIMEOUT) -> None:
    """Poll an HTTP readiness URL until it answers 200.

    Raises:
        RuntimeError: ``proc`` exited first, or the deadline passed.
    """

    def answers_200() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    wait_until_up(answers_200, proc, timeout, waiting_for=f"200 from {url}", interval=0.05)


@dataclass(frozen=True)
class SidecarProcess:
    """A running sidecar: its process, Thrift port and admin (metrics) port."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int

    @property
    def admin_url(self) -> str:
        """``http://HOST:admin_port``, the base of /readyz, /metrics and /state."""
        return f"http://{HOST}:{self.admin_port}"


@contextlib.contextmanager
def sidecar_process(
    program: Sequence[str],
    upstream_port: int,
    log: Path,
    timeout: float = START_TIMEOUT,
    source: Path = REPO_ROOT,
    pythonpath: Sequence[Path] = (),
    prefix: Sequence[str] = (),
) -> Iterator[SidecarProcess]:
    """Run a sidecar in front of the upstream on 127.0.0.1:``upstream_port``.

    Args:
        program: what follows ``python`` on the command line, before the
            address flags: ``["-m", "sidecar", "run", ...]`` or a script that
            takes the same flags (``passthrough.py``).
        upstream_port: the upstream's port, given as ``--upstream``.
        log: the file that gets the process's stdout and stderr.
        timeout: seconds it gets for ``/readyz`` to answer 200.
        source: the checkout whose ``sidecar`` package runs (this one by
            default; another one to compare two versions).
        pythonpath: directories put on ``PYTHONPATH`` after ``source``.
        prefix: what runs the interpreter (``valgrind ...``; none by default).

    Free ports are picked for ``--listen`` and ``--metrics-listen``; the
    checkout is put first on ``PYTHONPATH`` and is the working directory. The process is stopped
    by its PID on exit.

    Raises:
        RuntimeError: it exited or was not ready in time (the end of its log
            is in the message).
    """
    port, admin = free_port(), free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(source), *map(str, pythonpath), env.get("PYTHONPATH")])
    )
    if _has_control_listener(source):
        # Each sidecar its own control port (the default, 127.0.0.1:9465, is one per machine).
        env["SIDECAR_CONTROL__LISTEN"] = f"{HOST}:{free_port()}"
    command = [
        *prefix,
        sys.executable,
        *program,
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{upstream_port}",
        "--metrics-listen",
        f"{HOST}:{admin}",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=source, env=env, stdout=out, stderr=out)
        try:
            running = SidecarProcess(proc, port, admin)
            with explain_failure(log):
                wait_ready(running.admin_url + "/readyz", proc, timeout)
            yield running
        finally:
            stop_process(proc)


def _has_control_listener(source: Path) -> bool:
    """Does the checkout's sidecar have a control listener (an older one refuses the key)?"""
    model = source / "sidecar" / "config" / "model.py"
    return model.is_file() and "control" in model.read_text()


def run_loadgen(
    binary: Path,
    port: int,
    *,
    conns: int,
    payload: int,
    transport: str,
    duration: float,
    warmup: float = 0.5,
    rate: float = 0.0,
    drain: float = 5.0,
) -> dict[str, Any]:
    """One load generator run; returns its JSON report.

    Raises:
        RuntimeError: it failed to run, or ran past its own time bound.
    """
    args = [
        str(binary),
        "--host",
        HOST,
        "--port",
        str(port),
        "--conns",
        str(conns),
        "--payload",
        str(payload),
        "--transport",
        transport,
        "--duration",
        str(duration),
        "--warmup",
        str(warmup),
        "--rate",
        str(rate),
        "--drain",
        str(drain),
    ]
    # Its own bound is warmup + duration + drain; allow that plus start-up.
    limit = warmup + duration + drain + 15.0
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        proc.communicate()
        raise RuntimeError(f"loadgen ran past {limit}s: {' '.join(args)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen exited {proc.returncode}: {err.strip()}")
    report: dict[str, Any] = json.loads(out)
    return report


@dataclass(frozen=True)
class LoadRun:
    """One load generator run and the CPU time spent while it ran.

    ``cpu`` holds the (user, system) seconds of each watched process, by the
    name it was watched under; ``machine_busy`` the busy seconds of the whole
    machine (all cores).
    """

    report: dict[str, Any]
    cpu: dict[str, tuple[float, float]]
    machine_busy: float

    @property
    def calls(self) -> int:
        """Every good reply of the run, warm-up included (at least 1: a divisor)."""
        return max(int(self.report["calls_all"]), 1)

    def cpu_seconds(self, name: str) -> float:
        """User + system seconds of one watched process."""
        user, system = self.cpu[name]
        return user + system

    def per_call_us(self, seconds: float) -> float:
        """CPU ``seconds`` spread over every good reply, in microseconds per call."""
        return seconds / self.calls * 1e6

    def core_share(self, seconds: float) -> float:
        """CPU ``seconds`` as a share of one core over the run's wall time."""
        return seconds / float(self.report["wall_s"])

    @property
    def others_core_share(self) -> float:
        """Busy CPU of everything neither watched nor the load generator (noise)."""
        ours = sum(self.cpu_seconds(name) for name in self.cpu) + self.report["cpu_s"]
        return self.core_share(max(self.machine_busy - ours, 0.0))

    def figures(self) -> dict[str, Any]:
        """The load generator's headline: calls/s, p50 and p99 in µs, errors."""
        return {
            "calls_per_s": self.report["calls_per_s"],
            "p50_us": self.report["latency_us"]["p50"],
            "p99_us": self.report["latency_us"]["p99"],
            "errors": self.report["errors"],
        }


def measured_load(
    binary: Path,
    port: int,
    watch: dict[str, int],
    cpu_of: Callable[[int], tuple[float, float]] | None = None,
    **load: Any,
) -> LoadRun:
    """`run_loadgen` against ``port``, with the CPU of the ``watch`` processes around it.

    Args:
        binary: the load generator.
        port: where it connects.
        watch: process IDs to account for, by name.
        cpu_of: how a PID's (user, system) seconds are read: `cpu_times` (the
            default: that process alone) or `tree_cpu_times` (with its children,
            for a sidecar running worker processes).
        load: `run_loadgen`'s keyword arguments (conns, payload, ...).
    """
    read = cpu_of or cpu_times
    before = {name: read(pid) for name, pid in watch.items()}
    machine0 = machine_busy_seconds()
    report = run_loadgen(binary, port, **load)
    machine = machine_busy_seconds() - machine0
    after = {name: read(pid) for name, pid in watch.items()}
    cpu = {
        name: (after[name][0] - before[name][0], after[name][1] - before[name][1]) for name in watch
    }
    return LoadRun(report, cpu, machine)


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process: all its threads, dead ones included.

    Read from ``/proc/PID/stat`` (fields 14 and 15, in clock ticks, usually
    10 ms each: a 3-second run at tens of thousands of calls/s makes that
    resolution negligible).
    """
    with open(f"/proc/{pid}/stat", "rb") as fh:
        raw = fh.read()
    # The command name (field 2) may contain spaces: split after its ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant of it (from ``/proc/PID/task/*/children``)."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 4096:  # bounded: a process tree is never near this
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo.extend(int(child) for child in task.read_text().split())
    return found


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` and its live descendants, summed.

    For a sidecar that runs worker processes: the parent's own figure does
    not include its children until they exit. A child that exits between two
    readings takes its seconds with it (they move to the parent's ``cutime``),
    so compare readings taken while the same children run.
    """
    user = system = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            u, s = cpu_times(member)
            user += u
            system += s
    return user, system


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (see `cpu_times`)."""
    user, system = cpu_times(pid)
    return user + system


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores; not idle, not iowait)."""
    with open("/proc/stat") as fh:
        ticks = [int(v) for v in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK


def loadavg() -> str:
    """The machine's 1, 5 and 15-minute load averages, as ``/proc/loadavg`` gives them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def round_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every interleaved benchmark takes.

    ``--quick``, ``--rounds``, ``--duration`` and ``--warmup``; `round_defaults`
    fills in the ones not given once the arguments are parsed.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="2 rounds x 1 s: check the harness")
    p.add_argument("--rounds", type=int, help="interleaved rounds [5; quick 2]")
    p.add_argument("--duration", type=float, help="seconds measured per run [3; quick 1]")
    p.add_argument(
        "--warmup", type=float, help="unmeasured seconds before each run [0.5; quick 0.3]"
    )
    return p


def round_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in rounds, duration and warm-up: 5 x 3 s after 0.5 s; quick 2 x 1 s after 0.3 s."""
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.duration = args.duration or (1.0 if args.quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 0.5)
    return args


def round_meta(args: argparse.Namespace) -> dict[str, Any]:
    """The start of a run's metadata: when it started and its rounds, duration and warm-up."""
    return {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "rounds": args.rounds,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
    }


def save_results(prefix: str, quick: bool, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as JSON and its ``markdown`` as .md into ``bench/results/``.

    The files are ``PREFIX-YYYYmmdd-HHMMSS[-quick].{json,md}``; their common
    base path is returned and named on stderr.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = RESULTS_DIR / f"{prefix}-{stamp}{'-quick' if quick else ''}"
    base.with_suffix(".md").write_text(payload["markdown"])
    base.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    print(f"results: {base}.json and .md", file=sys.stderr)
    return base
